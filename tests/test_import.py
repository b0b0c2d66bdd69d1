"""`pneumonode import DIR`: the same rules as C-STORE, a progress bar and a summary."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from dicom_data import file_bytes
from pydicom import dcmread
from sqlalchemy import create_engine, func, select

from node.testing.config_files import write_config
from node.testing.node_process import node_command, node_env
from node.testing.samples import small_image
from storage.models import Instance


def test_import_folder_with_dicom_and_other_files(tmp_path: Path, siim_dicom_files) -> None:
    source = tmp_path / "incoming"
    (source / "deep" / "er").mkdir(parents=True)
    for path in siim_dicom_files[:10]:
        shutil.copy(path, source / "deep" / "er" / path.name)
    shutil.copy(siim_dicom_files[0], source / "copy-of-the-first.dcm")  # a duplicate
    (source / "notes.txt").write_text("not DICOM")
    (source / "small.dcm").write_bytes(file_bytes(small_image()))
    whole = siim_dicom_files[10].read_bytes()
    (source / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    no_uid = small_image()
    del no_uid.SOPInstanceUID
    (source / "no-uid.dcm").write_bytes(file_bytes(no_uid))
    bad_uid = small_image()
    bad_uid.StudyInstanceUID = "../../escape"
    (source / "bad-uid.dcm").write_bytes(file_bytes(bad_uid))

    storage = tmp_path / "storage"
    config = write_config(
        tmp_path / "config.toml",
        {"storage": {"folder": str(storage), "fsync": False}, "analysis": {"enabled": False}},
    )
    result = subprocess.run(
        node_command(config, "import", str(source), "--list-skipped"),
        env=node_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr  # three DICOM files were refused
    assert "pneumonode import: 3 file(s) refused" in result.stderr
    out = result.stdout
    for count in ("stored: 11", "replaced: 1", "skipped: 4"):
        assert re.search(rf"\b{count}\b", out), (count, out)
    assert "skipped: 4 (3 refused, 1 not DICOM instances)" in out
    assert "not a DICOM file (no DICM prefix)" in out
    assert "cannot parse" in out
    assert "SOPInstanceUID is missing" in out
    assert "StudyInstanceUID '../../escape' is not a valid DICOM UID" in out
    assert "skipped " + str(source / "notes.txt") in out
    assert "100%" in result.stderr  # the progress bar

    engine = create_engine(f"sqlite:///{storage / 'index.sqlite'}")
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Instance)) == 11
        paths = conn.scalars(select(Instance.file_path)).all()
    engine.dispose()
    for relative in paths:
        assert dcmread(storage / "files" / relative).SOPInstanceUID in relative
    assert not (tmp_path / "escape").exists()


def _import(tmp_path: Path, source: Path) -> subprocess.CompletedProcess:
    config = write_config(
        tmp_path / "config.toml",
        {"storage": {"folder": str(tmp_path / "storage"), "fsync": False}},
    )
    return subprocess.run(
        node_command(config, "import", str(source), "--no-progress"),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_exit_status_says_whether_anything_was_left_behind(tmp_path: Path) -> None:
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "a.dcm").write_bytes(file_bytes(small_image()))
    (source / "README.txt").write_text("not DICOM: skipped, not refused")
    result = _import(tmp_path, source)
    assert result.returncode == 0, result.stderr
    assert "skipped: 1 (0 refused, 1 not DICOM instances)" in result.stdout

    no_uid = small_image()
    del no_uid.SOPInstanceUID
    (source / "no-uid.dcm").write_bytes(file_bytes(no_uid))
    result = _import(tmp_path, source)
    assert result.returncode == 1
    assert "1 file(s) refused (--list-skipped names them)" in result.stderr

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "notes.txt").write_text("no instance here")
    result = _import(tmp_path, nothing)
    assert result.returncode == 1
    assert f"no DICOM instance in {nothing}" in result.stderr
    usage = subprocess.run(
        node_command(tmp_path / "config.toml", "import", "--help"),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "1 when any file was refused" in " ".join(usage.split())
