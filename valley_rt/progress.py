"""Progress lines for long work (convert, export, GPTQ): the stage, how far it has got, and an estimate.

One plain line at a time on stderr, never a redrawn bar: a log file or a CI job keeps every line, and a
stage that runs for an hour (a 7B's GPTQ) still shows where it is. Library functions take
`progress: Progress | None`; None is silent, so callers that want no output pass nothing.

    export: vision: ONNX graph and parity
    export: LLM graph: 12/32 layers (38 %), 1 min 40 s elapsed, about 2 min 45 s left
    export: done in 4 min 38 s

The estimate is the mean time per unit so far times the units left: units of one stage cost about the
same (decoder layers of one model, bytes of one checkpoint), so it settles after the first few.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def duration(seconds: float) -> str:
    """12 s, 1 min 40 s, 1 h 02 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """`command: message` lines; `stage` names what runs now, `advance` reports counted work with an
    estimate, at most one line per `every_s` seconds (and always the last one)."""

    def __init__(self, command: str | None, *, stream: TextIO | None = None, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.command = command  # None: silent
        self.stream = stream
        self.every_s = every_s
        self.clock = clock
        self.t_start = clock()
        self._stage, self._total, self._unit = "", 0.0, ""
        self._t_stage = self._t_line = self.t_start

    def __call__(self, message: str) -> None:
        if self.command is not None:
            out = self.stream or sys.stderr
            out.write(f"{self.command}: {message}\n")
            out.flush()

    def stage(self, name: str, total: float = 0, unit: str = "") -> None:
        """A new stage; with total > 0, `advance(done)` counts it in units of `unit`."""
        self._stage, self._total, self._unit = name, float(total), unit
        self._t_stage = self._t_line = self.clock()
        self(name)

    def advance(self, done: float) -> None:
        now = self.clock()
        last = done >= self._total
        if self._total <= 0 or (now - self._t_line < self.every_s and not last):
            return
        self._t_line = now
        spent = now - self._t_stage
        left = spent / done * (self._total - done) if done > 0 else None
        scale, fmt = (2**30, "{:.1f}") if self._unit == "GB" else (1, "{:.0f}")
        amount = f"{fmt.format(done / scale)}/{fmt.format(self._total / scale)} {self._unit}".rstrip()
        tail = "" if last or left is None else f", about {duration(left)} left"
        self(f"{self._stage}: {amount} ({100 * done / self._total:.0f} %), {duration(spent)} elapsed{tail}")

    def done(self) -> None:
        self(f"done in {duration(self.clock() - self.t_start)}")


def or_silent(progress: Progress | None) -> Progress:
    return Progress(None) if progress is None else progress
