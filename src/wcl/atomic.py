"""Crash-safe file writes: every file wcl writes whole (checkpoints, exports, embeddings,
results) goes through :func:`atomic_write`.

A temporary ``.tmp-*`` file in the target's directory is written, fsynced, renamed onto
the target and the directory fsynced, so a crash or a full disk never leaves a
half-written file under the real name: the previous file stays until the new one is
complete. Leftover ``.tmp-*`` files of a killed process are removed by the run
directory's next lock holder (``wcl.lock.RunLock``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_json", "write_text"]


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be fsynced."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (e.g. certain network mounts) reject fsync on a directory.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` or an exception in its chain is ENOSPC (or, on Windows-like error
    reporting without errno, says "No space left")."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO[Any]], object],
    mode: str = "wb",
    what: str = "file",
) -> None:
    """Call ``write(file)`` on a temporary file opened with ``mode`` ("wb" or "w"), then
    put it in place of ``path`` (see the module docstring); the file gets the mode a plain
    ``open()`` would give it (0o666 less the umask).

    On any failure the temporary file is removed, ``path`` is left as it was, and an
    ``OSError`` (same errno; a full disk in one line, with the free bytes) or a
    ``RuntimeError`` naming ``what`` and ``path`` is raised; KeyboardInterrupt and other
    non-``Exception`` errors propagate unchanged.
    """
    path = Path(path)
    directory = path.absolute().parent
    tmp: str | None = None
    try:
        # Looked up at call time (tempfile.mkstemp, os.fsync): tests stand in for them.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=path.suffix)
        try:
            # mkstemp creates the file 0600; give it the mode a plain open() would have.
            os.chmod(tmp, 0o666 & ~_umask())
            f = os.fdopen(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if _disk_full(err):
            # torch's zip writer reports a full disk as "unexpected pos ..." with the
            # OSError only in the chain: say what happened, in one line.
            free = shutil.disk_usage(directory).free
            raise OSError(
                errno.ENOSPC,
                f"could not write {what} {path}: no space left on device ({free} bytes "
                f"free there); the previous {what} at that path (if any) is intact",
            ) from None
        message = (
            f"could not write {what} {path}: {err}; "
            f"the previous {what} at that path (if any) is intact"
        )
        if isinstance(err, OSError):
            # Keep the errno so callers can still tell ENOSPC from EACCES.
            raise (OSError(message) if err.errno is None else OSError(err.errno, message)) from err
        if isinstance(err, Exception):
            raise RuntimeError(message) from err
        raise  # KeyboardInterrupt and friends propagate unchanged.
    try:
        _fsync_dir(directory)
    except OSError as err:
        raise OSError(
            err.errno,
            f"{what} {path} was written, but syncing its directory failed ({err}); "
            "it may not survive a power loss",
        ) from err


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write the string ``text`` to ``path``."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (with a final newline)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")
