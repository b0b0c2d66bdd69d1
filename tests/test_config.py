"""Configuration: a wrong or missing key is refused with one line naming it (exit 2)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import DEFAULTS_TOML, REPO_ROOT, node_command, node_env, write_config

from node.process.cli import EXIT_CONFIG_ERROR, main


def test_shipped_config_is_the_embedded_default() -> None:
    assert (REPO_ROOT / "config.toml").read_text() == DEFAULTS_TOML.read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"node": {"port": "eleven"}}, "node.port: must be an integer"),
        ({"node": {"port": 70000}}, "node.port: 70000 is outside"),
        ({"node": {"ae_title": None}}, "node.ae_title: missing key"),
        ({"node": {"ae_title": "A_TITLE_MUCH_TOO_LONG"}}, "node.ae_title:"),
        ({"node": {"bind_address": "every-interface"}}, "node.bind_address:"),
        ({"storage": {"duplicat_policy": "replace"}}, "storage.duplicat_policy: unknown key"),
        ({"storage": {"duplicate_policy": "newest"}}, "storage.duplicate_policy:"),
        ({"storage": {"fsync": "yes"}}, "storage.fsync: must be true or false"),
        ({"peers": [{"ae_title": "PACS", "host": "pacs"}]}, "peers[0].port: missing key"),
        (
            {"node": {"accept_unknown_callers": False}, "peers": []},
            "node.accept_unknown_callers:",
        ),
        ({"node": {"max_associations_per_address": 30}}, "node.max_associations_per_address:"),
        ({"storage": {"identity_conflicts": "merge"}}, "storage.identity_conflicts:"),
        ({"tls": {"enabled": True}}, "tls.certificate: a TLS listener needs a certificate"),
        ({"tls": {"ca_bundle": "/nonexistent/ca.pem"}}, "tls.ca_bundle: /nonexistent/ca.pem"),
        ({"tls": {"verify_clients": True}}, "tls.ca_bundle: verify_clients needs"),
        (
            {"peers": [{"ae_title": "PACS", "host": "pacs", "port": 104, "tls": True}]},
            "tls.ca_bundle: a [[peers]] entry with tls = true needs",
        ),
        (
            {"peers": [{"ae_title": "PACS", "host": "pacs", "port": 104, "tls": "yes"}]},
            "peers[0].tls: must be true or false",
        ),
    ],
)
def test_bad_key_is_named(tmp_path: Path, capsys, overrides, message) -> None:
    path = write_config(tmp_path / "config.toml", overrides)
    assert main(["config-check", "--config", str(path)]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert message in err


def test_missing_file_and_bad_toml(tmp_path: Path, capsys) -> None:
    assert main(["config-check", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[node\nport = 1")
    assert main(["config-check", "--config", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_without_config_file_the_embedded_defaults_are_used(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["config-check"]) == 0
    out = capsys.readouterr().out
    assert "<embedded defaults>" in out and "PNEUMONODE" in out and "11112" in out


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", {"node": {"max_pdu": -1}})
    result = subprocess.run(
        node_command(path), env=node_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_CONFIG_ERROR
    assert result.stderr.strip().splitlines() == [
        "pneumonode: configuration error: node.max_pdu: -1 is outside 0..4294967295"
    ]
