"""`pneumonode sample-data DIR`: the sample data a user can get, fetched over HTTP from an
archive served on loopback (standing in for fastai's SIIM_SMALL URL), or taken from a local
archive or folder; the folder appears whole or not at all."""

from __future__ import annotations

import functools
import http.server
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from pydicom import dcmread

from ai.data.labelled import load_items
from node.testing.node_process import node_env
from node.testing.samples import small_image

LABELS = {"Pneumothorax": 2, "No Pneumothorax": 3}


def _sample_folder(root: Path) -> Path:
    """A small data set in SIIM_SMALL's layout: siim_small/labels.csv, train/<label>/*.dcm."""
    data = root / "siim_small"
    rows = ["file,label"]
    for label, count in LABELS.items():
        folder = data / "train" / label
        folder.mkdir(parents=True)
        for number in range(count):
            name = f"train/{label}/{label[:2]}{number:04d}.dcm"
            small_image(patient_id=f"P-{label[:2]}-{number}").save_as(
                data / name, enforce_file_format=True
            )
            rows.append(f"{name},{label}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    return data


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upstream")
    data = _sample_folder(root)
    path = root / "siim_small.tgz"
    with tarfile.open(path, "w:gz") as bundle:
        bundle.add(data, arcname="siim_small")
    return path


@pytest.fixture(scope="module")
def http_server(archive: Path) -> Iterator[str]:
    """A loopback HTTP server on a port it bound itself, serving the archive's folder."""
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(archive.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _sample_data(folder: Path, source: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.process.cli", "sample-data", str(folder),
         "--source", str(source)],
        env=node_env(), capture_output=True, text=True, timeout=120,
    )


def _assert_layout(folder: Path) -> None:
    items = load_items(folder)
    assert items["label"].value_counts().to_dict() == LABELS
    assert all(Path(path).is_file() for path in items["path"])
    assert not list(folder.parent.glob(f".{folder.name}-*")), "the work folder was left behind"


def test_downloads_and_unpacks_the_archive(tmp_path: Path, http_server: str) -> None:
    target = tmp_path / "data" / "siim_small"
    result = _sample_data(target, f"{http_server}/siim_small.tgz")
    assert result.returncode == 0, result.stderr
    assert f"5 images (3 No Pneumothorax, 2 Pneumothorax) without SIIM masks, fetched into " \
        f"{target}" in result.stdout
    _assert_layout(target)
    again = _sample_data(target, f"{http_server}/siim_small.tgz")
    assert again.returncode == 0 and "already in" in again.stdout


def test_a_missing_url_is_an_error_and_leaves_nothing(tmp_path: Path, http_server: str) -> None:
    target = tmp_path / "siim_small"
    result = _sample_data(target, f"{http_server}/nothing-here.tgz")
    assert result.returncode == 1
    assert "cannot download" in result.stderr and "HTTP 404" in result.stderr
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_broken_archive_is_refused_and_leaves_nothing(tmp_path: Path, archive: Path) -> None:
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    target = tmp_path / "siim_small"
    result = _sample_data(target, broken)
    assert result.returncode == 1
    assert "not a readable archive" in result.stderr
    assert not target.exists()


def test_an_archive_without_labels_is_refused(tmp_path: Path) -> None:
    bundle_path = tmp_path / "other.zip"
    with zipfile.ZipFile(bundle_path, "w") as bundle:
        bundle.writestr("other/readme.txt", "no data here")
    result = _sample_data(tmp_path / "siim_small", bundle_path)
    assert result.returncode == 1 and "no labels.csv" in result.stderr


def test_takes_a_local_archive_or_folder(tmp_path: Path, archive: Path) -> None:
    from_archive = tmp_path / "a"
    assert _sample_data(from_archive, archive).returncode == 0
    _assert_layout(from_archive)
    from_folder = tmp_path / "b"
    folder = _sample_folder(tmp_path / "src")
    (folder / "train-rle.csv").write_text("ImageId,EncodedPixels\n")
    result = _sample_data(from_folder, folder)
    assert result.returncode == 0, result.stderr
    assert "with SIIM masks" in result.stdout
    _assert_layout(from_folder)
    assert (from_folder / "train-rle.csv").is_file()


def test_an_archive_without_masks_gets_the_shipped_siim_masks(tmp_path: Path) -> None:
    """fastai's archive has labels but no masks: the rows of its SIIM images are added."""
    folder = _sample_folder(tmp_path / "src")
    siim_uid = "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"  # a SIIM image, no mask
    first = sorted((folder / "train" / "No Pneumothorax").glob("*.dcm"))[0]
    image = dcmread(first)
    image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID = siim_uid
    image.save_as(first, enforce_file_format=True)
    target = tmp_path / "siim_small"
    result = _sample_data(target, folder)
    assert result.returncode == 0, result.stderr
    assert "with SIIM masks" in result.stdout
    masks = pd.read_csv(target / "train-rle.csv.gz", dtype=str)
    assert masks.to_dict("records") == [{"ImageId": siim_uid, "EncodedPixels": "-1"}]


def test_refuses_a_folder_holding_something_else(tmp_path: Path, archive: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = _sample_data(target, archive)
    assert result.returncode == 1 and "holds something other" in result.stderr
    assert (target / "notes.txt").read_text() == "mine"
