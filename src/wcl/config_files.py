"""Config files as wcl reads them: presets, ``base`` chains, ``section.key=value`` overrides.

A preset is a YAML file shipped in ``wcl/configs`` (or any YAML file); ``base:
other.yaml`` (relative to the file) starts from another one. Overrides are
``section.key=value`` strings whose value is read as YAML, with YAML 1.2's rules for
booleans and exponents (see :class:`_YamlLoader`). The result is nested dicts, which
:mod:`wcl.config` and :mod:`wcl.eval.config` turn into checked dataclasses.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "PRESET_DIR",
    "ConfigError",
    "apply_overrides",
    "preset_names",
    "preset_path",
    "read_config",
]

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def preset_names(folder: Path = PRESET_DIR, kind: str | None = None) -> list[str]:
    """Sorted names of the presets shipped in ``folder``; only the ``kind-*`` ones if given."""
    return sorted(p.stem for p in folder.glob(f"{kind}-*.yaml" if kind else "*.yaml"))


def preset_path(
    name_or_path: str | Path, folder: Path = PRESET_DIR, kind: str | None = None
) -> Path:
    """A YAML file path, or the name of a preset shipped in ``folder`` (default ``wcl/configs``).

    When it is neither, the ``ConfigError`` names the value and the shipped presets (only the
    ``kind-*`` ones, e.g. ``linear-*``, when ``kind`` is given).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = folder / f"{path.stem}.yaml"
    if shipped.is_file():
        return shipped
    shipped_kind = f"{kind} presets" if kind else "presets"
    raise ConfigError(
        f"config file {str(name_or_path)!r} not found; "
        f"shipped {shipped_kind}: {preset_names(folder, kind)}"
    )


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        both = isinstance(out.get(key), dict) and isinstance(value, dict)
        out[key] = _merge(out[key], value) if both else value
    return out


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1) with two YAML 1.2 rules: only true / false are
    booleans, so ``off``, ``on``, ``yes`` and ``no`` stay strings (``train.amp=off``), and
    any number with an exponent is a float (``optim.weight_decay=1e-6``)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)  # safe: a SafeLoader subclass


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"config {str(path)!r}: 'base' chain loops back on itself")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(path.parent / base, (*seen, path.resolve())), raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (value parsed as YAML) to nested dicts."""
    out = _merge({}, raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        try:
            value = _load_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            raise ConfigError(f"config section {parts[0]!r} must be a mapping")
        out[parts[0]][parts[1]] = value
    return out


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Nested dicts of a preset or YAML file (``base`` chain resolved) with overrides applied."""
    return apply_overrides(_read_yaml(preset_path(path)), overrides or [])
