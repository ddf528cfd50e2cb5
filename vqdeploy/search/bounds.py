"""How far a tensor-core score can be from the exact one, and so which codes may still win.

Euclidean search ranks codes by ``s_j = ||c_j||^2 - 2 x.c_j``, which orders them as ``||x - c_j||^2`` does.
Distances do not change when rows and codes move together, so the kernel scores ``x' = x - m`` against
``c' = c - m`` (m: the codes' mean; this keeps the scores small when the data sit far from the origin).  It
computes ``a_j = ||c'_j||^2 - 2 x'.c'_j`` with the dot product on tensor cores: both operands rounded to the
score precision (bf16: unit roundoff 2^-8; TF32 2^-11, taken as 2^-10 so truncating hardware is covered), exact
products, float32 accumulation (bounded as if every addition truncated: d * 2^-23).  By Cauchy-Schwarz,
sum_i |x'_i c'_i| <= ||x'|| ||c'||, so the distance to each code, less the same ||x||^2 for every code, is
within

    E_j = eta * (2 ||x'|| ||c'_j|| + ||c'_j||^2) + eta_x * ||x'||^2

of ``a_j``, with ``eta`` from :func:`score_error_factor` (operand rounding, accumulation, the float32 norms and
the subtraction, and the rounding of the centering, which moves the distance by at most
2u (||x'|| + ||c'_j||)^2) and ``eta_x = CENTERING_ERROR``.  Both carry a safety factor of 2 over these
first-order terms.  Cosine similarity ranks by ``-x.c_j`` uncentered: ``E_j = eta * ||x|| ||c_j||``.

The rule that makes the search exact: the true nearest code j* satisfies ``a_j* - E_j* <= s_j* <= s_j <=
a_j + E_j`` for every j, so a code whose lower bound ``a_j - E_j`` exceeds ``U = min_j (a_j + E_j)`` can
neither win nor tie.  The kernel keeps, per row, the codes with the smallest lower bounds; when the smallest
lower bound it dropped is above U, the nearest code is among those kept, and rescoring them in float64 picks it.
Otherwise that block of rows is searched again over every code in float64.  The result is the argmin of the
float64 distance ``sum_i (x_i - c_i)^2`` (``-sum_i x_i c_i`` for cosine; lowest index on equal values), which
differs from float64 torch (another summation order) only when two codes' float64 distances are within a few
units in the last place: relative gaps below about d * 2^-53.
"""

from __future__ import annotations

import torch

# unit roundoff of the operands fed to the tensor cores ("ieee": float32 as it is)
SCORE_PRECISIONS = {"bf16": 2.0 ** -8, "tf32": 2.0 ** -10, "ieee": 0.0}
FLOAT32_UNIT = 2.0 ** -24
SAFETY = 2.0
CENTERING_ERROR = SAFETY * 2 * FLOAT32_UNIT * 1.01  # eta_x: the centering's rounding, per unit of ||x'||^2


def score_error_factor(precision: str, dim: int) -> float:
    """``eta``: the bound on a score's error per unit of ``2 ||x'|| ||c'_j|| + ||c'_j||^2`` (module text)."""
    if precision not in SCORE_PRECISIONS:
        raise ValueError(f"score precision must be one of {sorted(SCORE_PRECISIONS)}, got {precision!r}")
    if dim < 1:
        raise ValueError(f"code dimension must be positive, got {dim}")
    operand = SCORE_PRECISIONS[precision]
    rounding = 2 * operand + operand * operand  # x and c both rounded: (1 + u)^2 - 1
    accumulation = dim * 2 * FLOAT32_UNIT * (1 + operand) ** 2  # float32 sum, truncating, of the rounded products
    norms = (dim + 4) * FLOAT32_UNIT  # ||x'||, ||c'||, ||c'||^2 in float32; the subtraction and the bound itself
    centering = 2 * FLOAT32_UNIT * 1.01
    return SAFETY * (rounding + accumulation + norms + centering)


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 ``t`` rounded to nearest (even) at the score precision, kept in float32: what tensor cores
    multiply.  Used to emulate them (Triton's interpreter) and to check the bound."""
    if precision == "bf16":
        return t.to(torch.bfloat16).float()
    if precision == "tf32":  # 10 stored mantissa bits: round the low 13 of 23 away, ties to even
        bits = t.contiguous().view(torch.int32)
        tie_to_even = (bits >> 13) & 1
        rounded = ((bits + 0xFFF + tie_to_even) & ~0x1FFF).view(torch.float32)
        return torch.where(t.isfinite(), rounded, t)
    return t
