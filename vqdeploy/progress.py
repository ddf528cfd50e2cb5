"""A progress line on standard error for long work: a bar redrawn in place on a terminal, a line every tenth
otherwise (logs stay readable)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: float, unit: str = "s", enabled: bool = True, stream=None,
                 started: float | None = None):
        """started: the ``time.perf_counter()`` the work began at, when that was before the bar (its speed is
        then the work's whole speed so far, the figure a summary reports)."""
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter() if started is None else started
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.next_tenth = 1

    def update(self, done: float, rate_label: str = "") -> None:
        if not self.enabled or self.total <= 0:
            return
        share = min(done / self.total, 1.0)
        elapsed = time.perf_counter() - self.started
        speed = f", {done / elapsed:.1f} {rate_label}" if rate_label and elapsed > 0 else ""
        line = f"{self.label} [{'#' * round(share * 30):<30}] {share:6.1%} {done:,.1f} of {self.total:,.1f} " \
               f"{self.unit}{speed}"
        if self.tty:
            print("\r" + line, end="", file=self.stream, flush=True)
        elif share * 10 >= self.next_tenth:
            print(line, file=self.stream, flush=True)
            self.next_tenth = int(share * 10) + 1

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=self.stream, flush=True)
