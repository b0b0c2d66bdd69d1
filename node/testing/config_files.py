"""Configuration files for a node under test: the shipped defaults with overrides, as TOML."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULTS_TOML = Path(__file__).resolve().parents[1] / "defaults.toml"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        text = str(value).replace("\\", "\\\\").replace('"', '\\"')
        return f'"{text}"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: Mapping[str, Any]) -> str:
    """TOML text for the config's shape: tables of scalars/lists, and [[peers]]; an empty
    peers list is written `peers = []` (no peers), as leaving it out keeps the default's."""
    lines: list[str] = [f"{name} = []" for name, table in data.items() if table == []]
    for name, table in data.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{name}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                lines.append("")
            continue
        lines.append(f"[{name}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


def config_data(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The shipped defaults with `overrides` ({section: {key: value}}, or "peers": [...])
    applied; a value of None removes the key (it then takes its embedded default)."""
    data = tomllib.loads(DEFAULTS_TOML.read_text(encoding="utf-8"))
    # Nodes under test run side by side: their metrics listeners take any free port.
    data.setdefault("metrics", {})["port"] = 0
    for section, values in (overrides or {}).items():
        if section == "peers" or not isinstance(values, Mapping):
            data[section] = values
            continue
        table = data.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return data


def write_config(path: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    path.write_text(dump_toml(config_data(overrides)), encoding="utf-8")
    return path
