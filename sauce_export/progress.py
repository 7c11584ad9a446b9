"""Progress of the long stages: a tqdm bar on a terminal, plain throttled lines anywhere else.

A bar redraws itself with carriage returns, which turn a CI log or ``make demo > log`` into thousands
of frames. Off a terminal a bar therefore prints at most one plain line every ``INTERVAL`` seconds
(none for a bar that finishes sooner), and ``stage_done`` says in one line that a stage finished and
how long it took. Every stage uses ``bar``/``track`` from here instead of calling tqdm itself.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

INTERVAL = 10.0  # seconds between two progress lines in a log
T = TypeVar("T")


def _amount(n: float, unit: str) -> str:
    return f"{n / 2**20:.0f} MiB" if unit == "B" else f"{n:g}"


class Lines:
    """The log form of a bar: the few tqdm methods the stages call, writing throttled plain lines."""

    def __init__(self, total: float | None, desc: str, initial: float, unit: str, stream: TextIO) -> None:
        self.total, self.desc, self.n, self.unit, self.stream = total, desc, initial, unit, stream
        self.postfix = ""
        self.start = self.last = time.monotonic()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            done = _amount(self.n, self.unit)
            if self.total:
                done += f"/{_amount(self.total, self.unit)} ({100 * self.n / self.total:.0f}%)"
            extra = f", {self.postfix}" if self.postfix else ""
            print(f"{self.desc}: {done}, {now - self.start:.0f} s{extra}", file=self.stream, flush=True)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        """Nothing to clear: the stage's own line reports the end."""

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Counter = tqdm | Lines
"""What ``bar`` returns: both take ``update``, ``set_postfix``, ``set_description`` and ``close``."""


def bar(
    total: float | None = None, desc: str = "", enabled: bool = True, initial: float = 0, unit: str = "it"
) -> Counter:
    """A progress counter for ``total`` units (``unit="B"``: bytes, shown in KiB/MiB/GiB)."""
    stream = sys.stderr
    if enabled and stream.isatty():
        return tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            unit_divisor=1024,
            leave=False,
            file=stream,
        )
    if not enabled:
        return tqdm(total=total, disable=True)
    return Lines(total, desc, initial, unit, stream)


def track(items: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """``items`` one by one, counted on a ``bar``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, enabled) as counter:
        for item in items:
            yield item
            counter.update()


def stage_done(name: str, seconds: float | None, enabled: bool = True) -> None:
    """One line per pipeline stage: how long it took, or that an earlier run's result was reused."""
    if enabled:
        took = "reused from an earlier run" if seconds is None else f"done in {seconds:.1f} s"
        print(f"{name}: {took}", file=sys.stderr, flush=True)
