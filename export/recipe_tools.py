"""Helpers the export recipes share: compiled training with a lazily initialised codebook, code usage, timing.

The recipes (codec.py, tokenizer.py) import this file from their own folder: copy the folder as a whole.
"""

from __future__ import annotations

import math
import statistics
import time

import torch


def usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(share of codes used, perplexity of code usage) over all indices given (-1 ignored)."""
    counts = torch.bincount(indices[indices >= 0].flatten().long(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return float((counts > 0).float().mean()), math.exp(float(entropy))


def median_ms(fn, iters: int = 10) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def train(model: torch.nn.Module, batches, steps: int, loss_fn, lr: float = 2e-3, compile: bool = True,
          log_every: int = 50):
    """Adam on ``loss_fn(model, batch) -> (loss, log dict)`` under torch.compile(fullgraph=True).

    The first step runs eagerly so that k-means initialises the codebooks outside the graph; the compiled steps
    then carry no k-means branch (see the README's compile notes)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step_fn = torch.compile(model, fullgraph=True) if compile else model
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches)
        loss, logs = loss_fn(model if step == 1 else step_fn, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - started
            print(f"  step {step:4d}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in logs.items())
                  + f"  ({elapsed:.0f} s)", flush=True)
    return model.eval()
