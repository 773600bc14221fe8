"""The one progress line of every long command: count, rate and ETA, on one clock and one stream.

    progress = Progress("precompute-teacher [rank 0/1]", total=images, unit="images")
    progress.update(n)      # -> "precompute-teacher [rank 0/1]: 640/1000 images (64.0%), 412.3 images/s, ETA 0:00:01"

Lines go to stderr: on a terminal one live line rewritten in place (at most twice a second), otherwise a
plain line every `every_s` seconds, and (with `final`, the default) one when the count reaches the
total, so a log file of a batch job gets a few lines, not thousands. Steps inside another command
(the evaluation that `dho distill --val` runs every epoch) pass final=False: a line only if they are slow. The clock is `time.monotonic` (a clock change never makes a
negative rate). The rate is that of the last stretch (since the previous line), the ETA comes from the
mean rate since the start.

`dho distill` keeps its own log (stdout and RUN/log.txt, one line per --log-every steps): it takes the
rate and ETA of its step lines from a Progress that prints nothing itself (`every_s=None`).

Out of scope: progress bars with widgets, several bars at once.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


def format_time(seconds: float) -> str:
    """Seconds -> H:MM:SS (hours not wrapped)."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`update(n)` counts n more of `total`; prints `what: status()` when a line is due (see the module docstring)."""

    def __init__(self, what: str, total: int, unit: str = "", every_s: Optional[float] = 10.0, final: bool = True):
        self.what, self.total, self.unit, self.every_s, self.final = what, int(total), unit, every_s, final
        self.done = 0
        self.start = self._mark = time.monotonic()
        self._mark_done = 0
        self._printed = self.start
        self.tty = sys.stderr.isatty() and final  # a live line needs its final newline

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.every_s is None:
            return
        now = time.monotonic()
        finished = self.done >= self.total and self.final
        if not finished and now - self._printed < (0.5 if self.tty else self.every_s):
            return
        self._printed = now
        line = f"{self.what}: {self.status()}"
        if self.tty:
            print("\r" + line, end="\n" if finished else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def rate(self) -> float:
        """Units per second since the previous call (or the start); starts the next stretch."""
        now = time.monotonic()
        rate = (self.done - self._mark_done) / max(now - self._mark, 1e-9)
        self._mark, self._mark_done = now, self.done
        return rate

    def eta(self) -> float:
        """Seconds left at the mean rate since the start."""
        elapsed = time.monotonic() - self.start
        return (self.total - self.done) * elapsed / max(self.done, 1)

    def status(self) -> str:
        """`done/total unit (pct%), rate unit/s, ETA H:MM:SS` (the mean rate since the start)."""
        unit = f" {self.unit}" if self.unit else ""
        pct = 100.0 * self.done / max(self.total, 1)
        mean = self.done / max(time.monotonic() - self.start, 1e-9)
        return f"{self.done}/{self.total}{unit} ({pct:.1f}%), {mean:.1f}{unit}/s, ETA {format_time(self.eta())}"
