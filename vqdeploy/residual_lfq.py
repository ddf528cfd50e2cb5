"""ResidualLFQ and GroupedResidualLFQ: the residual loop over LFQ layers, layer i with codebook_scale 2^-i:
each layer's signs refine the previous layer's at half the size.  A ``soft_clamp_input_value`` v clamps layer i's
input to v * 2^-i, shrinking with the residual (1.32.0; 1.14.17's defaults clamp every layer to v)."""

from __future__ import annotations

import torch

from .checks import positive_int
from .config import records_config
from .defaults import behaves_as_latest, release_for
from .grouped import GroupedResidualQuantizer
from .lfq import LFQ, _codebook_dim
from .residual import ResidualQuantizer


@records_config
class ResidualLFQ(ResidualQuantizer):
    """Residual lookup-free quantization with quantize dropout and bandwidth, as ``ResidualVQ``;
    ``kwargs`` go to every LFQ layer.  Returns ``(quantized, indices (..., q), losses (q,))``."""

    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
                 accept_image_fmap: bool = False, channel_last: bool = True,
                 soft_clamp_input_value: float | None = None, **kwargs):
        positive_int("num_quantizers", num_quantizers)
        for own in ("dim", "codebook_scale", "codebook_size"):
            if own in kwargs:
                raise TypeError(f"ResidualLFQ sets {own} of its LFQ layers itself")
        if kwargs.get("has_projections"):
            raise ValueError("ResidualLFQ projects once, around all its layers: its LFQ layers take no "
                             "has_projections=True")
        codebook_dim = _codebook_dim(None, codebook_size)
        halves = behaves_as_latest(release_for(kwargs.get("defaults")), "ResidualLFQ",
                                   "soft_clamp_input_value of layer i")
        layers = [LFQ(dim=codebook_dim, codebook_scale=2.0 ** -i, **kwargs,
                      soft_clamp_input_value=None if soft_clamp_input_value is None
                      else soft_clamp_input_value * (2.0 ** -i if halves else 1.0))
                  for i in range(num_quantizers)]
        if layers[0].num_codebooks != 1:
            raise ValueError("ResidualLFQ layers quantize with one codebook (num_codebooks=1)")
        super().__init__(dim, codebook_dim, layers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, accept_image_fmap, channel_last)

    @property
    def codebooks(self) -> torch.Tensor:
        """(q, codebook_size, log2(codebook_size)): every layer's scaled sign codes."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None,
                num_quantizers: int | None = None):
        """x: (b, n, dim), or channel-first with ``accept_image_fmap``/``channel_last=False``; mask: bool (b, n)."""
        return super().forward(x, mask=mask, return_all_codes=return_all_codes,
                               rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
                               num_quantizers=num_quantizers)


@records_config
class GroupedResidualLFQ(GroupedResidualQuantizer):
    """ResidualLFQ over ``groups`` slices of the features; ``kwargs`` go to each group's ResidualLFQ."""

    def __init__(self, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        channel_last = kwargs.get("channel_last", True)

        def make_group(dim_per_group: int) -> ResidualLFQ:
            return ResidualLFQ(dim=dim_per_group, accept_image_fmap=accept_image_fmap, **kwargs)

        super().__init__(dim, groups, make_group, accept_image_fmap, channel_last)

    @property
    def codebooks(self) -> torch.Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None,
                num_quantizers: int | None = None):
        """Returns ``(quantized, indices (groups, b, *tokens, q), losses (groups, q))`` (plus all_codes)."""
        return super().forward(x, mask=mask, return_all_codes=return_all_codes,
                               rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
                               num_quantizers=num_quantizers)
