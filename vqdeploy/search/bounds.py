"""How far a tensor-core score can be from the exact one, and so which codes may still win.

Euclidean search ranks codes by ``s_j = ||c_j||^2 - 2 x.c_j``, which orders them as ``||x - c_j||^2`` does.
Distances do not change when rows and codes move together, so the kernel scores ``x' = x - m`` against
``c' = c - m`` (m: the codes' mean; this keeps the scores small when the data sit far from the origin).  It
computes ``a_j = ||c'_j||^2 - 2 fl(X.C_j)``, where X and C_j are x' and c'_j rounded to nearest (even) at the
score precision (bf16 or TF32; "ieee" keeps float32) and the dot product runs on tensor cores: exact products,
float32 sums, bounded as if every addition truncated (d * 2^-23).  The rounding is not bounded from the
precision's unit roundoff but measured: with ``dx = X - x'`` and ``dc_j = C_j - c'_j`` (computed in float32,
exactly), ``X.C_j - x'.c'_j = dx.c'_j + X.dc_j`` exactly, and by Cauchy-Schwarz

    |a_j - s_j| <= E_j = SAFETY * (2 (||dx|| ||c'_j|| + ||X|| ||dc_j|| + acc ||X|| ||C_j||)
                                   + fp (2 ||x'|| ||c'_j|| + ||c'_j||^2)) + CENTERING_ERROR ||x'||^2

where ``s_j`` is the exact ``||x - c_j||^2 - ||x'||^2``, ``acc = accumulation_error(d)`` bounds the float32
sums of the products, ``fp = rounding_error(d)`` the float32 norms, the subtraction, the bound's own arithmetic
and the rounding of the centering (which moves a distance by at most 2u (||x'|| + ||c'_j||)^2; its ||x'||^2 part
is ``CENTERING_ERROR``).  ``SAFETY`` = 2 covers the float32 error of the norms in E itself.  Cosine similarity
ranks by ``-x.c_j`` uncentered: E_j is the same without the factors 2, the ``||c'||^2`` and centering terms.
Measured residuals make E 2-3 times smaller than a bound from the unit roundoff (random rounding errors do not
line up with the rows), which is what lets bf16 scores certify Gaussian data of dimension 256.

The rule that makes the search exact: the true nearest code j* satisfies ``a_j* - E_j* <= s_j* <= s_j <=
a_j + E_j`` for every j, so a code whose lower bound ``a_j - E_j`` exceeds ``U = min_j (a_j + E_j)`` can
neither win nor tie; nor can one whose lower bound exceeds the exact score of any code.  The kernel keeps, per
row, the codes with the smallest lower bounds; it rescores them in float64, and when the smallest lower bound it
dropped is above U or above the best kept code's exact score (made an upper estimate: the float64 score
raised by 1e-12 of itself, ``||x'||^2`` lowered by ``squared_norm_error``), the nearest code is among those
kept and the rescoring picked it.  Otherwise that block of rows is searched again over every code in float64.
The result is the argmin of the float64 distance ``sum_i (x_i - c_i)^2`` (``-sum_i x_i c_i`` for cosine; lowest
index on equal values), which differs from float64 torch (another summation order) only when two codes' float64
distances are within a few units in the last place: relative gaps below about d * 2^-53.
"""

from __future__ import annotations

import torch

# unit roundoff of the operands fed to the tensor cores ("ieee": float32 as it is), for reference: the bound
# uses the measured rounding of each row and code instead
SCORE_PRECISIONS = {"bf16": 2.0 ** -8, "tf32": 2.0 ** -11, "ieee": 0.0}
FLOAT32_UNIT = 2.0 ** -24
SAFETY = 2.0
CENTERING_ERROR = SAFETY * 2 * FLOAT32_UNIT * 1.01  # per unit of ||x'||^2
MAX_FUSED_DIM = 256  # a row block's operands stay in registers up to this code dimension


def accumulation_error(dim: int) -> float:
    """float32 sums of ``dim`` exact products, truncating: per unit of ``||X|| ||C||``."""
    return dim * 2 * FLOAT32_UNIT


def rounding_error(dim: int) -> float:
    """The float32 arithmetic around the dot product, per unit of ``2 ||x'|| ||c'|| + ||c'||^2``."""
    return (dim + 6) * FLOAT32_UNIT


def squared_norm_error(dim: int) -> float:
    """Relative bound on a float32 sum of ``dim`` squares (``||x'||^2``), with the safety factor."""
    return SAFETY * (dim + 2) * FLOAT32_UNIT


def check_precision(precision: str) -> None:
    if precision not in SCORE_PRECISIONS:
        raise ValueError(f"score precision must be one of {sorted(SCORE_PRECISIONS)}, got {precision!r}")


def score_error(x: torch.Tensor, x_scored: torch.Tensor, c: torch.Tensor, c_scored: torch.Tensor,
                use_cosine_sim: bool = False) -> torch.Tensor:
    """E_j of the module text for rows (n, d) and codes (k, d) (centered for Euclidean search) and their
    rounded forms: (n, k).  The kernel computes the same expression tile by tile."""
    d = x.shape[-1]
    x_norm, c_norm = x.norm(dim=-1, keepdim=True), c.norm(dim=-1)
    dx, dc = (x_scored - x).norm(dim=-1, keepdim=True), (c_scored - c).norm(dim=-1)
    xs, cs = x_scored.norm(dim=-1, keepdim=True), c_scored.norm(dim=-1)
    dot = dx * c_norm + xs * dc + accumulation_error(d) * xs * cs
    if use_cosine_sim:
        return SAFETY * (dot + rounding_error(d) * x_norm * c_norm)
    c_sq = c.square().sum(dim=-1)
    return SAFETY * (2 * dot + rounding_error(d) * (2 * x_norm * c_norm + c_sq)) + \
        CENTERING_ERROR * x.square().sum(dim=-1, keepdim=True)


def round_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """float32 ``t`` rounded to nearest (even) at the score precision, kept in float32: what tensor cores
    multiply (the kernel rounds TF32 itself the same way, so the hardware's own conversion changes nothing)."""
    if precision == "bf16":
        return t.to(torch.bfloat16).float()
    if precision == "tf32":  # 10 stored mantissa bits: round the low 13 of 23 away, ties to even
        bits = t.contiguous().view(torch.int32)
        tie_to_even = (bits >> 13) & 1
        rounded = ((bits + 0xFFF + tie_to_even) & ~0x1FFF).view(torch.float32)
        return torch.where(t.isfinite(), rounded, t)
    return t
