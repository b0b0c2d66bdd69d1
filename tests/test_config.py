"""Configuration: a file sets only what it changes, over the embedded defaults; an unknown
key, a wrong type or a bad value is refused with one line naming it (exit 2); and the config
file of every earlier release still starts the current node."""

from __future__ import annotations

import re
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from support import REPO_ROOT

from node.config import effective_data, load_config, parse_config
from node.process.cli import EXIT_CONFIG_ERROR, main
from node.testing.config_files import DEFAULTS_TOML, write_config
from node.testing.dcmtk import echo
from node.testing.node_process import node_command, node_env

# The config.toml of each earlier release, as `git show <hash>:config.toml` of the commits
# that changed it: ae7dcae is the first; e289c38 is also the file of 529bd48 (stop 14).
RELEASE_CONFIGS = sorted((REPO_ROOT / "tests" / "fixtures" / "configs").glob("config-*.toml"))
LISTENING = re.compile(r"listening as (\S+) on ([0-9.]+):(\d+)")


def _check(path: Path, capsys, *flags: str) -> tuple[int, str, str]:
    """`pneumonode config-check` on `path`: exit status, stdout, stderr."""
    code = main(["config-check", "--config", str(path), *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _defaults_in(folder: Path) -> dict:
    """The embedded defaults' effective values, relative paths resolved against `folder`."""
    return effective_data(parse_config({}, folder, "<embedded defaults>"))


def test_shipped_config_is_the_embedded_default() -> None:
    assert (REPO_ROOT / "config.toml").read_text() == DEFAULTS_TOML.read_text()


def test_every_key_has_its_default_in_the_embedded_defaults(tmp_path: Path) -> None:
    shipped = tomllib.loads(DEFAULTS_TOML.read_text(encoding="utf-8"))
    effective = _defaults_in(tmp_path)
    for name, table in effective.items():
        if name != "peers":
            assert set(shipped[name]) == set(table), name


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    shipped = tmp_path / "shipped.toml"
    shipped.write_text(DEFAULTS_TOML.read_text(encoding="utf-8"))
    assert effective_data(load_config(empty)) == _defaults_in(tmp_path)
    assert effective_data(load_config(shipped)) == _defaults_in(tmp_path)


def test_a_file_sets_only_what_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[node]\nport = 11113\n")
    loaded = effective_data(load_config(path))
    expected = _defaults_in(tmp_path)
    expected["node"]["port"] = 11113
    assert loaded == expected
    assert [p.ae_title for p in load_config(path).peers] == ["ORTHANC"]


@pytest.mark.parametrize(
    ("text", "peers"),
    [
        ("", ["ORTHANC"]),
        ('[[peers]]\nae_title = "PACS"\nhost = "pacs"\nport = 104\n', ["PACS"]),
        ("peers = []\n", []),
    ],
)
def test_peers_in_a_file_replace_the_default_peers(tmp_path: Path, text, peers) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert [p.ae_title for p in load_config(path).peers] == peers


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[node]\nport = "eleven"', "node.port: must be an integer"),
        ("[node]\nport = 70000", "node.port: 70000 is outside"),
        ("[node]\nprot = 11113", "node.prot: unknown key"),
        ('[node]\nae_title = ""', "node.ae_title: must be a non-empty string"),
        ('[node]\nae_title = "A_TITLE_MUCH_TOO_LONG"', "node.ae_title:"),
        ('[node]\nbind_address = "every-interface"', "node.bind_address:"),
        ("[nodes]\nport = 11113", "nodes: unknown section"),
        ("node = 5", "node: must be a table"),
        ('[storage]\nduplicat_policy = "replace"', "storage.duplicat_policy: unknown key"),
        ('[storage]\nduplicate_policy = "newest"', "storage.duplicate_policy:"),
        ('[storage]\nfsync = "yes"', "storage.fsync: must be true or false"),
        ('[storage]\nidentity_conflicts = "merge"', "storage.identity_conflicts:"),
        ('[analysis]\nmodalities = "CR"', "analysis.modalities: must be a list of strings"),
        ("[query]\nmax_results = -1", "query.max_results: -1 is outside"),
        ('[[peers]]\nae_title = "PACS"\nhost = "pacs"', "peers[0].port: missing key"),
        ("peers = 5", "peers: must be an array of tables"),
        ("peers = []\n[node]\naccept_unknown_callers = false", "node.accept_unknown_callers:"),
        ("[node]\nmax_associations_per_address = 30", "node.max_associations_per_address:"),
        ("[node]\nmax_unknown_associations = -1", "node.max_unknown_associations: -1"),
        (
            "[delivery]\nretry_initial_seconds = 500.0",
            "delivery.retry_max_seconds: must be >= delivery.retry_initial_seconds",
        ),
        ('[delivery]\ndestination = "PACS"', "delivery.destination: 'PACS' is not the AE"),
        ("[tls]\nenabled = true", "tls.certificate: a TLS listener needs a certificate"),
        ('[tls]\nca_bundle = "/nonexistent/ca.pem"', "tls.ca_bundle: /nonexistent/ca.pem"),
        ("[tls]\nverify_clients = true", "tls.ca_bundle: verify_clients needs"),
        (
            '[[peers]]\nae_title = "PACS"\nhost = "pacs"\nport = 104\ntls = true',
            "tls.ca_bundle: a [[peers]] entry with tls = true needs",
        ),
        (
            '[[peers]]\nae_title = "PACS"\nhost = "pacs"\nport = 104\ntls = "yes"',
            "peers[0].tls: must be true or false",
        ),
    ],
)
def test_bad_key_is_named(tmp_path: Path, capsys, text, message) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    code, _, err = _check(path, capsys)
    assert code == EXIT_CONFIG_ERROR
    assert len(err.strip().splitlines()) == 1
    assert message in err


@pytest.mark.parametrize(
    ("text", "unknown"),
    [
        ("", 15),  # the default, with the default [[peers]]
        ("[node]\nmax_associations = 5\nmax_associations_per_address = 5", 4),
        ("peers = []\n[node]\nmax_associations = 5\nmax_associations_per_address = 5", 5),
        ("[node]\nmax_unknown_associations = 0", 0),
        ("[node]\nmax_unknown_associations = 20", 19),  # peers keep at least one
    ],
)
def test_unknown_callers_leave_slots_for_peers(tmp_path: Path, text, unknown) -> None:
    """A default that does not fit a small max_associations keeps one slot for peers; with
    no [[peers]] there is nobody to keep slots for."""
    path = tmp_path / "config.toml"
    path.write_text(text + "\n")
    assert load_config(path).node.max_unknown_associations == unknown


def test_a_cross_key_check_sees_the_defaults(tmp_path: Path, capsys) -> None:
    # The default peer keeps a file that refuses unknown callers valid; dropping it does not.
    path = tmp_path / "config.toml"
    path.write_text("[node]\naccept_unknown_callers = false\n")
    assert _check(path, capsys)[0] == 0


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


@pytest.mark.parametrize(
    "text",
    [
        "[node]\nport = 11113\n",
        'peers = []\n[storage]\nfolder = "archive"\n[analysis]\nmodalities = ["dx"]\n',
        '[[peers]]\nae_title = "PACS"\nhost = "pacs.example"\nport = 104\nany_address = true\n'
        '[[peers]]\nae_title = "VIEWER"\nhost = "10.0.0.7"\nport = 11112\n'
        '[delivery]\ndestination = "VIEWER"\n[node]\nae_title = "NODE \\"X\\""\n',
    ],
)
def test_show_prints_the_effective_configuration_and_reads_back(
    tmp_path: Path, capsys, text
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    code, out, _ = _check(path, capsys, "--show")
    assert code == 0
    ok_line, _, shown = out.partition("\n")
    assert ok_line == f"{path}: OK"
    data = tomllib.loads(shown)
    expected = effective_data(load_config(path))
    assert data == expected
    # Every key is there, and the paths are resolved.
    assert {k: set(v) for k, v in data.items() if k != "peers"} == {
        k: set(v) for k, v in _defaults_in(tmp_path).items() if k != "peers"
    }
    assert Path(data["storage"]["folder"]).is_absolute()
    assert Path(data["analysis"]["model"]).is_absolute()
    # Fed back from another folder, it is the same configuration.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = elsewhere / "shown.toml"
    again.write_text(shown)
    code, out, _ = _check(again, capsys, "--show")
    assert code == 0
    assert tomllib.loads(out.partition("\n")[2]) == expected


def test_without_show_the_summary_is_printed(tmp_path: Path, capsys) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[node]\nport = 11113\n")
    code, out, _ = _check(path, capsys)
    assert code == 0
    assert out.splitlines() == [
        f"{path}: OK",
        "  AE title PNEUMONODE on 0.0.0.0:11113",
        f"  storage {tmp_path / 'var' / 'pneumonode'}",
        f"  index sqlite:///{tmp_path / 'var' / 'pneumonode' / 'index.sqlite'}",
        "  peers: ORTHANC",
        "  metrics http://127.0.0.1:9108",
    ]


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", {"node": {"max_pdu": -1}})
    result = subprocess.run(
        node_command(path), env=node_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == EXIT_CONFIG_ERROR
    assert result.stderr.strip().splitlines() == [
        "pneumonode: configuration error: node.max_pdu: -1 is outside 0..4294967295"
    ]


def _listening_port(process: subprocess.Popen, log_path: Path, timeout: float) -> tuple[str, int]:
    """The AE title and port from the node's "listening as <AE> on <host>:<port>" line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(log_path.read_text(encoding="utf-8", errors="replace"))
        if match:
            return match.group(1), int(match.group(3))
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    process.wait()
    raise AssertionError(f"no listening line:\n{log_path.read_text(errors='replace')}")


def test_release_configs_are_all_kept() -> None:
    assert len(RELEASE_CONFIGS) >= 7
    names = {p.name for p in RELEASE_CONFIGS}
    assert {"config-ae7dcae.toml", "config-e289c38.toml"} <= names


@pytest.mark.parametrize("release_config", RELEASE_CONFIGS, ids=lambda p: p.stem)
def test_an_earlier_release_config_starts_the_node(
    tmp_path: Path, capsys, release_config: Path
) -> None:
    """The file as that release shipped it, only the port (0: the node picks one and logs
    it), the address and the storage folder overridden on the command line."""
    assert _check(release_config, capsys)[0] == 0
    ae_title = load_config(release_config).node.ae_title
    log_path = tmp_path / "node.log"
    overrides = ("--port", "0", "--bind", "127.0.0.1", "--storage", str(tmp_path / "storage"))
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(
            node_command(release_config, "serve", *overrides),
            cwd=tmp_path,
            env=node_env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        listening_as, port = _listening_port(process, log_path, timeout=60)
        assert listening_as == ae_title
        assert echo("127.0.0.1", port, ae_title)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, log_path.read_text(errors="replace")
