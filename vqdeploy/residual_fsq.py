"""ResidualFSQ and GroupedResidualFSQ: the residual loop over FSQ layers.

As in vector-quantize-pytorch 1.14.17 (itself following https://arxiv.org/abs/2107.03312 with FSQ layers):
the projected input is bounded once by the first layer, and layer i quantizes the residual divided by
``(levels - 1) ** -i``, so each layer refines the previous one's rounding step on a finer grid.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .config import records_config
from .fsq import FSQ, check_levels
from .grouped import GroupedResidualQuantizer
from .residual import ResidualQuantizer
from .vector_quantize import _positive_int


class ResidualFSQOutput(NamedTuple):
    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # (b, *tokens, q), or (groups, b, *tokens, q) when grouped; -1 where dropped


class ResidualFSQOutputWithCodes(NamedTuple):
    quantized: torch.Tensor
    indices: torch.Tensor
    all_codes: torch.Tensor  # (q, b, *tokens, len(levels)); a tuple of those per group when grouped


def _without_losses(out):
    if len(out) == 4:
        return ResidualFSQOutputWithCodes(out.quantized, out.indices, out.all_codes)
    return ResidualFSQOutput(out.quantized, out.indices)


@records_config
class ResidualFSQ(ResidualQuantizer):
    """Residual finite scalar quantization with quantize dropout and bandwidth, as ``ResidualVQ``;
    ``kwargs`` go to every FSQ layer."""

    def __init__(self, dim: int, levels: Sequence[int], num_quantizers: int, quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
                 accept_image_fmap: bool = False, channel_last: bool = True, **kwargs):
        levels = check_levels(levels)
        _positive_int("num_quantizers", num_quantizers)
        for own in ("dim", "channel_first"):
            if own in kwargs:
                raise TypeError(f"ResidualFSQ sets {own} of its FSQ layers itself")
        layer_dim = len(levels)
        layers = [FSQ(levels=levels, dim=layer_dim, **kwargs) for _ in range(num_quantizers)]
        if layers[0].num_codebooks != 1:
            raise ValueError("ResidualFSQ layers quantize with one codebook (num_codebooks=1)")
        super().__init__(dim, layer_dim, layers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, accept_image_fmap, channel_last)
        self.levels = levels
        levels_tensor = torch.tensor(levels, dtype=torch.float32)
        scales = torch.stack([(levels_tensor - 1) ** -i for i in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)  # as in the reference

    def start_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0].bound(x)

    def layer_scale(self, index: int) -> torch.Tensor:
        return self.scales[index]

    @property
    def codebooks(self) -> torch.Tensor:
        """(q, codebook_size, len(levels)): every layer's implicit grid (before its scale)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def forward(self, x: torch.Tensor, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None,
                num_quantizers: int | None = None):
        """x: (b, n, dim), (b, dim) or, with ``accept_image_fmap``/``channel_last=False``, channel-first.
        Returns ``(quantized, indices (b, *tokens, q))``, plus ``all_codes`` when asked."""
        return _without_losses(super().forward(x, return_all_codes=return_all_codes,
                                               rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
                                               num_quantizers=num_quantizers))


@records_config
class GroupedResidualFSQ(GroupedResidualQuantizer):
    """ResidualFSQ over ``groups`` slices of the features; ``kwargs`` go to each group's ResidualFSQ."""

    def __init__(self, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        channel_last = kwargs.get("channel_last", True)

        def make_group(dim_per_group: int) -> ResidualFSQ:
            return ResidualFSQ(dim=dim_per_group, accept_image_fmap=accept_image_fmap, **kwargs)

        super().__init__(dim, groups, make_group, accept_image_fmap, channel_last)

    @property
    def codebooks(self) -> torch.Tensor:
        """(groups, q, codebook_size, len(levels))."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def forward(self, x: torch.Tensor, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None,
                num_quantizers: int | None = None):
        """Returns ``(quantized, indices (groups, b, *tokens, q))``, plus a tuple of per-group ``all_codes``."""
        return _without_losses(super().forward(x, return_all_codes=return_all_codes,
                                               rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
                                               num_quantizers=num_quantizers))
