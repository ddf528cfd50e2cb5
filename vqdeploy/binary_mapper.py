"""BinaryMapper: ``bits`` logits -> a one-hot code of 2^bits (Fleuret's Free Transformer, arXiv 2510.17558), as
vector-quantize-pytorch 1.25.0 added it.

Each bit is sampled from its sigmoid (or thresholded, ``deterministic``), the bits number a code (bit j worth
2^j) and the output is that code's one-hot.  In training the gradient reaches the logits straight through the
code distribution the bits define (a product of Bernoullis over all 2^bits codes), and an aux loss keeps the
bits' entropy within ``kl_loss_threshold`` nats of uniform (the KL to the uniform code distribution, hinged).
Sampling draws one uniform tensor in the graph, so the module compiles with ``fullgraph=True``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import number, positive_int
from .token_layout import check_indices_dtype
from .primitives import draw_uniform

NAT = math.log(2)  # one bit, in nats
MAX_BITS = 24  # the one-hot and the straight-through table have 2^bits entries per token


class BinaryMapperOutput(NamedTuple):
    one_hot: torch.Tensor  # (..., 2^bits) float
    aux_kl_loss: torch.Tensor  # 0-d, or (...) with reduce_aux_kl_loss=False; 0 unless computed


class BinaryMapperOutputWithIndices(NamedTuple):
    one_hot: torch.Tensor
    indices: torch.Tensor  # int64 (...)
    aux_kl_loss: torch.Tensor


def binary_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of independent bits with these logits, summed over the last axis."""
    prob = logits.sigmoid()
    return -(prob * F.logsigmoid(logits) + (1.0 - prob) * F.logsigmoid(-logits)).sum(dim=-1)


class BinaryMapper(nn.Module):
    """Logits (..., bits) -> one-hot codes (..., 2^bits) with a straight-through gradient and a KL aux loss."""

    def __init__(self, bits: int = 1, kl_loss_threshold: float = NAT, deterministic_on_eval: bool = False):
        super().__init__()
        positive_int("bits", bits)
        if bits > MAX_BITS:
            raise ValueError(f"bits must be at most {MAX_BITS} (each token's one-hot has 2^bits entries), got {bits}")
        number("kl_loss_threshold", kl_loss_threshold)
        self.bits = bits
        self.num_codes = 2 ** bits
        self.kl_loss_threshold = kl_loss_threshold
        self.deterministic_on_eval = bool(deterministic_on_eval)
        power_two = 2 ** torch.arange(bits)
        self.register_buffer("power_two", power_two, persistent=False)
        self.register_buffer("codes", (torch.arange(self.num_codes)[:, None] & power_two) != 0, persistent=False)
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    def binary_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        return binary_entropy(logits)

    def _check_logits(self, logits: torch.Tensor) -> None:
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
            raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
        if logits.ndim < 1 or logits.shape[-1] != self.bits:
            raise ValueError(f"logits must end with {self.bits} bits, got shape {tuple(logits.shape)}")

    def calc_aux_loss(self, logits: torch.Tensor, reduce_aux_kl_loss: bool = True) -> torch.Tensor:
        """relu(KL(code distribution || uniform) - threshold) per token: bits * ln 2 - the bits' entropy."""
        self._check_logits(logits)
        kl = self.bits * NAT - binary_entropy(logits)
        loss = F.relu(kl - self.kl_loss_threshold)
        return loss.mean() if reduce_aux_kl_loss else loss

    def log_prob(self, logits: torch.Tensor, *, indices: torch.Tensor | None = None,
                 one_hot: torch.Tensor | None = None, sum_bits: bool = True) -> torch.Tensor:
        """Log probability of codes (given as indices or one-hots) under the logits: (...) summed over the bits,
        else (..., bits)."""
        if (indices is None) == (one_hot is None):
            raise ValueError("log_prob takes exactly one of indices and one_hot")
        self._check_logits(logits)
        if one_hot is not None:
            indices = one_hot.argmax(dim=-1)
        check_indices_dtype(indices)
        if tuple(indices.shape) != tuple(logits.shape[:-1]):
            raise ValueError(f"indices must have shape {tuple(logits.shape[:-1])}, got {tuple(indices.shape)}")
        bits = (indices.long().unsqueeze(-1) & self.power_two) != 0
        log_probs = torch.where(bits, F.logsigmoid(logits), F.logsigmoid(-logits))
        return log_probs.sum(dim=-1) if sum_bits else log_probs

    def forward(self, logits: torch.Tensor, temperature: float = 1.0, straight_through: bool | None = None,
                calc_aux_loss: bool | None = None, deterministic: bool | None = None, return_indices: bool = False,
                reduce_aux_kl_loss: bool = True):
        """Returns ``(one_hot, aux_kl_loss)``, or ``(one_hot, indices, aux_kl_loss)`` with ``return_indices``.
        Defaults: straight-through gradient and aux loss in training; sampled bits unless ``deterministic`` (or
        ``deterministic_on_eval`` in eval), which thresholds at probability 0.5."""
        self._check_logits(logits)
        number("temperature", temperature, 0.0, low_open=True)
        deterministic = self.deterministic_on_eval and not self.training if deterministic is None else deterministic
        straight_through = self.training if straight_through is None else straight_through
        calc_aux_loss = self.training if calc_aux_loss is None else calc_aux_loss

        prob = (logits / temperature).sigmoid()
        if deterministic:
            bits = prob > 0.5
        else:
            bits = draw_uniform({"bits": tuple(logits.shape)}, logits.device)["bits"].to(prob.dtype) < prob
        indices = (self.power_two * bits.long()).sum(dim=-1)
        one_hot = F.one_hot(indices, self.num_codes).float()
        aux_kl_loss = self.calc_aux_loss(logits, reduce_aux_kl_loss) if calc_aux_loss else self.zero
        if straight_through:  # the gradient of every code's probability under the logits
            codes = self.codes.to(logits.dtype)
            soft = (F.logsigmoid(logits) @ codes.t() + F.logsigmoid(-logits) @ (1.0 - codes).t()).exp()
            one_hot = one_hot + soft - soft.detach()
        if return_indices:
            return BinaryMapperOutputWithIndices(one_hot, indices, aux_kl_loss)
        return BinaryMapperOutput(one_hot, aux_kl_loss)
