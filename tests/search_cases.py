"""Adversarial data for the fused nearest-code search, shared by the interpreter worker (CPU) and test_cuda.py.

Every case is (rows (h, n, d), codes (h, k, d), use_cosine_sim) in float32; the truth is the float64 argmin
(lowest index on equal distances).  The cases are built so that no two distinct codes are within float64
rounding of each other for any row, where "exact" is defined (see vqdeploy.search.bounds)."""

import torch


def float64_nearest(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool) -> torch.Tensor:
    x64, c64 = x.double(), codes.double()
    if use_cosine_sim:
        return (-torch.bmm(x64, c64.transpose(1, 2))).argmin(dim=-1)
    return torch.cdist(x64, c64).argmin(dim=-1) if x.shape[1] > 4096 else \
        (x64.unsqueeze(2) - c64.unsqueeze(1)).square().sum(dim=-1).argmin(dim=-1)


def _gaussian(g, h, n, k, d):
    return torch.randn(h, n, d, generator=g), torch.randn(h, k, d, generator=g)


def gaussian(g):
    """Two codebooks, sizes that fill no block evenly."""
    return (*_gaussian(g, 2, 100, 200, 48), False)


def cosine(g):
    x, c = _gaussian(g, 1, 130, 200, 32)
    return torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(c, dim=-1), True


def near_duplicates(g):
    """Clusters of 24 codes 1e-6 apart (more than the 16 kept candidates): rows must fall back, and still be
    exact."""
    base = torch.randn(1, 8, 32, generator=g)
    codes = (base.repeat_interleave(24, dim=1) + 1e-6 * torch.randn(1, 192, 32, generator=g))
    x = base.repeat_interleave(8, dim=1) + 1e-3 * torch.randn(1, 64, 32, generator=g)
    return x, codes, False


def exact_duplicates(g):
    """Every code twice (and rows on the codes): equal float64 distances go to the lower index."""
    codes = torch.randn(1, 40, 24, generator=g).repeat(1, 2, 1)[:, torch.randperm(80, generator=g)]
    x = torch.cat([codes[:, :30], torch.randn(1, 50, 24, generator=g)], dim=1)
    return x, codes, False


def near_ties(g):
    """Rows a hair (1e-4 of the gap) off the midpoint of two codes: the tensor-core scores cannot tell them apart."""
    codes = torch.randn(1, 128, 32, generator=g)
    a, b = torch.randint(0, 128, (2, 96), generator=g)
    b = torch.where(a == b, (b + 1) % 128, b)
    mid = (codes[0, a] + codes[0, b]) / 2
    gap = codes[0, b] - codes[0, a]
    side = torch.where(torch.rand(96, 1, generator=g) < 0.5, -1.0, 1.0)
    return (mid + side * 1e-4 * gap).unsqueeze(0), codes, False


def large_norms(g):
    """Everything offset by 1000 with unit spread: ||c||^2 - 2 x.c cancels ~1e6 to ~1 (float32 torch errs)."""
    x, c = _gaussian(g, 1, 100, 150, 32)
    return x + 1000.0, c + 1000.0, False


def tiny_shapes(g):
    """d = 3 (padded to 16), one row more than a block, fewer codes than a block."""
    return (*_gaussian(g, 1, 65, 5, 3), False)


CASES = {f.__name__: f for f in (gaussian, cosine, near_duplicates, exact_duplicates, near_ties, large_norms,
                                 tiny_shapes)}


def build(name: str, seed: int = 0):
    return CASES[name](torch.Generator().manual_seed(seed))
