"""Grouped residual quantization (HiFi-Codec, https://arxiv.org/abs/2305.02765): the feature
dimension is split into groups and each group gets its own residual quantizer.

Written once over ``ResidualQuantizer``, so every residual family can be grouped.
All groups share one quantize-dropout draw per step, as in the reference.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from .checks import positive_int
from .token_layout import check_indices_dtype, to_tokens
from .residual import ResidualQuantizer, prepare_call
from .returns import QuantizeLossOutput


class GroupedOutput(NamedTuple):
    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # (groups, b, *tokens, q)
    losses: torch.Tensor  # (groups, q), or (groups, 1, q) with layers that return (1,) losses


class GroupedOutputWithCodes(NamedTuple):
    quantized: torch.Tensor
    indices: torch.Tensor
    losses: torch.Tensor
    all_codes: tuple[torch.Tensor, ...]  # per group (q, b, *tokens, d), a tuple like the reference's


class GroupedResidualQuantizer(nn.Module):
    """``groups`` residual quantizers over equal slices of the features; ``make_group(dim_per_group)`` builds one."""

    def __init__(self, dim: int, groups: int, make_group: Callable[[int], ResidualQuantizer],
                 accept_image_fmap: bool = False, channel_last: bool = True):
        super().__init__()
        positive_int("dim", dim)
        positive_int("groups", groups)
        if dim % groups:
            raise ValueError(f"groups ({groups}) must divide dim ({dim})")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = channel_last
        self.rvqs = nn.ModuleList([make_group(dim // groups) for _ in range(groups)])

    @property
    def num_quantizers(self) -> int:
        return self.rvqs[0].num_quantizers

    @property
    def codebook_size(self) -> int:
        return self.rvqs[0].codebook_size

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Codes of each layer (every group has the same)."""
        return self.rvqs[0].codebook_sizes

    def _per_group(self, indices, what: str = "indices") -> Sequence[torch.Tensor]:
        if isinstance(indices, torch.Tensor):
            check_indices_dtype(indices, what)
            if indices.ndim < 1:
                raise ValueError(f"{what} must have a leading groups dimension of size {self.groups}")
        elif not isinstance(indices, (tuple, list)):
            raise TypeError(f"{what} must be a tensor (groups, ...) or a sequence of one tensor per group, "
                            f"got {type(indices).__name__}")
        if len(indices) != self.groups:
            raise ValueError(f"{what} must hold one entry per group ({self.groups}), got {len(indices)}")
        return indices

    def forward(self, x: torch.Tensor, indices=None, return_all_codes: bool = False,
                sample_codebook_temp: float | None = None, freeze_codebook: bool = False,
                mask: torch.Tensor | None = None, rand_quantize_dropout_fixed_seed=None,
                num_quantizers: int | None = None):
        """x as for ``ResidualVQ`` with ``dim`` features; indices: (groups, b, *tokens, q) or one tensor per group.

        Returns ``(quantized, indices (groups, b, *tokens, q), losses (groups, q))`` (plus a tuple
        of per-group ``all_codes`` when asked), or ``(quantized, ce_loss)`` when ``indices`` are given."""
        first = self.rvqs[0]
        k = first.bandwidth(num_quantizers)
        tokens, layout, token_weights = prepare_call(self, x, mask, sample_codebook_temp,
                                                     rand_quantize_dropout_fixed_seed)
        targets = [None] * self.groups
        if indices is not None:
            targets = [rvq._target_tokens(group_indices, layout, k)
                       for rvq, group_indices in zip(self.rvqs, self._per_group(indices))]
        active_count = None
        if self.training and indices is None:
            active_count = first.draw_active_count(k, tokens.device, rand_quantize_dropout_fixed_seed)

        outs = [rvq.quantize_tokens(chunk, token_weights, target, sample_codebook_temp, freeze_codebook, k,
                                    active_count)
                for rvq, chunk, target in zip(self.rvqs, tokens.chunk(self.groups, dim=-1), targets)]
        quantized = layout.restore_features(torch.cat([out[0] for out in outs], dim=-1))
        if indices is not None:
            return QuantizeLossOutput(quantized, sum(out.ce_loss for out in outs))
        all_indices = torch.stack([layout.restore_indices(out.indices) for out in outs])
        losses = torch.stack([out.losses for out in outs])
        if not return_all_codes:
            return GroupedOutput(quantized, all_indices, losses)
        all_codes = tuple(rvq._codes(group_indices) for rvq, group_indices in zip(self.rvqs, all_indices))
        return GroupedOutputWithCodes(quantized, all_indices, losses, all_codes)

    # ------------------------------------------------------------------ pure eval API

    def encode(self, x: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """Indices (groups, b, *tokens, q) for ``x``, without touching any state."""
        tokens, layout = to_tokens(x, self.dim, self.channel_last, self.accept_image_fmap)
        return torch.stack([layout.restore_indices(rvq.encode_tokens(chunk, num_quantizers))
                            for rvq, chunk in zip(self.rvqs, tokens.chunk(self.groups, dim=-1))])

    def decode(self, indices, num_quantizers: int | None = None) -> torch.Tensor:
        """The output for indices (groups, b, *tokens, q), in the layout ``forward`` returns."""
        groups = self._per_group(indices)
        out = self.get_output_from_indices(groups, num_quantizers)
        has_tokens = groups[0].ndim > 2
        return out.movedim(-1, 1) if has_tokens and (self.accept_image_fmap or not self.channel_last) else out

    def get_codes_from_indices(self, indices, num_quantizers: int | None = None) -> torch.Tensor:
        """(groups, q, b, *tokens, dim // groups before each group's project_out)."""
        return torch.stack([rvq.get_codes_from_indices(group_indices, num_quantizers)
                            for rvq, group_indices in zip(self.rvqs, self._per_group(indices))])

    def get_output_from_indices(self, indices, num_quantizers: int | None = None) -> torch.Tensor:
        """(b, *tokens, dim), channel-last: the groups' outputs side by side on the feature axis."""
        return torch.cat([rvq.get_output_from_indices(group_indices, num_quantizers)
                          for rvq, group_indices in zip(self.rvqs, self._per_group(indices))], dim=-1)
