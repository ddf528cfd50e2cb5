"""FSP: finite scalar perturbation (VP-VAE, arXiv 2602.17133), as vector-quantize-pytorch 1.31.0 added it.

Each channel goes through a CDF activation into [0, 1] and falls into one of ``levels`` equal bins; the output
is the bin's centre, mapped back (linearly to unit variance, or through the inverse CDF with ``need_inv_act``).
In training, with probability 1 - ``quantize_rate`` per value, the bin centre is replaced by the activation
moved by uniform noise of up to half a bin (kept inside (0, 1)): a perturbation instead of a rounding.  A loss
pulls the batch's moments of the projected input towards the CDF's (``vector_norm``).  Indices and decoding
are FSQ's mixed radix over the bins.  Random numbers come from one uniform draw in the graph.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import number
from .config import records_config
from .fsq import check_levels
from .grid import GridQuantizer
from .primitives import draw_uniform

UNIT_VARIANCE = 0.28867513459481287  # the standard deviation of U(0, 1): bin centres map to unit variance
_SQRT2 = math.sqrt(2.0)

# name -> (CDF onto [0, 1], its inverse)
CDF_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "tanh": (lambda z: (z.tanh() + 1.0) / 2.0, lambda p: torch.atanh(p * 2.0 - 1.0)),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (lambda z: (1.0 + torch.erf(z / _SQRT2)) / 2.0, lambda p: torch.erfinv(2.0 * p - 1.0) * _SQRT2),
    "laplace": (lambda z: 0.5 * (1.0 + z.sign() * (1.0 - (-z.abs()).exp())),
                lambda p: -(p - 0.5).sign() * torch.log(1.0 - 2.0 * (p - 0.5).abs())),
    "cauchy": (lambda z: torch.atan(z) / math.pi + 0.5, lambda p: torch.tan((p - 0.5) * math.pi)),
}

# the moments a CDF's input should have: (mean, variance, skewness, excess kurtosis) targets and weights
VECTOR_NORM_PRESETS: dict[str, dict[str, float]] = {
    "none": dict(l1_weight=0.0, l2_weight=0.0, l3_weight=0.0, l4_weight=0.0),
    "var": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
    "kurt": dict(l1_target=0.0, l1_weight=0.1, l2_target=1.0, l2_weight=0.07, l3_target=0.0, l3_weight=0.06,
                 l4_target=0.0, l4_weight=0.05),
    "var_tanh": dict(l1_target=0.0, l1_weight=0.1, l2_target=0.8225, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
    "var_sigmoid": dict(l1_target=0.0, l1_weight=0.1, l2_target=3.29, l2_weight=0.07, l3_weight=0.0,
                        l4_weight=0.0),
    "var_laplace": dict(l1_target=0.0, l1_weight=0.1, l2_target=2.0, l2_weight=0.07, l3_weight=0.0, l4_weight=0.0),
}


class VectorNorm(nn.Module):
    """Squared distances of the batch's per-channel mean, variance (unbiased), skewness and excess kurtosis from
    their targets, weighted: ``(loss, {"mean", "variance", "skewness", "kurtosis"})``."""

    def __init__(self, l1_target: float = 0.0, l1_weight: float = 0.1, l2_target: float = 1.0,
                 l2_weight: float = 0.07, l3_target: float = 0.0, l3_weight: float = 0.06, l4_target: float = 0.0,
                 l4_weight: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.targets = (l1_target, l2_target, l3_target, l4_target)
        self.weights = (l1_weight, l2_weight, l3_weight, l4_weight)
        self.eps = eps

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, dict]:
        variance, mean = torch.var_mean(z, dim=0, unbiased=True)
        z_scores = (z - mean) / variance.sqrt().clamp_min(self.eps)
        moments = dict(mean=mean, variance=variance, skewness=z_scores.pow(3).mean(dim=0),
                       kurtosis=z_scores.pow(4).mean(dim=0) - 3.0)
        loss = sum(((moment - target) ** 2).mean() * weight
                   for moment, target, weight in zip(moments.values(), self.targets, self.weights))
        return loss, moments


class FSPOutput(NamedTuple):
    """What ``FSP.forward`` returns, as 1.32.0's tuple."""

    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # int32, the input's shape without the feature axis
    norm_loss: torch.Tensor  # 0-d
    info: dict  # level_indices (float, (..., len(levels))), norm_info (moments), p_accept_prob (training)


@records_config
class FSP(GridQuantizer):
    """Finite scalar perturbation over ``len(levels)`` channels (projected from ``dim`` when they differ)."""

    def __init__(self, levels: Sequence[int], dim: int | None = None, channel_first: bool = False,
                 projection_has_bias: bool = True, act_name: str = "tanh", quantize_rate: float = 0.0,
                 need_inv_act: bool = False, vector_norm: str = "var_tanh"):
        super().__init__()
        levels = check_levels(levels)
        number("quantize_rate", quantize_rate, 0.0, 1.0)
        if act_name not in CDF_ACTIVATIONS:
            raise ValueError(f"act_name must be one of {sorted(CDF_ACTIVATIONS)}, got {act_name!r}")
        if vector_norm not in VECTOR_NORM_PRESETS:
            raise ValueError(f"vector_norm must be one of {sorted(VECTOR_NORM_PRESETS)}, got {vector_norm!r}")
        self.levels = levels
        self._init_groups(len(levels), 1, None, dim, projection_has_bias)
        self.codebook_size = math.prod(levels)
        self.channel_first = bool(channel_first)
        self.act_name = act_name
        self.act_func, self.inv_act_func = CDF_ACTIVATIONS[act_name]
        self.quantize_rate = float(quantize_rate)
        self.need_inv_act = bool(need_inv_act)
        self.vector_norm = VectorNorm(**VECTOR_NORM_PRESETS[vector_norm])
        self._init_levels(levels)
        # every channel's decoded bin centres (codebook_dim, max level), so that decoding is a lookup (the inverse
        # CDFs need not be in an exported graph; erfinv has no ONNX op)
        width = max(levels)
        centres = torch.stack([F.pad(self.bin_centres_of(level), (0, width - level), value=0.5) for level in levels])
        self.register_buffer("_decoded_centres", self.from_unit_interval(centres, 1e-6), persistent=False)

    @staticmethod
    def bin_centres_of(level: int) -> torch.Tensor:
        return (torch.arange(level, dtype=torch.float32) + 0.5) / level

    @property
    def maps_channel_first(self) -> bool:
        """Feature maps are channel-first only with ``channel_first``, as 1.32.0's FSP reads them."""
        return self.channel_first

    # ------------------------------------------------------------------ bins and indices

    def level_position(self, z: torch.Tensor, eps: float | None = None) -> torch.Tensor:
        """Where the activation of z (..., codebook_dim) falls on each channel's bins: bin = floor(position)."""
        return self._bin_position(self.act_func(z), torch.finfo(z.dtype).eps if eps is None else eps)

    def _bin_position(self, act: torch.Tensor, eps: float) -> torch.Tensor:
        return act.clamp_max(1.0 - eps) * self._levels

    def bin_centres(self, level_indices: torch.Tensor) -> torch.Tensor:
        return (level_indices + 0.5) / self._levels

    def from_unit_interval(self, act: torch.Tensor, eps: float) -> torch.Tensor:
        """Bin centres (or perturbed activations) in (0, 1) -> features: through the inverse CDF with
        ``need_inv_act``, else linearly to unit variance."""
        if self.need_inv_act:
            return self.inv_act_func(act.clamp(eps, 1.0 - eps))
        return (act - 0.5) / UNIT_VARIANCE

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> features before ``project_out``: each channel's decoded bin centre (1.32.0's
        ``indices_to_codes`` computes the same float32 values, clamping at 1e-6)."""
        table = self._decoded_centres
        flat = self.indices_to_level_indices(indices).long() + torch.arange(table.shape[0], device=table.device) \
            * table.shape[1]
        return table.flatten()[flat]

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> the eval output for them (after ``project_out``), channel-first with ``channel_first``."""
        return self._decode_indices(indices, channel_first=self.channel_first, maps_channel_first=False)

    # ------------------------------------------------------------------ forward

    def _rows(self, z: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """z -> (rows (N, dim), the channel-last shape): (..., dim), or (b, dim, ...) with ``channel_first``."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(z).__name__}")
        if not z.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point tensor of features, got {z.dtype}")
        if self.channel_first:
            if z.ndim < 2:
                raise ValueError(f"channel_first=True expects (batch, {self.dim}, ...), got {tuple(z.shape)}")
            z = z.movedim(1, -1)
        if z.ndim < 1 or z.shape[-1] != self.dim:
            raise ValueError(f"expected {self.dim} features on the {'second' if self.channel_first else 'last'} "
                             f"axis, got input of shape {tuple(z.shape)}")
        return z.reshape(-1, self.dim), tuple(z.shape)

    def _restore(self, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        out = rows.reshape(*shape[:-1], rows.shape[-1])
        return out.movedim(-1, 1) if self.channel_first else out

    def forward(self, z: torch.Tensor, eps: float | None = None) -> FSPOutput:
        """z: (..., dim), or (b, dim, ...) with ``channel_first``.  Returns ``(quantized, int32 indices,
        norm_loss, info)``; in eval (and with ``quantize_rate=1``) every value is its bin's centre."""
        rows, shape = self._rows(z)
        eps = eps or torch.finfo(z.dtype).eps
        z = self.project_in(rows)
        norm_loss, norm_info = self.vector_norm(z)
        act = self.act_func(z)
        level_indices = self._bin_position(act, eps).floor().detach()
        centres = self.bin_centres(level_indices)
        q_act = act + (centres - act).detach()  # straight through
        info = {}
        quantize_rate = self.quantize_rate if self.training else 1.0
        if quantize_rate < 1.0:
            q_act, info["p_accept_prob"] = self._perturb(act, q_act, quantize_rate)
        if self.need_inv_act:
            q_z = self.from_unit_interval(q_act, eps)
            q_z = z + (q_z - z).detach()
        else:
            q_z = self.from_unit_interval(q_act, eps)
        indices = self.level_indices_to_indices(level_indices)
        q_z = self.project_out(q_z)
        info = {"level_indices": level_indices.reshape(*shape[:-1], -1), "norm_info": norm_info, **info}
        return FSPOutput(self._restore(q_z, shape), indices.reshape(shape[:-1]), norm_loss, info)

    def _perturb(self, act: torch.Tensor, q_act: torch.Tensor, quantize_rate: float):
        """Each value, with probability 1 - ``quantize_rate``, becomes its activation moved by uniform noise of
        up to half a bin (rejected, keeping the activation, where it would leave (0, 1)); one uniform draw."""
        uniform = draw_uniform({"fsp": (2, *act.shape)}, act.device)["fsp"].to(act.dtype)
        proposal = act + (uniform[0] * 2.0 - 1.0) / (self._levels * 2)
        accepted = (proposal > 0.0) & (proposal < 1.0)
        perturbed = torch.where(accepted, proposal, act)
        return torch.where(uniform[1] > quantize_rate, perturbed, q_act), accepted.float().mean()

    # ------------------------------------------------------------------ pure eval API

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices for z, as eval ``forward`` gives them (the export encoder)."""
        rows, shape = self._rows(z)
        position = self.level_position(self.project_in(rows), torch.finfo(rows.dtype).eps)
        return self.level_indices_to_indices(position.floor()).reshape(shape[:-1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices_to_codes`` (the export decoder)."""
        return self.indices_to_codes(indices)
