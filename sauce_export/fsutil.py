"""Atomic directory writes: work in a sibling temp directory, swap it in at the end.

A crash, Ctrl-C or SIGKILL leaves the previous output (or nothing) in place, never half a directory.
On Linux the swap is one ``renameat2(RENAME_EXCHANGE)`` call, so ``target`` is never absent, not even
for an instant; elsewhere (or on a filesystem without it) it is two renames, and a run killed between
them leaves the old output in ``.NAME.old``, which the next write to ``target`` puts back. Temp
directories carry their writer's pid, so a later write removes those of dead runs (never a live one).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from sauce_export.errors import InputError

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return getattr(libc, "renameat2", None)  # glibc >= 2.28


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b``; False where the platform cannot (then untouched)."""
    if _RENAMEAT2 is None:
        return False
    done = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # no exchange on this filesystem or kernel
        return False
    raise OSError(err, os.strerror(err), str(a))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clear_stale(target: Path) -> None:
    """Undo what killed writes to ``target`` left: restore an old output stranded in ``.NAME.old`` by
    the two-rename swap, and remove the temp directories of writers that are no longer running."""
    parent, name = target.parent, target.name
    old = parent / f".{name}.old"
    if old.is_dir() and not target.exists():
        os.replace(old, target)
    shutil.rmtree(old, ignore_errors=True)
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:(\d+)\.)?\w+\.tmp")
    with suppress(OSError):
        for entry in parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and not (match[1] and _alive(int(match[1]))):
                shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    clear_stale(target)
    if target.exists() and not overwrite:
        raise InputError(str(target), "output", "already exists (pass --overwrite to replace it)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    except OSError as err:
        raise InputError(str(parent), "output", f"cannot write here ({err.strerror})") from err
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        elif not exchange(tmp, target):  # tmp now holds the old output, removed below
            old = parent / f".{target.name}.old"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(directory: Path, where: str = "output") -> None:
    """Fail early (before hours of work) when an output directory cannot be created or written.

    Tries for real (mkdir + a probe file) rather than trusting permission bits, which root ignores.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise InputError(str(directory), where, f"is not a writable directory ({err.strerror})") from err
