"""Config files as wcl reads them: presets, ``base`` chains, ``section.key=value`` overrides.

A preset is a YAML file shipped in ``wcl/configs`` (or any YAML file); ``base:
other.yaml`` (relative to the file) starts from another one. Overrides are
``section.key=value`` strings whose value is read as YAML, with YAML 1.2's rules for
booleans and exponents (see :class:`_YamlLoader`). The result is nested dicts, which
:mod:`wcl.config` and :mod:`wcl.eval.config` turn into checked dataclasses.
"""

from __future__ import annotations

import difflib
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

    When it is neither, the ``ConfigError`` names the value, the closest preset names if
    any are close (a misspelt preset) and the shipped presets (only the ``kind-*`` ones,
    e.g. ``linear-*``, when ``kind`` is given).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    names = preset_names(folder, kind)
    shipped_kind = f"{kind} presets" if kind else "presets"
    # Only a bare name is a preset: a missing "my/dir/knn-small.yaml" is not knn-small.
    shipped = folder / f"{path.stem}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        if kind and path.stem not in names:
            raise ConfigError(f"{path.stem!r} is not one of the {shipped_kind}: {names}")
        return shipped
    raise ConfigError(
        f"config file {str(name_or_path)!r} not found{_did_you_mean(path.stem, names)}; "
        f"shipped {shipped_kind}: {names}"
    )


def _did_you_mean(word: str, names: list[str]) -> str:
    """`` (did you mean 'a'?)`` for the preset name closest to a misspelt ``word`` (as
    :func:`difflib.get_close_matches` scores them), or '' when none is close."""
    scores = {name: difflib.SequenceMatcher(None, name, word).ratio() for name in names}
    close = sorted((name for name in names if scores[name] >= 0.6), key=lambda n: -scores[n])
    if not close:
        return ""
    # Every name as close as the best one: a bare "imagenet" is equally far from each
    # imagenet-r50-*ep preset, and naming one of them would be a guess.
    tied = [f"'{name}'" for name in close if scores[name] == scores[close[0]]]
    listed = tied[0] if len(tied) == 1 else f"{', '.join(tied[:-1])} or {tied[-1]}"
    return f" (did you mean {listed}?)"


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


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line (PyYAML's spans several): where, what, and in what."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return " ".join(str(err).split())
    mark, context = err.problem_mark, ""
    if err.context:
        start = err.context_mark
        where = f" started on line {start.line + 1}, column {start.column + 1}" if start else ""
        context = f" ({err.context}{where})"
    return f"line {mark.line + 1}, column {mark.column + 1}: {err.problem}{context}"


# Characters a YAML stream may not hold (PyYAML's reader refuses the rest): one of them, or
# bytes that are no UTF-8, make a file binary, whatever its name says.
_NOT_YAML_TEXT = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)


def _yaml_text(path: Path) -> str:
    """The text of config file ``path``; a ConfigError naming the first offending byte when
    it is not a text file (a model, an image or an archive given as ``--config``)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not a text YAML file (byte 0x{data[err.start]:02x} "
            f"at offset {err.start} is not UTF-8)"
        ) from None
    bad = _NOT_YAML_TEXT.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(
            f"config file {str(path)!r} is not a text YAML file (control character "
            f"U+{ord(bad.group()):04X} on line {line})"
        )
    return text


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        raise ConfigError(f"config {str(path)!r}: 'base' chain loops back on itself")
    try:
        raw = _load_yaml(_yaml_text(path)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}"
        ) from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return _merge(_read_yaml(_base_path(path, base), (*seen, path.resolve())), raw)


def _base_path(path: Path, base: Any) -> Path:
    """The file a config's ``base:`` names: a YAML file beside it, or a shipped preset (a
    user's own file may start from one: ``base: fashion-mnist-demo.yaml``)."""
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {str(path)!r}: 'base' must name a YAML file, got {base!r}")
    beside = path.parent / Path(base).expanduser()
    if beside.is_file():
        return beside
    if Path(base).parent == Path("."):
        for folder in (PRESET_DIR, PRESET_DIR / "eval"):
            if (folder / f"{Path(base).stem}.yaml").is_file():
                return folder / f"{Path(base).stem}.yaml"
    raise ConfigError(
        f"config file {str(path)!r}: 'base' {base!r} is neither a file beside it nor a "
        "shipped preset"
    )


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
            raise ConfigError(
                f"override {item!r}: value is not valid YAML: {_yaml_problem(err)}"
            ) from err
        out.setdefault(parts[0], {})
        if not isinstance(out[parts[0]], dict):
            raise ConfigError(f"config section {parts[0]!r} must be a mapping")
        out[parts[0]][parts[1]] = value
    return out


def read_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Nested dicts of a preset or YAML file (``base`` chain resolved) with overrides applied."""
    return apply_overrides(_read_yaml(preset_path(path)), overrides or [])
