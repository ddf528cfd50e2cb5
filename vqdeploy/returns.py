"""Output tuples that several quantizers return (the ground floor: imports nothing of vqdeploy)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizeOutput(NamedTuple):
    """What ``forward`` returns; unpacks like the reference's tuple."""

    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # (b, *tokens) or (b, *tokens, heads)
    loss: torch.Tensor  # () under 1.32.0's defaults, (1,) under 1.14.17's


class QuantizeLossOutput(NamedTuple):
    """What ``forward(x, indices=...)`` returns: the quantized input and the
    cross-entropy of the distances against the given codes (NaturalSpeech 2)."""

    quantized: torch.Tensor
    ce_loss: torch.Tensor


class ResidualOutput(NamedTuple):
    """What a residual quantizer's ``forward`` returns; unpacks like the reference's tuple."""

    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # (b, *tokens, q); -1 where a layer was dropped out
    losses: torch.Tensor  # (q,), or (1, q) with layers that return (1,) losses (1.14.17)


class ResidualOutputWithCodes(NamedTuple):
    """``forward(..., return_all_codes=True)``: also every layer's codes."""

    quantized: torch.Tensor
    indices: torch.Tensor
    losses: torch.Tensor
    all_codes: torch.Tensor  # (q, b, *tokens, codebook_dim), zeros where dropped
