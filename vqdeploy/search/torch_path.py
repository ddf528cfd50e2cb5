"""The nearest-code search in float32 torch ops: the CPU and export path, and the fused kernel's reference and
fallback (``search/dispatch.py``), so it sits below both the kernel's dispatch and ``primitives``."""

import torch


def sq_dist_scores(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``||c||^2 - 2 x.c`` for every row and code: (h, n, d), (h, k, d) -> (h, n, k).

    This is the squared Euclidean distance less ``||x||^2``: its argmin is the
    nearest code, without the square root, the clamp or ``||x||^2`` (which do
    not change the winner), as FAISS and most VQ codebases do."""
    sq_norms = codes.pow(2).sum(dim=-1)
    if codes.shape[0] == 1:  # one codebook: a 2-D addmm, which exports as a single ONNX Gemm (bias fused)
        return torch.addmm(sq_norms, x[0], codes[0].t(), alpha=-2.0).unsqueeze(0)
    return torch.baddbmm(sq_norms.unsqueeze(1), x, codes.transpose(1, 2), alpha=-2.0)


def cosine_logits(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, codes.transpose(1, 2))


SCORE_BLOCK_ELEMENTS = 1 << 25  # rows x codes scores computed at once (128 MiB of float32)


def nearest_codes_torch(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool = False) -> torch.Tensor:
    """``nearest_codes`` in float32 torch ops (CPU, export, and the fused kernel's reference and fallback).

    Rows are matched in blocks of at most ``SCORE_BLOCK_ELEMENTS`` scores, a static loop over row slices, so a
    large codebook (2^16 codes and more) never needs the whole rows x codes matrix.  An export (whose row count
    is symbolic) matches all rows at once."""
    h, n, _ = x.shape
    block = max(1, SCORE_BLOCK_ELEMENTS // (h * codes.shape[1]))
    exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
    if exporting or n <= block:
        return _nearest_block(x, codes, use_cosine_sim)
    return torch.cat([_nearest_block(x[:, start:start + block], codes, use_cosine_sim)
                      for start in range(0, n, block)], dim=1)


def _nearest_block(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool) -> torch.Tensor:
    if use_cosine_sim:
        return cosine_logits(x, codes).argmax(dim=-1)
    return sq_dist_scores(x, codes).argmin(dim=-1)
