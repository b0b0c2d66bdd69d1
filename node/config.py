"""Load and validate config.toml.

Every key has its documented default in the embedded defaults (node/defaults.toml); a config
file sets only what it changes and is merged over them key by key, so a release that adds a
key keeps every deployed config file working. The node still refuses a config it does not
fully understand: a typo in a key would otherwise silently fall back to a default and, say,
expose the node on every interface. Every section and key is declared once here, with its
type and check; the messages name the offending key as `section.key`.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai.analysis.methods import METHOD_NAMES

DEFAULT_CONFIG_NAME = "config.toml"


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has an unknown or wrong key."""


@dataclass(frozen=True)
class Peer:
    """A remote AE: who may call the node and where its results can be delivered."""

    ae_title: str
    host: str
    port: int
    # Accept this AE title from any address, not only from `host`'s addresses.
    any_address: bool = False
    # Send to this peer over DICOM TLS (the [tls] certificate, key and CA bundle).
    tls: bool = False


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str
    bind_address: str
    port: int
    max_associations: int
    max_pdu: int
    accept_unknown_callers: bool
    network_timeout: float
    require_called_ae_title: bool
    association_request_timeout: float
    max_associations_per_address: int
    relational_queries: bool
    processes: int
    # Give a presentation context to any SOP class UID the node does not know when it is
    # offered under a storage transfer syntax, and store it like any other instance.
    accept_unknown_sop_classes: bool = False
    # Associations callers that are not [[peers]] may hold together (the rest are kept for
    # peers); as loaded, at most max_associations, and all of them with no [[peers]].
    max_unknown_associations: int = 15


@dataclass(frozen=True)
class StorageSettings:
    folder: Path
    database_url: str
    duplicate_policy: str
    fsync: bool
    max_instance_mib: int
    verify_pixels: bool
    identity_conflicts: str
    quarantine_orphans: bool


@dataclass(frozen=True)
class QuerySettings:
    # Most matches one C-FIND answers (0 = no limit); past it the query ends with 0xA700.
    max_results: int = 0


@dataclass(frozen=True)
class MetricsSettings:
    # Prometheus /metrics and the /health endpoints, on their own HTTP listener.
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9108


@dataclass(frozen=True)
class AnalysisSettings:
    enabled: bool
    run_in_serve: bool
    worker_processes: int
    model: Path
    device: str
    batch_size: int
    max_wait_seconds: float
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...]
    sc_transfer_syntax: str
    heatmap: str
    result_processes: int = 0
    demo_model: bool = True
    results: tuple[str, ...] = ("sr", "seg", "sc")


@dataclass(frozen=True)
class DeliverySettings:
    destination: str
    retry_initial_seconds: float
    retry_max_seconds: float
    max_attempts: int


@dataclass(frozen=True)
class TlsSettings:
    enabled: bool
    port: int
    plain_listener: bool
    certificate: Path | None
    private_key: Path | None
    ca_bundle: Path | None
    verify_clients: bool
    check_hostname: bool


@dataclass(frozen=True)
class Config:
    node: NodeSettings
    storage: StorageSettings
    analysis: AnalysisSettings
    delivery: DeliverySettings
    tls: TlsSettings
    peers: tuple[Peer, ...] = field(default_factory=tuple)
    query: QuerySettings = field(default_factory=QuerySettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: str = "<embedded defaults>"

    def peer(self, ae_title: str) -> Peer | None:
        """The peer with this AE title (compared without padding), or None."""
        wanted = ae_title.strip()
        return next((p for p in self.peers if p.ae_title == wanted), None)


# --- key checks -------------------------------------------------------------------------


def _ae_title(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: must be a non-empty string (an AE title)")
    title = value.strip()
    if len(title) > 16 or "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ConfigError(f"{key}: {value!r} is not a valid AE title (1-16 printable characters)")
    return title


def _string(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be a string, got {type(value).__name__}")
    return value


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _int_range(low: int, high: int):
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        if not low <= value <= high:
            raise ConfigError(f"{key}: {value} is outside {low}..{high}")
        return value

    return check


def _positive_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")
    return float(value)


def _non_negative_float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{key}: must be a number >= 0, got {value!r}")
    return float(value)


def _address(key: str, value: Any) -> str:
    text = _string(key, value).strip()
    if text in ("", "localhost"):
        return text or "0.0.0.0"
    try:
        ipaddress.ip_address(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not an IP address") from exc
    return text


def _host(key: str, value: Any) -> str:
    text = _string(key, value).strip()
    if not text:
        raise ConfigError(f"{key}: must not be empty")
    return text


def _choice(*allowed: str):
    def check(key: str, value: Any) -> str:
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value

    return check


def _device(key: str, value: Any) -> str:
    text = _string(key, value)
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise ConfigError(f"{key}: {value!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _string_list(upper: bool):
    def check(key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: must be a list of strings")
        return tuple(v.strip().upper() if upper else v for v in value)

    return check


def _result_kinds(key: str, value: Any) -> tuple[str, ...]:
    """A list of result kinds this installation has (`ai/results/<name>/kind.py`), each once."""
    from ai.results.kind import available_kinds

    names = _string_list(upper=False)(key, value)
    known = available_kinds()
    for name in names:
        if name not in known:
            raise ConfigError(f"{key}: {name!r} is not a result kind; known: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: lists a kind twice")
    return names


_PORT = _int_range(1, 65535)
_PORT_OR_ZERO = _int_range(0, 65535)

_SCHEMA: dict[str, dict[str, Any]] = {
    "node": {
        "ae_title": _ae_title,
        "bind_address": _address,
        "port": _int_range(0, 65535),
        "max_associations": _int_range(1, 1000),
        "max_pdu": _int_range(0, 2**32 - 1),
        "accept_unknown_callers": _bool,
        "network_timeout": _positive_float,
        "require_called_ae_title": _bool,
        "association_request_timeout": _positive_float,
        "max_associations_per_address": _int_range(1, 1000),
        "relational_queries": _bool,
        "processes": _int_range(0, 256),
        "accept_unknown_sop_classes": _bool,
        "max_unknown_associations": _int_range(0, 1000),
    },
    "storage": {
        "folder": _string,
        "database_url": _string,
        "duplicate_policy": _choice("replace", "keep-first"),
        "fsync": _bool,
        "max_instance_mib": _int_range(1, 1 << 20),
        "verify_pixels": _bool,
        "identity_conflicts": _choice("refuse", "accept"),
        "quarantine_orphans": _bool,
    },
    "query": {
        "max_results": _int_range(0, 2**31 - 1),
    },
    "analysis": {
        "enabled": _bool,
        "run_in_serve": _bool,
        "worker_processes": _int_range(1, 64),
        "model": _string,
        "device": _device,
        "batch_size": _int_range(1, 4096),
        "max_wait_seconds": _non_negative_float,
        "modalities": _string_list(upper=True),
        "body_parts": _string_list(upper=True),
        "sc_transfer_syntax": _choice("uncompressed", "jpeg-baseline"),
        "heatmap": _choice("auto", *METHOD_NAMES),
        "result_processes": _int_range(0, 256),
        "demo_model": _bool,
        "results": _result_kinds,
    },
    "delivery": {
        "destination": _string,
        "retry_initial_seconds": _positive_float,
        "retry_max_seconds": _positive_float,
        "max_attempts": _int_range(0, 1_000_000),
    },
    "metrics": {
        "enabled": _bool,
        "address": _address,
        "port": _PORT_OR_ZERO,
    },
    "tls": {
        "enabled": _bool,
        "port": _PORT_OR_ZERO,
        "plain_listener": _bool,
        "certificate": _string,
        "private_key": _string,
        "ca_bundle": _string,
        "verify_clients": _bool,
        "check_hostname": _bool,
    },
}

_PEER_SCHEMA: dict[str, Any] = {"ae_title": _ae_title, "host": _host, "port": _PORT}
# Keys a [[peers]] entry may leave out, with what they mean then.
_PEER_OPTIONAL: dict[str, tuple[Any, Any]] = {"any_address": (_bool, False), "tls": (_bool, False)}


def _check_section(
    name: str,
    table: Any,
    schema: dict[str, Any],
    optional: dict[str, tuple[Any, Any]] | None = None,
) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{name}: must be a table")
    optional = optional or {}
    unknown = sorted(set(table) - set(schema) - set(optional))
    if unknown:
        raise ConfigError(f"{name}.{unknown[0]}: unknown key")
    missing = [k for k in schema if k not in table]
    if missing:  # a [[peers]] entry's required keys, or a key the defaults lack
        raise ConfigError(f"{name}.{missing[0]}: missing key")
    checked = {k: check(f"{name}.{k}", table[k]) for k, check in schema.items()}
    for key, (check, default) in optional.items():
        checked[key] = check(f"{name}.{key}", table[key]) if key in table else default
    return checked


@functools.cache
def _default_data() -> dict[str, Any]:
    """The embedded defaults as parsed TOML (read once; callers must not modify it)."""
    return tomllib.loads(default_config_text())


def merge_over_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A config file's document merged over the embedded defaults, key by key.

    An absent section is all defaults; a present one keeps the defaults of the keys it
    leaves out. `[[peers]]` (or `peers = []`) in the file replaces the default peers list
    as a whole: peers are entries, not keys, and merging them would keep a peer the file
    meant to drop.
    """
    unknown = sorted(set(data) - set(_SCHEMA) - {"peers"})
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section")
    defaults = _default_data()
    merged: dict[str, Any] = {}
    for name in _SCHEMA:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{name}: must be a table")
        merged[name] = {**defaults.get(name, {}), **table}
    merged["peers"] = data["peers"] if "peers" in data else list(defaults.get("peers", []))
    return merged


def _unknown_associations(node: dict[str, Any], peers: bool) -> int:
    """The slots callers that are not [[peers]] may hold: at most max_associations - 1, so
    that peers always find one (a file that lowers max_associations alone keeps working);
    with no [[peers]] there is nobody to keep slots for."""
    total = node["max_associations"]
    if not peers:
        return total
    return min(node["max_unknown_associations"], total - 1)


def parse_config(data: dict[str, Any], base_dir: Path, source: str) -> Config:
    """Validate a parsed TOML document merged over the embedded defaults; relative paths
    are resolved against base_dir."""
    data = merge_over_defaults(data)
    sections = {name: _check_section(name, data[name], schema) for name, schema in _SCHEMA.items()}
    raw_peers = data["peers"]
    if not isinstance(raw_peers, list):
        raise ConfigError("peers: must be an array of tables ([[peers]])")
    peers = tuple(
        Peer(**_check_section(f"peers[{i}]", p, _PEER_SCHEMA, _PEER_OPTIONAL))
        for i, p in enumerate(raw_peers)
    )
    titles = [p.ae_title for p in peers]
    duplicate = next((t for t in titles if titles.count(t) > 1), None)
    if duplicate:
        raise ConfigError(f"peers: AE title {duplicate!r} is listed twice")

    if not sections["node"]["accept_unknown_callers"] and not peers:
        raise ConfigError(
            "node.accept_unknown_callers: false with no [[peers]] would reject every caller"
        )
    node = sections["node"]
    if node["max_associations_per_address"] > node["max_associations"]:
        raise ConfigError("node.max_associations_per_address: must be <= node.max_associations")
    node["max_unknown_associations"] = _unknown_associations(node, bool(peers))
    storage = sections["storage"]
    folder = (base_dir / storage["folder"]).resolve()
    analysis = sections["analysis"]
    delivery = sections["delivery"]
    if delivery["destination"] and delivery["destination"] not in titles:
        raise ConfigError(
            f"delivery.destination: {delivery['destination']!r} is not the AE title of a [[peers]]"
        )
    if delivery["retry_max_seconds"] < delivery["retry_initial_seconds"]:
        raise ConfigError("delivery.retry_max_seconds: must be >= delivery.retry_initial_seconds")
    return Config(
        node=NodeSettings(**sections["node"]),
        storage=StorageSettings(
            **{
                **storage,
                "folder": folder,
                "database_url": storage["database_url"] or f"sqlite:///{folder / 'index.sqlite'}",
            }
        ),
        analysis=AnalysisSettings(**{**analysis, "model": (base_dir / analysis["model"])}),
        delivery=DeliverySettings(**delivery),
        tls=_tls_settings(sections["tls"], base_dir, peers),
        peers=peers,
        query=QuerySettings(**sections["query"]),
        metrics=MetricsSettings(**sections["metrics"]),
        source=source,
    )


def _tls_settings(tls: dict[str, Any], base_dir: Path, peers: tuple[Peer, ...]) -> TlsSettings:
    """The [tls] section with its files resolved; what TLS needs is checked here, at start."""
    files = {}
    for key in ("certificate", "private_key", "ca_bundle"):
        text = tls[key].strip()
        path = (base_dir / text).resolve() if text else None
        if path is not None and not path.is_file():
            raise ConfigError(f"tls.{key}: {path} is not a file")
        files[key] = path
    if tls["enabled"] and (files["certificate"] is None or files["private_key"] is None):
        raise ConfigError("tls.certificate: a TLS listener needs a certificate and a private key")
    if tls["verify_clients"] and files["ca_bundle"] is None:
        raise ConfigError("tls.ca_bundle: verify_clients needs the CA bundle to verify against")
    if any(peer.tls for peer in peers) and files["ca_bundle"] is None:
        raise ConfigError("tls.ca_bundle: a [[peers]] entry with tls = true needs a CA bundle")
    return TlsSettings(**{**tls, **files})


def default_config_text() -> str:
    """The documented defaults shipped inside the package (identical to ./config.toml)."""
    # Next to this module rather than importlib.resources: under an editable install
    # `node` can resolve to a namespace-like multiplexed path that resources rejects.
    return (Path(__file__).parent / "defaults.toml").read_text(encoding="utf-8")


def load_config(path: str | Path | None) -> Config:
    """Load `path`; None means ./config.toml if present, else the embedded defaults."""
    if path is None:
        candidate = Path(DEFAULT_CONFIG_NAME)
        if not candidate.is_file():
            return parse_config({}, Path.cwd(), "<embedded defaults>")
        path = candidate
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, path.resolve().parent, str(path))


def effective_data(config: Config) -> dict[str, Any]:
    """Every key of `config` with its effective value, as a TOML document's tables: what
    `config-check --show` prints, and a file that loads back to the same configuration."""
    data: dict[str, Any] = {}
    for name, schema in _SCHEMA.items():
        settings = getattr(config, name)
        table = {}
        for key in schema:
            value = getattr(settings, key)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Path):
                value = str(value)
            elif value is None:  # an unset [tls] file
                value = ""
            table[key] = value
        data[name] = table
    data["peers"] = [
        {"ae_title": p.ae_title, "host": p.host, "port": p.port}
        | {key: getattr(p, key) for key in _PEER_OPTIONAL}
        for p in config.peers
    ]
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string, ASCII-escaped, is a valid TOML basic string.
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def effective_toml(config: Config) -> str:
    """The effective configuration as TOML text: every key, paths resolved, the peers."""
    data = effective_data(config)
    peers = data.pop("peers")
    lines = [f"# Effective configuration of {config.source}: every key, paths resolved."]
    if not peers:  # top-level keys come before the first table
        lines.append("peers = []")
    for name, table in data.items():
        lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    for peer in peers:
        lines += ["", "[[peers]]"] + [f"{k} = {_toml_value(v)}" for k, v in peer.items()]
    return "\n".join(lines) + "\n"
