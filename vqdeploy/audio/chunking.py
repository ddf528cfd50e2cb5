"""Long signals in bounded memory: apply a network chunk by chunk, each chunk with the context its receptive
field needs, so that the outputs equal whole-input processing while memory stays that of one chunk.

Positions count in *steps* of the network's stride: an encoder takes ``hop`` samples per step and gives one token;
a decoder takes one token per step and gives ``hop`` samples.  A chunk of steps [a, b) is run on the window
[a - left, b + right), clipped to the signal (at the signal's ends the network pads exactly as it does for the
whole input), and only the chunk's own outputs are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch


def windowed(blocks: Iterable[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor], *, in_axis: int,
             out_axis: int, in_step: int, out_step: int, chunk: int, context: tuple[int, int]) -> Iterator[torch.Tensor]:
    """``fn`` over the concatenation of ``blocks`` along ``in_axis`` (each a whole number of steps of ``in_step``),
    yielded chunk by chunk along ``out_axis``.  chunk: steps per call; context: (left, right) steps of context."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least one step, got {chunk}")
    left, right = context
    buffer: torch.Tensor | None = None
    buffer_start = done = available = 0  # in steps: the buffer's first step, steps output, steps received

    def emit(stop: int) -> torch.Tensor:
        nonlocal buffer, buffer_start, done
        first, last = max(done - left, 0), min(stop + right, available)
        window = buffer.narrow(in_axis, (first - buffer_start) * in_step, (last - first) * in_step)
        out = fn(window)
        if out.shape[out_axis] != (last - first) * out_step:
            raise ValueError(f"the network gave {out.shape[out_axis]} outputs for {last - first} steps; expected "
                             f"{out_step} per step")
        kept = out.narrow(out_axis, (done - first) * out_step, (stop - done) * out_step)
        done = stop
        keep_from = max(done - left, 0)
        buffer = buffer.narrow(in_axis, (keep_from - buffer_start) * in_step,
                               buffer.shape[in_axis] - (keep_from - buffer_start) * in_step)
        buffer_start = keep_from
        return kept

    for block in blocks:
        if block.shape[in_axis] % in_step:
            raise ValueError(f"blocks must be whole steps of {in_step}, got {block.shape[in_axis]}")
        buffer = block if buffer is None else torch.cat([buffer, block], dim=in_axis)
        available += block.shape[in_axis] // in_step
        while available - done >= chunk + right:
            yield emit(done + chunk)
    while done < available:
        yield emit(min(done + chunk, available))
