"""The node runs only on the dependency tree it was written for: the pynetdicom whose
internals it adapts (node/dicom/pynetdicom_internals.py) and the pins in constraints.txt."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest
from support import REPO_ROOT

from node.dicom.pynetdicom_internals import (
    REQUIRED_PYNETDICOM,
    UnsupportedPynetdicom,
    check_pynetdicom,
    problems,
)
from node.testing.config_files import write_config
from node.testing.node_process import node_env

# What the node patches or relies on for byte-exact output: one exact version each.
EXACT = ("pynetdicom", "pydicom", "highdicom")


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, pinned = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = pinned.strip()
    return pins


def test_the_installed_pynetdicom_holds_every_piece_the_node_adapts() -> None:
    assert problems() == []
    check_pynetdicom()


def test_another_pynetdicom_release_is_refused_naming_the_one_needed() -> None:
    with pytest.raises(UnsupportedPynetdicom, match=REQUIRED_PYNETDICOM.replace(".", r"\.")):
        check_pynetdicom("3.1.0")


def test_pyproject_pins_exactly_what_the_node_relies_on() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = {
        dependency.split("==")[0].split(">")[0].split("<")[0].strip().lower(): dependency
        for dependency in project["dependencies"]
    }
    for name in EXACT:
        assert requirements[name] == f"{name}=={version(name)}", requirements[name]
    assert requirements["pynetdicom"] == f"pynetdicom=={REQUIRED_PYNETDICOM}"


def test_the_constraints_file_pins_the_installed_tree() -> None:
    pins = _constraints()
    for name in (*EXACT, "sqlalchemy", "numpy", "torch", "fastai", "alembic"):
        assert pins.get(name) == version(name), name


def test_serve_refuses_to_start_on_another_pynetdicom(tmp_path) -> None:
    config = write_config(
        tmp_path / "config.toml",
        {"node": {"port": 0, "bind_address": "127.0.0.1"}, "storage": {"folder": str(tmp_path)}},
    )
    program = (
        "import sys, pynetdicom; pynetdicom.__version__ = '3.1.0'; "
        "from node.process.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, "serve", "--config", str(config)],
        env=node_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert f"needs pynetdicom {REQUIRED_PYNETDICOM}" in result.stderr
    assert "3.1.0 is installed" in result.stderr
    assert not (tmp_path / "index.sqlite").exists()  # refused before anything was written
