"""A valid config file that cannot start on this host: `config-check` says so, and `serve`
exits at once with one line naming the key and the cause (exit status 5), no traceback and
no restart loop; serve processes that fail at start anyway are restarted a bounded number
of times, then the node stops with their reason."""

from __future__ import annotations

import dataclasses
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from tls_support import Pki, make_pki

from node.config import load_config
from node.process import serve_processes
from node.process.cli import EXIT_START_FAILED, main
from node.process.serve_processes import MAX_START_FAILURES, ServeProcesses, serve
from node.process.start_checks import StartError
from node.testing.config_files import write_config
from node.testing.node_process import node_command, node_env

# Well under a restart loop's pace: serve must refuse before it spawns anything.
SERVE_TIMEOUT_SECONDS = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _config(tmp_path: Path, **sections: dict) -> Path:
    base = {
        "node": {"port": 0, "bind_address": "127.0.0.1", "processes": 2},
        "storage": {"folder": str(tmp_path / "storage"), "fsync": False},
        "analysis": {"enabled": False},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return write_config(tmp_path / "config.toml", base)


def _tls(certificate: Path, key: Path, ca: Path | None = None) -> dict:
    return {
        "enabled": True,
        "port": 0,
        "certificate": str(certificate),
        "private_key": str(key),
        **({"ca_bundle": str(ca)} if ca else {}),
    }


def _refused(path: Path, capsys, cause: str) -> None:
    """config-check and serve both refuse `path` with one line naming `cause`."""
    assert main(["config-check", "--config", str(path)]) == EXIT_START_FAILED
    checked = capsys.readouterr()
    assert checked.out == ""
    assert checked.err.splitlines() == [checked.err.strip()]
    assert cause in checked.err
    assert main(["config-check", "--file-only", "--config", str(path)]) == 0
    capsys.readouterr()
    result = subprocess.run(
        node_command(path),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=SERVE_TIMEOUT_SECONDS,
    )
    assert result.returncode == EXIT_START_FAILED, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pneumonode: cannot start: ")
    assert cause in lines[0]
    assert "Traceback" not in result.stderr


def test_garbage_pem_certificate(tmp_path: Path, capsys) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    path = _config(tmp_path, tls=_tls(garbage, garbage))
    _refused(path, capsys, "tls.certificate/tls.private_key")


def test_key_of_another_certificate(tmp_path: Path, capsys, pki: Pki) -> None:
    path = _config(tmp_path, tls=_tls(pki.node.certificate, pki.client.key))
    _refused(path, capsys, "tls.certificate/tls.private_key")


def test_garbage_ca_bundle(tmp_path: Path, capsys, pki: Pki) -> None:
    garbage = tmp_path / "ca.pem"
    garbage.write_text("garbage\n")
    path = _config(tmp_path, tls=_tls(pki.node.certificate, pki.node.key, garbage))
    _refused(path, capsys, "tls.ca_bundle")


def test_port_in_use(tmp_path: Path, capsys) -> None:
    """serve refuses a port in use; config-check warns and goes on, since checking the file
    of a running node (whose listener holds the port) is what an operator does before a
    restart."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        path = _config(tmp_path, node={"port": port})
        cause = f"node.port: port {port} on 127.0.0.1 is in use"
        assert main(["config-check", "--config", str(path)]) == 0
        checked = capsys.readouterr()
        assert checked.err.startswith(f"warning: {cause}") and "OK" in checked.out
        result = subprocess.run(
            node_command(path), env=node_env(), capture_output=True, text=True,
            timeout=SERVE_TIMEOUT_SECONDS,
        )
        assert result.returncode == EXIT_START_FAILED, result.stderr
        assert result.stderr.strip() == f"pneumonode: cannot start: {cause}"


def test_address_not_local(tmp_path: Path, capsys) -> None:
    # TEST-NET-1 (RFC 5737): never an address of this host.
    path = _config(tmp_path, node={"bind_address": "192.0.2.1"})
    _refused(path, capsys, "node.bind_address: 192.0.2.1 is not an address of this host")


def test_storage_folder_is_a_file(tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    path = _config(tmp_path, storage={"folder": str(afile)})
    _refused(path, capsys, f"storage.folder: {afile} is not a folder")


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("nonsense", "is not a database URL"),
        ("nodriver://host/db", "no driver for 'nodriver'"),
        ("sqlite:////nonexistent-folder/index.sqlite", "/nonexistent-folder (the index's folder)"),
        ("postgresql://someone:secret@127.0.0.1:1/db", "cannot connect to"),
    ],
)
def test_bad_database_url(tmp_path: Path, capsys, url: str, cause: str) -> None:
    path = _config(tmp_path, storage={"database_url": url})
    _refused(path, capsys, "storage.database_url: ")
    assert cause in main_error(path, capsys)


def main_error(path: Path, capsys) -> str:
    """What config-check says of `path` on stderr."""
    assert main(["config-check", "--config", str(path)]) == EXIT_START_FAILED
    return capsys.readouterr().err


def test_the_password_of_a_database_url_is_not_printed(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, storage={"database_url": "postgresql://someone:secret@127.0.0.1:1/db"})
    assert "secret" not in main_error(path, capsys)


def test_a_missing_storage_folder_that_can_be_made_is_fine(tmp_path: Path, capsys) -> None:
    path = _config(tmp_path, storage={"folder": str(tmp_path / "not" / "yet")})
    assert main(["config-check", "--config", str(path)]) == 0
    assert not (tmp_path / "not").exists()  # the check made nothing


def _serve_process_with_garbage_certificate(config, *args) -> None:
    """A serve process whose listener's certificate is garbage, as if the file had been
    replaced after the supervisor checked it: the real entry point fails as it starts."""
    garbage = Path(config.storage.folder).parent / "replaced.pem"
    tls = dataclasses.replace(
        config.tls, enabled=True, port=0, certificate=garbage, private_key=garbage
    )
    serve_processes._serve_process_main(dataclasses.replace(config, tls=tls), *args)


def test_serve_processes_that_fail_to_start_stop_the_node(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "replaced.pem").write_text("garbage\n")
    config = load_config(_config(tmp_path))
    monkeypatch.setattr(
        ServeProcesses, "process_main", staticmethod(_serve_process_with_garbage_certificate)
    )
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    started = time.monotonic()
    try:
        with pytest.raises(StartError) as refused:
            serve(config)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    message = str(refused.value)
    assert f"failed to start {MAX_START_FAILURES} times in a row" in message
    assert "PEM" in message
    assert "\n" not in message
    assert time.monotonic() - started < 120
