"""Atomic directory writes: work in a sibling temp directory, rename at the end.

A crash or Ctrl-C leaves the previous output (or nothing) in place, never half a directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sauce_export.errors import InputError


@contextmanager
def atomic_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp directory next to ``target``; on success it replaces ``target``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise InputError(str(target), "output", "already exists (pass --overwrite to replace it)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    except OSError as err:
        raise InputError(str(parent), "output", f"cannot write here ({err.strerror})") from err
    try:
        yield tmp
        if target.exists():
            old = parent / f".{target.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
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
