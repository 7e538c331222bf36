"""One declaration per config key, and the checks read from it.

Each field of the config sections (:mod:`wcl.config`, :mod:`wcl.eval.config`) is made by
:func:`key`, which stores the key's help, allowed values, range, path handling and whether
it may change when a run resumes in the field's metadata. The type and range checks, the
did-you-mean for misspelt keys and values, the resume rule and the key tables of
:mod:`wcl.config_docs` all read that one declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from wcl.config_files import ConfigError

T = TypeVar("T")

# torch.manual_seed takes [-2**63, 2**64) but folds a negative seed onto 2**64 + seed (-1
# would repeat the run of 2**64 - 1), and the samplers seed with seed + epoch: [0, 2**63)
# keeps every seed its own run, an int64 wherever it is stored, with room for the epoch.
SEED_LIMIT = 2**63
SEED = "in [0, 2**63)"
DISTINCT_COUNTS = "a list of distinct ints > 0"  # knn.k: one result per k

# The ranges a key may declare, by the words its error says ("must be ..."), in the order
# they are checked: a config with several bad values is refused naming the first.
BOUNDS: dict[str, Callable[[Any], bool]] = {
    SEED: lambda v: 0 <= v < SEED_LIMIT,
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    DISTINCT_COUNTS: lambda v: (
        bool(v) and all(type(k) is int and k > 0 for k in v) and len(set(v)) == len(v)
    ),
}


@dataclass(frozen=True)
class KeyInfo:
    """What :func:`key` stores in a field's metadata (under ``"wcl"``)."""

    help: str
    choices: tuple[Any, ...] | None = None
    bounds: tuple[str, ...] = ()  # names in BOUNDS
    at_most: int | None = None
    resume_ok: bool = False  # may differ between a run and its resumption
    # "": not a path | "home": a leading ~ is the home folder | "absolute": also made absolute
    path: str = ""


def key(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Collection[Any] | None = None,
    bounds: str | tuple[str, ...] = (),
    at_most: int | None = None,
    resume_ok: bool = False,
    path: str = "",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field for one config key: its default (or ``factory``) and metadata.

    ``bounds`` names ranges of :data:`BOUNDS` (None always passes them, the type check
    decides whether None is allowed); ``at_most`` is an upper bound; ``resume_ok`` lets the
    value change when a run resumes; ``path`` makes a leading ``~`` the home folder
    ("home"), and the path absolute too ("absolute").
    """
    bounds = (bounds,) if isinstance(bounds, str) else bounds
    unknown = [b for b in bounds if b not in BOUNDS]
    if unknown or path not in ("", "home", "absolute") or not help.strip():
        raise ValueError(f"bad key declaration: bounds {bounds!r}, path {path!r}, help {help!r}")
    info = KeyInfo(
        help=help,
        choices=None if choices is None else tuple(choices),
        bounds=bounds,
        at_most=at_most,
        resume_ok=resume_ok,
        path=path,
    )
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"wcl": info})
    return dataclasses.field(default=default, metadata={"wcl": info})


def key_info(f: dataclasses.Field) -> KeyInfo:
    """The metadata :func:`key` stored in a field."""
    return f.metadata["wcl"]


def sections(cls: type) -> dict[str, type]:
    """``{section name: section dataclass}`` of a config class (``Config``, ``LinearConfig``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def schema(cls: type) -> dict[str, KeyInfo]:
    """``{"section.key": KeyInfo}`` of every key of a config class, in declaration order."""
    return {
        f"{name}.{f.name}": key_info(f)
        for name, section in sections(cls).items()
        for f in dataclasses.fields(section)
    }


def choices_of(cls: type) -> dict[str, tuple[Any, ...]]:
    """``{"section.key": allowed values}`` of the keys of ``cls`` that declare choices."""
    return {k: i.choices for k, i in schema(cls).items() if i.choices is not None}


def keys_bounded(cls: type, bound: str) -> list[str]:
    """The keys of ``cls`` that declare the range ``bound`` (a name in :data:`BOUNDS`)."""
    return [k for k, i in schema(cls).items() if bound in i.bounds]


def resume_ok_keys(cls: type) -> frozenset[str]:
    """The keys of ``cls`` that may change between a run and its resumption."""
    return frozenset(k for k, i in schema(cls).items() if i.resume_ok)


def did_you_mean(word: str, choices: Collection[str], prefix: str = "") -> str:
    """' (did you mean 'x'?)' for the closest of ``choices`` to a misspelt ``word``, or ''."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def check_type(key: str, value: Any, hint: Any) -> Any:
    """Value converted to the annotated type, or ConfigError naming the key."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(
            f"config key {key!r} must be {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def sections_from_dict(cls: type[T], raw: dict[str, Any]) -> T:
    """An instance of ``cls`` (a dataclass of dataclass sections) from nested dicts.

    Unknown sections and keys, and values of the wrong type, are ConfigErrors naming
    the key (with the closest declared spelling). Range checks are the caller's (see
    :func:`check_keys`). A ``~`` that starts the value of a path key is expanded to the
    home folder; an "absolute" path key (a data root) is made absolute.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    cfg = cls()
    names = sections(cls)
    for name, values in raw.items():
        if name not in names:
            raise ConfigError(
                f"unknown config section {name!r}{did_you_mean(name, names)}; valid "
                f"sections: {list(names)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
        section = getattr(cfg, name)
        declared = {f.name: key_info(f) for f in dataclasses.fields(section)}
        hints = typing.get_type_hints(type(section))
        for k, value in values.items():
            if k not in declared:
                raise ConfigError(
                    f"unknown config key '{name}.{k}'{did_you_mean(k, declared, name + '.')}; "
                    f"valid keys in {name!r}: {sorted(declared)}"
                )
            value = check_type(f"{name}.{k}", value, hints[k])
            if declared[k].path and isinstance(value, str):
                value = os.path.expanduser(value)
                if declared[k].path == "absolute":
                    # Saved in config.yaml and read again by later commands, which may
                    # run elsewhere: the evaluations take their data from it.
                    value = os.path.abspath(value)
            setattr(section, k, value)
    return cfg


def check_choices(flat: dict[str, Any], choices: dict[str, Collection[Any]]) -> None:
    """ConfigError naming the first key of ``flat`` whose value is not among its choices."""
    for k, allowed in choices.items():
        if k in flat and flat[k] not in allowed:
            hint = did_you_mean(flat[k], allowed) if isinstance(flat[k], str) else ""
            raise ConfigError(
                f"config key {k!r} must be one of {tuple(allowed)}, got {flat[k]!r}{hint}"
            )


def check_seeds(flat: dict[str, Any], keys: Collection[str]) -> None:
    """ConfigError naming the first of ``keys`` in ``flat`` that is no seed in [0, 2**63)."""
    _check_bound(flat, keys, SEED)


def _check_bound(flat: dict[str, Any], keys: Collection[str], bound: str) -> None:
    for k in keys:
        if flat.get(k) is not None and not BOUNDS[bound](flat[k]):
            raise ConfigError(f"config key {k!r} must be {bound}, got {flat[k]!r}")


def check_keys(flat: dict[str, Any], cls: type) -> None:
    """The declared choices and ranges of the keys of ``cls``, on ``flat`` (dotted keys).

    Choices first, then the ranges in the order of :data:`BOUNDS` (``at_most`` after
    "> 0"); the first bad value is a ConfigError naming its key.
    """
    declared = schema(cls)
    check_choices(flat, choices_of(cls))
    for bound in BOUNDS:
        _check_bound(flat, keys_bounded(cls, bound), bound)
        if bound == "> 0":
            for k, info in declared.items():
                if info.at_most is not None and flat.get(k) is not None and flat[k] > info.at_most:
                    raise ConfigError(
                        f"config key {k!r} must be at most {info.at_most}, got {flat[k]!r}"
                    )
