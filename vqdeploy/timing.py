"""Median wall-clock time of a call, shared by the command line, the recipes and the benchmarks."""

from __future__ import annotations

import statistics
import time


def median_ms(fn, iters: int = 10, warmup: int = 1, sync=None) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls after ``warmup`` calls; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs after each call so that device work is counted."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
