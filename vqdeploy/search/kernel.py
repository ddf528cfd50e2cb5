"""The Triton kernel behind the fused search, and its launcher.

One program takes ``BLOCK_N`` rows of one codebook and walks the codes ``BLOCK_K`` at a time:
1. scores on tensor cores (bf16 or TF32 operands, float32 accumulation), never an N x K matrix in memory;
2. keeps, per row, the smallest upper bound (:mod:`.bounds`) and, in registers, the ``CANDIDATES`` codes with
   the smallest lower bounds among those not above it, and the smallest such lower bound it had to drop;
3. rescores the kept codes in float64 from the float32 rows and codes;
4. when a row's candidates are not certified (a dropped lower bound at or below both the best upper bound and
   the best kept code's exact score: near-duplicate codes, many near-ties), searches that block again over
   every code in float64.

With TRITON_INTERPRET=1 set before Triton is imported, the same kernels run on CPU tensors in Triton's
interpreter (slow: for tests without a GPU); the operands are rounded by the same integer arithmetic there, and
multiplied in float32, where products of bf16 or TF32 values are exact, as on tensor cores.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .bounds import (CENTERING_ERROR, MAX_FUSED_DIM, SAFETY, accumulation_error, check_precision, rounding_error,
                     squared_norm_error)


@triton.jit
def _centered(x_ptrs, center_ptrs, mask, dim_mask, COSINE: tl.constexpr):
    """Rows loaded, less the codes' mean for Euclidean search (distances do not change when rows and codes move
    together); zero outside ``mask``."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if not COSINE:
        x = tl.where(mask, x - tl.load(center_ptrs, mask=dim_mask, other=0.0)[None, :], 0.0)
    return x


@triton.jit
def _round_low_bits(x, DROP: tl.constexpr):
    """float32 ``x`` rounded to nearest (even) with its ``DROP`` lowest mantissa bits cleared: bf16 (16) or TF32
    (13) values, held in float32.  Integer arithmetic, so it rounds the same on every GPU and in the
    interpreter (whose own bf16 casts truncate)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)) & -(1 << DROP)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _score_operand(x, BF16: tl.constexpr, TF32: tl.constexpr, EMULATED: tl.constexpr):
    """``x`` as the tensor cores take it: rounded to nearest even at bf16's or TF32's precision (so that the
    hardware's own conversion changes nothing), bf16 itself for bf16 scores on a GPU; float32 for "ieee" and in
    the interpreter (whose bf16 dot products are wrong; products of bf16 values are exact in float32)."""
    if BF16:
        operand = _round_low_bits(x, 16)
        if not EMULATED:
            operand = operand.to(tl.bfloat16)
    elif TF32:
        operand = _round_low_bits(x, 13)
    else:
        operand = x
    return operand


@triton.jit
def _prepare_codes_kernel(codes_ptr, center_ptr, score_codes_ptr, code_stats_ptr, k, d,
                          COSINE: tl.constexpr, BF16: tl.constexpr, TF32: tl.constexpr, EMULATED: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """The codes' side of the search, in one pass: the centered codes as the tensor cores take them, and per
    code ||c'||^2, ||c'||, ||C - c'|| and ||C|| (the bound's terms, bounds.py)."""
    head = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < k
    dims = tl.arange(0, BLOCK_D)
    tile = col_ok[:, None] & (dims < d)[None, :]
    offsets = head * k * d + cols.to(tl.int64)[:, None] * d + dims[None, :]
    c = _centered(codes_ptr + offsets, center_ptr + head * d + dims, tile, dims < d, COSINE)
    operand = _score_operand(c, BF16, TF32, EMULATED)
    tl.store(score_codes_ptr + offsets, operand, mask=tile)
    rounded = operand.to(tl.float32)
    c_sq = tl.sum(c * c, axis=1)
    stats = code_stats_ptr + head * 4 * k + cols
    tl.store(stats, c_sq, mask=col_ok)
    tl.store(stats + k, tl.sqrt(c_sq), mask=col_ok)
    tl.store(stats + 2 * k, tl.sqrt(tl.sum((rounded - c) * (rounded - c), axis=1)), mask=col_ok)
    tl.store(stats + 3 * k, tl.sqrt(tl.sum(rounded * rounded, axis=1)), mask=col_ok)


@triton.jit
def _nearest_kernel(x_ptr, center_ptr, codes_ptr, score_codes_ptr, code_stats_ptr,
                    out_ptr, certified_ptr, n, k, d, safety, acc_error, fp_error, centering_error, x_sq_error,
                    COSINE: tl.constexpr, EMULATED: tl.constexpr, BF16: tl.constexpr, TF32: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, CANDIDATES: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, RESCORE_D: tl.constexpr):
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < d
    tile = row_ok[:, None] & dim_ok[None, :]
    rows64 = rows.to(tl.int64)
    row_ptrs = x_ptr + head * n * d + rows64[:, None] * d  # each row's first element, (BLOCK_N, 1)
    # the rows' side of the bound, RESCORE_D dimensions at a time (few registers): ||x'||^2, and the rounding
    # residual and the rounded row, measured
    x_sq = tl.zeros((BLOCK_N,), tl.float32)
    residual_sq = tl.zeros((BLOCK_N,), tl.float32)
    rounded_sq = tl.zeros((BLOCK_N,), tl.float32)
    for part in range(0, d, RESCORE_D):
        part_dims = part + tl.arange(0, RESCORE_D)
        part_tile = row_ok[:, None] & (part_dims < d)[None, :]
        part_x = _centered(row_ptrs + part_dims[None, :], center_ptr + head * d + part_dims,
                           part_tile, part_dims < d, COSINE)
        part_rounded = _score_operand(part_x, BF16, TF32, EMULATED).to(tl.float32)
        x_sq += tl.sum(part_x * part_x, axis=1)
        residual_sq += tl.sum((part_rounded - part_x) * (part_rounded - part_x), axis=1)
        rounded_sq += tl.sum(part_rounded * part_rounded, axis=1)
    x_norm = tl.sqrt(x_sq)
    residual_norm = tl.sqrt(residual_sq)
    rounded_norm = tl.sqrt(rounded_sq)
    # the whole rows as the tensor cores take them, held for the scan
    x_scored = _score_operand(_centered(row_ptrs + dims[None, :], center_ptr + head * d + dims,
                                        tile, dim_ok, COSINE), BF16, TF32, EMULATED)

    slots = tl.arange(0, CANDIDATES)
    tile_cols = tl.arange(0, BLOCK_K)
    kept = tl.full((BLOCK_N, CANDIDATES), float("inf"), tl.float32)  # lower bounds of the kept codes
    kept_idx = tl.zeros((BLOCK_N, CANDIDATES), tl.int32)
    upper = tl.full((BLOCK_N,), float("inf"), tl.float32)
    dropped = tl.full((BLOCK_N,), float("inf"), tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tile_cols
        col_ok = cols < k
        c_ptrs = score_codes_ptr + head * k * d + cols.to(tl.int64)[None, :] * d + dims[:, None]
        c = tl.load(c_ptrs, mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
        dot = tl.dot(x_scored, c, input_precision=INPUT_PRECISION)
        stats = code_stats_ptr + head * 4 * k + cols  # per code: ||c'||^2, ||c'||, ||C - c'||, ||C||
        c_sq = tl.load(stats, mask=col_ok, other=0.0)
        c_norm = tl.load(stats + k, mask=col_ok, other=0.0)
        dot_err = (residual_norm[:, None] * c_norm[None, :]
                   + rounded_norm[:, None] * tl.load(stats + 2 * k, mask=col_ok, other=0.0)[None, :]
                   + acc_error * rounded_norm[:, None] * tl.load(stats + 3 * k, mask=col_ok, other=0.0)[None, :])
        spread = x_norm[:, None] * c_norm[None, :]
        if COSINE:
            approx = -dot
            err = safety * (dot_err + fp_error * spread)
        else:
            approx = c_sq[None, :] - 2.0 * dot
            err = (safety * (2.0 * dot_err + fp_error * (2.0 * spread + c_sq[None, :]))
                   + centering_error * x_sq[:, None])
        upper = tl.minimum(upper, tl.min(tl.where(col_ok[None, :], approx + err, float("inf")), axis=1))
        # a code whose lower bound is above the best upper bound so far can never win: it is left out here and
        # needs no record (it stays above the final upper bound).  The rest, usually none or one per row, move
        # into the kept slots, one at a time while any row of the block has one below the largest it keeps.
        lower = tl.where(col_ok[None, :] & (approx - err <= upper[:, None]), approx - err, float("inf"))
        value = tl.min(lower, axis=1)
        worst = tl.max(kept, axis=1)
        for _ in tl.static_range(CANDIDATES):
            if tl.sum((value < worst).to(tl.int32), axis=0) > 0:
                col = tl.argmin(lower, axis=1)
                lower = tl.where(tile_cols[None, :] == col[:, None], float("inf"), lower)
                take = value < worst
                dropped = tl.minimum(dropped, tl.where(take, worst, value))
                replace = (slots[None, :] == tl.argmax(kept, axis=1)[:, None]) & take[:, None]
                kept = tl.where(replace, value[:, None], kept)
                kept_idx = tl.where(replace, (start + col)[:, None], kept_idx)
                value = tl.min(lower, axis=1)
                worst = tl.max(kept, axis=1)
        dropped = tl.minimum(dropped, value)  # the rest of the tile

    # float64 rescoring of the kept codes, RESCORE_D dimensions at a time (rows reread from cache)
    codes_base = codes_ptr + head * k * d
    best_score = tl.full((BLOCK_N,), float("inf"), tl.float64)
    best = tl.zeros((BLOCK_N,), tl.int32)
    for slot in tl.static_range(CANDIDATES):
        in_slot = slots[None, :] == slot
        idx = tl.sum(tl.where(in_slot, kept_idx, 0), axis=1)
        valid = tl.min(tl.where(in_slot, kept, float("inf")), axis=1) < float("inf")
        score = tl.zeros((BLOCK_N,), tl.float64)
        for part in range(0, d, RESCORE_D):
            part_dims = part + tl.arange(0, RESCORE_D)
            part_tile = row_ok[:, None] & (part_dims < d)[None, :]
            xs = tl.load(row_ptrs + part_dims[None, :], mask=part_tile,
                         other=0.0).to(tl.float64)
            cs = tl.load(codes_base + idx.to(tl.int64)[:, None] * d + part_dims[None, :],
                         mask=part_tile & valid[:, None], other=0.0).to(tl.float64)
            if COSINE:
                score -= tl.sum(xs * cs, axis=1)
            else:
                score += tl.sum((xs - cs) * (xs - cs), axis=1)
        score = tl.where(valid, score, float("inf"))
        better = (score < best_score) | ((score == best_score) & (idx < best))
        best_score = tl.where(better, score, best_score)
        best = tl.where(better, idx, best)

    # certified: every code left out has a lower bound above the best upper bound, or above the exact score of
    # the best kept code, in the scan's units (Euclidean: ||x - c||^2 - ||x'||^2, ||x'||^2 known to float32
    # accuracy: x_sq_error; the float64 scores within 1e-12)
    if COSINE:
        best_shifted = best_score + tl.abs(best_score) * 1e-12
    else:
        best_shifted = best_score * (1.0 + 1e-12) - x_sq.to(tl.float64) * (1.0 - x_sq_error)
    certified = (dropped > upper) | (dropped.to(tl.float64) > best_shifted)
    if tl.sum((row_ok & (certified == 0)).to(tl.int32), axis=0) > 0:  # rare: every code, in float64
        best_score = tl.full((BLOCK_N,), float("inf"), tl.float64)
        for j in range(0, k):
            exact = tl.zeros((BLOCK_N,), tl.float64)
            for part in range(0, d, RESCORE_D):
                part_dims = part + tl.arange(0, RESCORE_D)
                part_ok = part_dims < d
                xs = tl.load(row_ptrs + part_dims[None, :],
                             mask=row_ok[:, None] & part_ok[None, :], other=0.0).to(tl.float64)
                code = tl.load(codes_base + j * d + part_dims, mask=part_ok, other=0.0).to(tl.float64)
                if COSINE:
                    exact -= tl.sum(xs * code[None, :], axis=1)
                else:
                    exact += tl.sum((xs - code[None, :]) * (xs - code[None, :]), axis=1)
            closer = exact < best_score
            best_score = tl.where(closer, exact, best_score)
            best = tl.where(closer, j, best)
    tl.store(out_ptr + head * n + rows, best.to(tl.int64), mask=row_ok)
    tl.store(certified_ptr + head * n + rows, certified.to(tl.int8), mask=row_ok)


# (BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner tries per precision.  Built for sm_90 with 16 kept
# candidates (``python -m vqdeploy.search.build``, on any machine) every one fits in shared memory; the 64-row
# ones spill at most ~0.1 KB but TF32's 4-warp one (~0.6 KB), like bf16's 128-row one.
TUNING_CONFIGS = {
    "bf16": [(64, 32, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3)],
    "tf32": [(64, 32, 4, 2), (64, 32, 8, 2)],
    "ieee": [(64, 32, 8, 2)],
}
INTERPRETER_CONFIG = (64, 64, 4, 1)
PREPARE_BLOCK = 16  # codes per program of the preparing kernel
# fused multiply-adds round once where a product and a sum round twice, so the bound (bounds.py) holds either way;
# said explicitly, as Triton 3.9 asks (its default changes in 3.10)
FP_FUSION = True


@functools.cache
def _tuned(precision: str):
    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
               for bn, bk, warps, stages in TUNING_CONFIGS[precision]]
    return triton.autotune(configs, key=["k", "d", "COSINE", "CANDIDATES"])(_nearest_kernel)


@functools.cache
def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter: fixed for the process, since Triton decides it when it
    decorates them (TRITON_INTERPRET=1 set before Triton is imported)."""
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.4
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


def _flags(use_cosine_sim: bool, precision: str, emulated: bool) -> dict:
    return dict(COSINE=use_cosine_sim, EMULATED=emulated, BF16=precision == "bf16", TF32=precision == "tf32")


def _block_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def search_constants(use_cosine_sim: bool, precision: str, candidates: int, d: int, emulated: bool) -> dict:
    """The search kernel's compile-time arguments, but its tile sizes (shared with ``build``)."""
    block_d = _block_dim(d)
    return dict(_flags(use_cosine_sim, precision, emulated), CANDIDATES=candidates, BLOCK_D=block_d,
                RESCORE_D=min(32, block_d), INPUT_PRECISION="tf32" if precision == "tf32" and not emulated else "ieee")


def prepare_constants(use_cosine_sim: bool, precision: str, d: int, emulated: bool) -> dict:
    """The preparing kernel's compile-time arguments (shared with ``build``)."""
    return dict(_flags(use_cosine_sim, precision, emulated), BLOCK_C=PREPARE_BLOCK, BLOCK_D=_block_dim(d))


def prepare_codes(codes: torch.Tensor, use_cosine_sim: bool, precision: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The codes' side of a search (h, k, d), in two launches: the center (h, d: the codes' mean, zeros for
    cosine), the centered codes as the tensor cores take them (h, k, d: bf16 on a GPU for bf16 scores, else
    float32) and per code ||c'||^2, ||c'||, ||C - c'||, ||C|| (h, 4, k)."""
    h, k, d = codes.shape
    emulated = interpreting()
    center = torch.zeros(h, d, device=codes.device) if use_cosine_sim else codes.mean(dim=1)
    score_dtype = torch.bfloat16 if precision == "bf16" and not emulated else torch.float32
    score_codes = torch.empty(h, k, d, device=codes.device, dtype=score_dtype)
    code_stats = torch.empty(h, 4, k, device=codes.device)
    _prepare_codes_kernel[(triton.cdiv(k, PREPARE_BLOCK), h)](
        codes, center, score_codes, code_stats, k, d, **prepare_constants(use_cosine_sim, precision, d, emulated),
        enable_fp_fusion=FP_FUSION)
    return center, score_codes, code_stats


def fused_nearest(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool = False, precision: str = "bf16",
                  candidates: int = 16, config: tuple[int, int, int, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest code per row, exact (see :mod:`.bounds`): (h, n, d), (h, k, d) float32 -> indices (h, n) int64
    and ``certified`` (h, n) bool: True where the kept candidates were proven to hold the nearest code (False
    rows were searched again in float64; their index is as exact).  ``config``: (BLOCK_N, BLOCK_K, num_warps,
    num_stages) instead of the autotuner's choice among ``TUNING_CONFIGS``."""
    indices, certified = launch(x, codes, use_cosine_sim, precision, candidates, config)
    return indices, certified.bool()


def launch(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool, precision: str, candidates: int,
           config: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_nearest` with ``certified`` left as the kernel writes it (int8): no conversion kernel."""
    if x.dim() != 3 or codes.dim() != 3 or x.shape[0] != codes.shape[0] or x.shape[2] != codes.shape[2]:
        raise ValueError(f"expected rows (h, n, d) and codes (h, k, d), got {tuple(x.shape)} and "
                         f"{tuple(codes.shape)}")
    if x.dtype != torch.float32 or codes.dtype != torch.float32:
        raise TypeError(f"the fused search takes float32 rows and codes, got {x.dtype} and {codes.dtype}")
    if x.device != codes.device:
        raise ValueError(f"rows on {x.device} and codes on {codes.device}")
    h, n, d = x.shape
    k = codes.shape[1]
    if k == 0:
        raise ValueError("the codebook is empty: there is no nearest code")
    if d > MAX_FUSED_DIM:
        raise ValueError(f"the fused search takes code dimensions up to {MAX_FUSED_DIM}, got {d}")
    emulated = interpreting()
    if x.device.type != "cuda" and not emulated:
        raise ValueError(f"the fused search runs on CUDA tensors (got {x.device}); on the CPU only in Triton's "
                         "interpreter (TRITON_INTERPRET=1 set before Triton is imported)")
    if candidates < 1 or candidates & (candidates - 1):
        raise ValueError(f"candidates must be a power of two, got {candidates}")
    check_precision(precision)
    x = x.contiguous()
    codes = codes.contiguous()
    indices = torch.empty(h, n, dtype=torch.int64, device=x.device)
    certified = torch.empty(h, n, dtype=torch.int8, device=x.device)
    if n == 0:
        return indices, certified
    center, score_codes, code_stats = prepare_codes(codes, use_cosine_sim, precision)
    args = (x, center, codes, score_codes, code_stats, indices, certified, n, k, d, SAFETY,
            accumulation_error(d), rounding_error(d), CENTERING_ERROR, squared_norm_error(d))
    constants = dict(search_constants(use_cosine_sim, precision, candidates, d, emulated), enable_fp_fusion=FP_FUSION)
    if config is None and not emulated:
        _tuned(precision)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), h)](*args, **constants)
    else:
        block_n, block_k, warps, stages = config or INTERPRETER_CONFIG
        _nearest_kernel[(triton.cdiv(n, block_n), h)](*args, **constants, BLOCK_N=block_n, BLOCK_K=block_k,
                                                       num_warps=warps, num_stages=stages)
    return indices, certified
