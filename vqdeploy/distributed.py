"""The few collectives a codebook needs, out of place, traceable by torch.compile.

In-place ``torch.distributed.all_reduce`` has been reported to be silently
wrong under ``torch.compile``, so everything here goes through the functional
collectives (``torch.distributed._functional_collectives``), which work
eagerly too.  Every function is the identity when torch.distributed is not
initialised or has a single rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .primitives import sample_rows


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _funcol():
    import torch.distributed._functional_collectives as funcol
    return funcol


def _settle(t):
    """Eagerly, functional collectives return an AsyncCollectiveTensor: wait
    for it so that plain tensors flow on."""
    funcol = _funcol()
    if isinstance(t, funcol.AsyncCollectiveTensor):
        return t.wait()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    return _settle(_funcol().all_reduce(t, "sum", dist.group.WORLD))


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the ranks' gradients: every rank's loss reads the sum, so each
    rank's tokens get the gradient of all of them (DDP's average of the per-rank gradients then equals one
    process's gradient on the whole batch)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.contiguous())


def all_reduce_sum_differentiable(t: torch.Tensor) -> torch.Tensor:
    """``all_reduce_sum`` with a gradient (LFQ's entropies of the whole batch)."""
    if not is_distributed():
        return t
    return _AllReduceSum.apply(t)


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    return _settle(_funcol().all_reduce(t, "min", dist.group.WORLD))


def all_gather_stacked(t: torch.Tensor) -> torch.Tensor:
    """(...) on every rank -> (world, ...) on every rank."""
    if not is_distributed():
        return t.unsqueeze(0)
    funcol = _funcol()
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    out = _settle(gather(t.contiguous(), 0, dist.group.WORLD))
    return out.reshape(world_size(), *t.shape)


def all_ranks(ok: torch.Tensor) -> torch.Tensor:
    """A 0-d bool that is True only when it is True on every rank."""
    if not is_distributed():
        return ok
    return all_reduce_min(ok.to(torch.int32).reshape(1)).reshape(()) > 0


def any_rank(ok: torch.Tensor) -> torch.Tensor:
    """A 0-d bool that is True when it is True on some rank."""
    if not is_distributed():
        return ok
    return all_reduce_sum(ok.to(torch.int32).reshape(1)).reshape(()) > 0


def sample_rows_synced(x: torch.Tensor, num: int, weights: torch.Tensor | None = None,
                       uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Like :func:`sample_rows`, but every rank gets the same rows, drawn from
    every rank in proportion to its number of kept rows.

    Each rank samples ``num`` rows of its own batch; the kept-row counts are
    gathered, and row ``j`` of the result comes from the rank whose share of
    the total covers position ``(j + 0.5) / num``.  Shapes stay static and the
    choice is the same on every rank."""
    local = sample_rows(x, num, weights, uniform)
    if not is_distributed():
        return local
    h, d = local.shape[0], local.shape[-1]
    kept = (weights > 0).sum(dim=-1).float() if weights is not None else torch.full((h,), float(x.shape[1]),
                                                                                     device=x.device)
    counts = all_gather_stacked(kept)  # (world, h)
    bounds = counts.cumsum(dim=0).transpose(0, 1).contiguous()  # (h, world)
    positions = (torch.arange(num, device=x.device, dtype=bounds.dtype) + 0.5) / num
    targets = positions.unsqueeze(0) * bounds[:, -1:]  # (h, num)
    source = torch.searchsorted(bounds, targets, right=True).clamp(max=world_size() - 1)
    gathered = all_gather_stacked(local)  # (world, h, num, d)
    index = source.view(1, h, num, 1).expand(1, h, num, d)
    return gathered.gather(0, index).squeeze(0)
