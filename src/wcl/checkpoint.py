"""Crash-safe checkpoint files and RNG state capture for resumable training.

Checkpoints are written atomically (``wcl.atomic``: temporary file + fsync + rename +
directory fsync), so a crash or a full disk never leaves a half-written ``last.pt``. They
hold only ``torch.load(weights_only=True)``-safe values and are always loaded that way, so
opening a checkpoint can never execute code.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import random
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wcl.atomic import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointError",
    "check_finite",
    "nonfinite_tensors",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "wcl-checkpoint"
FORMAT_VERSION = 1
LAST_NAME = "last.pt"

# Exact types (not isinstance: numpy.float64 subclasses float yet pickles as a numpy global,
# which weights_only refuses).
_SAFE_SCALARS = (str, int, float, bool, type(None))
_SAFE_TENSORS = (torch.Tensor, torch.nn.Parameter)
_SAFE_MAPPINGS = (dict, OrderedDict)
_SAFE_SEQUENCES = (list, tuple)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, foreign or from a newer format."""


def _check_safe(obj: Any, where: str) -> None:
    """Raise TypeError naming ``where`` if ``obj`` holds a value weights_only cannot load."""
    kind = type(obj)
    if kind in _SAFE_SCALARS or kind in _SAFE_TENSORS:
        return
    if kind in _SAFE_MAPPINGS:
        for key, value in obj.items():
            _check_safe(key, f"{where} key {key!r}")
            _check_safe(value, f"{where}[{key!r}]")
        return
    if kind in _SAFE_SEQUENCES:
        for i, value in enumerate(obj):
            _check_safe(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} has type {kind.__module__}.{kind.__qualname__}, which "
        "torch.load(weights_only=True) cannot load; convert it to a tensor, dict, list, tuple, "
        "str, int, float, bool or None"
    )


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Atomically write ``state`` (plus format tags) to ``path`` (``wcl.atomic``).

    The previous file at ``path`` is replaced only once the new one is fully on disk; on any
    failure the temporary file is removed, ``path`` is left as it was, and an ``OSError``
    (same errno) or ``RuntimeError`` naming ``path`` is raised. ``TypeError`` is raised,
    before anything is written, if ``state`` holds a value weights_only loading would refuse.
    """
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    payload = dict(state)
    payload["format"] = FORMAT
    payload["format_version"] = FORMAT_VERSION
    _check_safe(payload, "state")
    # torch.save looked up at call time: tests stand in for it.
    atomic_write(path, lambda f: torch.save(payload, f), what="checkpoint")


_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")
_REFUSED_OTHER = re.compile(
    r"(unrecognized function \S+|Can only create new object .*?got \S+|Can only build .*?got \S+)"
)
# torch's legacy format is five pickles (magic number, protocol, system info, the object,
# the storage keys) before raw storage bytes; a raw pickle is one.
_LEGACY_PICKLES = 5


def _allowed_globals() -> set[str]:
    """The globals torch.load(weights_only=True) accepts (a private list of torch's; without
    it every global found is reported)."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:
        return set()


def _globals_in_pickles(path: Path) -> set[str]:
    """Every global (``module.name``) the pickles at the start of a file that is not a zip
    ask for, found by disassembling them: :mod:`pickletools` runs nothing. torch's own
    scanner reads zip files only, and only pickle protocol 2."""
    names: set[str] = set()
    with open(path, "rb") as f:
        for _ in range(_LEGACY_PICKLES):
            pushed: list[str | None] = []  # what each opcode pushed (strings only)
            memo: dict[int, str | None] = {}
            try:
                for opcode, arg, _ in pickletools.genops(f):
                    name = opcode.name
                    if name in ("GLOBAL", "INST"):
                        names.add(str(arg).replace(" ", ".", 1))
                    elif name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                        names.add(f"{pushed[-2]}.{pushed[-1]}")
                    if name == "MEMOIZE":
                        memo[len(memo)] = pushed[-1] if pushed else None
                    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(arg)] = pushed[-1] if pushed else None
                    elif name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(int(arg)))
                    else:
                        text = "STRING" in name or "UNICODE" in name
                        pushed.append(arg if text and isinstance(arg, str) else None)
            except Exception:  # the end of the file, or bytes that are no pickle
                break
    return names


def _pickle_code(path: Path, message: str) -> str | None:
    """What code a file refused by weights_only asks for (e.g. 'posix.system'), or None
    when the refusal was not about code."""
    try:
        if zipfile.is_zipfile(path):
            names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        else:
            names = _globals_in_pickles(path) - _allowed_globals()
    except Exception:
        names = set()
    if names:
        return ", ".join(sorted(names))
    match = _REFUSED_GLOBAL.search(message) or _REFUSED_OTHER.search(message)
    return match.group(1) if match else None


def _torch_reason(message: str) -> str:
    """torch's reason for not loading a file, on one line, without its advice: that advice
    is to load the file with weights_only=False, that is, to run any code it holds."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in message.splitlines()]
    kept = [
        line
        for line in lines
        if line and "weights_only" not in line and not line.startswith(boilerplate)
    ]
    return " ".join(kept).replace("WeightsUnpickler error: ", "") or "torch could not read it"


def nonfinite_tensors(state: Mapping[str, Any]) -> list[str]:
    """The names of ``state``'s floating-point tensors holding NaN or Inf, in order."""
    return [key for key, tensor in state.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())]  # fmt: skip


def check_finite(
    path: str | os.PathLike, state: Mapping[str, torch.Tensor], what: str = "backbone tensor"
) -> None:
    """CheckpointError naming the first tensor of ``state`` holding NaN or Inf: the weights
    of a diverged or damaged run would score, embed, export and convert as if they were
    fine. One pass over the weights, cheap beside any evaluation."""
    bad = nonfinite_tensors(state)
    if bad:
        tensor = state[bad[0]]
        count = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{path}: {what} {bad[0]!r} holds NaN or Inf ({count} of "
            f"{tensor.numel()} values); weights of a diverged or damaged run are refused"
        )


def load_checkpoint(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    allow_foreign: bool = False,
) -> dict:
    """Load a checkpoint dict with ``torch.load(weights_only=True)``.

    Raises ``CheckpointError`` (naming the file) if it is missing, truncated or corrupt,
    needs pickle code to load (named, never run; the message never suggests running it), is
    not a dict, is not a wcl checkpoint
    (unless ``allow_foreign``, which returns any dict as is), or has a newer format version.
    The returned dict keeps the ``format`` / ``format_version`` tags.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            # A pickle of protocol > 2 (not torch.save's) is refused or read all the same;
            # torch's warning about it would only be a second message.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        code = _pickle_code(path, str(err))
        if code is not None:
            raise CheckpointError(
                f"checkpoint {path} refused: it needs pickle code to load ({code}); wcl never "
                "runs code from a file, so it was not loaded"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or no file torch.save wrote: "
            f"{_torch_reason(str(err))}"
        ) from None
    except Exception as err:
        # Damaged bytes surface as whatever the parser trips over first (RuntimeError from the
        # zip reader, EOFError, IndexError, struct.error, ... from the unpickler).
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or unreadable: {_torch_reason(str(err))}"
        ) from err

    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a dict; it is not a wcl checkpoint"
        )
    if obj.get("format") != FORMAT:
        if allow_foreign:
            return obj
        raise CheckpointError(
            f"{path} is not a wcl checkpoint (no 'format': {FORMAT!r} tag); "
            "pass allow_foreign=True to load a foreign dict anyway"
        )
    version = obj.get("format_version")
    if type(version) is not int:
        raise CheckpointError(f"checkpoint {path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format_version {version}, newer than the version "
            f"{FORMAT_VERSION} this wcl understands; upgrade wcl to load it"
        )
    return obj


def rng_state() -> dict[str, Any]:
    """Snapshot of the Python, NumPy (global), torch CPU and CUDA (if available) generators.

    Everything is a tensor, int, float, str or None, so it can go in a checkpoint.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            # Mersenne Twister words are < 2**32, so int64 holds them exactly.
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators captured by ``rng_state`` (tensors may be on any device)."""
    py = state["python"]
    py_internal = tuple(int(x) for x in py["state"].tolist())
    random.setstate((int(py["version"]), py_internal, py["gauss_next"]))

    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].cpu().numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )

    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))

    cuda_states = state.get("cuda")
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            "checkpoint has CUDA RNG states but CUDA is not available; they were not restored",
            stacklevel=2,
        )
        return
    count = torch.cuda.device_count()
    if len(cuda_states) != count:
        warnings.warn(
            f"checkpoint has CUDA RNG states for {len(cuda_states)} devices but {count} are "
            f"visible; restoring the first {min(count, len(cuda_states))}",
            stacklevel=2,
        )
    for index, device_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(device_state.cpu().to(torch.uint8), device=index)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """``run_dir/last.pt`` if that file exists, else None."""
    candidate = Path(run_dir) / LAST_NAME
    return candidate if candidate.is_file() else None
