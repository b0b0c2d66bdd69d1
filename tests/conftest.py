"""Shared fixtures: the SIIM data, config files, and real `pneumonode serve` processes.

`node_factory` starts nodes (each on its own free loopback port and temporary storage
folder) and stops them with SIGTERM at teardown, checking that they exit cleanly.
`siim_node` is one node for the whole session that already holds all 200 SIIM images,
sent with `storescu -xy` over one association, for the query tests to share.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from support import (
    NodeProcess,
    count_instances,
    siim_dir,
    siim_files,
    start_node,
    storescu,
    write_config,
)

SIIM_COUNT = 200

StartNode = Callable[..., NodeProcess]


@pytest.fixture(scope="session")
def siim_path() -> Path:
    """Folder holding train/ (the 200 SIIM DICOM files) and labels.csv."""
    path = siim_dir()
    if not (path / "train").is_dir():
        pytest.skip(f"SIIM data not found at {path} (set PNEUMONODE_SIIM_DIR)")
    return path


@pytest.fixture(scope="session")
def siim_dicom_files(siim_path: Path) -> list[Path]:
    files = siim_files()
    assert len(files) == SIIM_COUNT
    return files


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A deterministic untrained model artifact, so analysis runs without training."""
    from ai.testing import build_tiny_artifact

    return build_tiny_artifact(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture
def config_file(tmp_path: Path) -> Callable[..., Path]:
    """Write a config.toml from the shipped defaults with {section: {key: value}} overrides."""

    def make(overrides: dict[str, Any] | None = None, name: str = "config.toml") -> Path:
        return write_config(tmp_path / name, overrides)

    return make


def _stop_all(nodes: list[NodeProcess]) -> None:
    failures = []
    for node in nodes:
        if node.stopped:
            continue
        code = node.stop(signal.SIGTERM)
        if code != 0:
            failures.append(f"port {node.port} exited {code}:\n{node.log_text()[-3000:]}")
    assert not failures, "node did not stop cleanly on SIGTERM: " + "\n".join(failures)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[StartNode]:
    """start(overrides=None, name="node", preexec_fn=None) -> a running NodeProcess."""
    started: list[NodeProcess] = []

    def start(
        overrides: dict[str, Any] | None = None,
        name: str = "node",
        preexec_fn: Callable[[], None] | None = None,
    ) -> NodeProcess:
        node = start_node(tmp_path / name, overrides, preexec_fn=preexec_fn)
        started.append(node)
        return node

    yield start
    _stop_all(started)


@pytest.fixture
def node(node_factory: StartNode) -> NodeProcess:
    """A node with the default configuration (analysis off) on a free port."""
    return node_factory()


@pytest.fixture(scope="session")
def siim_node(tmp_path_factory: pytest.TempPathFactory, siim_path: Path) -> Iterator[NodeProcess]:
    """A node holding all 200 SIIM images, for read-only tests (C-FIND) to share."""
    node = start_node(tmp_path_factory.mktemp("siim_node"))
    try:
        result = storescu(node, [siim_path / "train"])
        assert result.returncode == 0, result.stderr
        assert count_instances(node.db_url) == SIIM_COUNT
        yield node
    finally:
        _stop_all([node])


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the PostgreSQL test server (PNEUMONODE_TEST_POSTGRES_URL),
    dropped afterwards; the test is skipped without that server."""
    server_url = os.environ.get("PNEUMONODE_TEST_POSTGRES_URL", "")
    if not server_url:
        pytest.skip("PNEUMONODE_TEST_POSTGRES_URL not set")
    name = f"pneumonode_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
