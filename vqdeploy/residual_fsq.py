"""ResidualFSQ and GroupedResidualFSQ: the residual loop over FSQ layers (https://arxiv.org/abs/2107.03312).

Each layer refines the previous one's rounding step on a finer grid; how changed in 1.26.0, and the defaults
switch picks the scheme:

- 1.32.0 (the default): every layer uses the symmetric levels (``preserve_symmetry``); the projected input is
  tanh-clamped to ``1 + 1 / (levels - 1)`` per channel and the layers clamp hard (``bound_hard_clamp=True``),
  or with ``bound_hard_clamp=False`` clamped at ``soft_clamp_input_value`` (if given) and bounded by each
  layer's tanh; layer i quantizes the residual divided by ``levels ** -i``.
- 1.14.17: the input is bounded once by the first layer's tanh bound, and layer i quantizes the residual
  divided by ``(levels - 1) ** -i``; releases 1.18.5 to 1.25 skip that first bound (``bound_input_once=False``,
  a vqdeploy argument for their checkpoints).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .checks import positive_int
from .config import records_config
from .defaults import behaves_as_latest, default_for, release_for
from .fsq import FSQ, check_levels
from .grouped import GroupedResidualQuantizer
from .primitives import soft_clamp
from .residual import ResidualQuantizer


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


def _soft_clamp_values(value, channels: int) -> torch.Tensor | None:
    """``soft_clamp_input_value`` (a number, one per channel, or a tensor) -> a float tensor, or None."""
    if value is None:
        return None
    values = torch.as_tensor(value, dtype=torch.float32).detach().clone()
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != channels):
        raise ValueError(f"soft_clamp_input_value must be a number or {channels} numbers (one per channel), "
                         f"got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all() or (values <= 0).any():
        raise ValueError(f"soft_clamp_input_value must be finite and > 0, got {value!r}")
    return values


@records_config
class ResidualFSQ(ResidualQuantizer):
    """Residual finite scalar quantization with quantize dropout and bandwidth, as ``ResidualVQ``;
    ``kwargs`` go to every FSQ layer."""

    def __init__(self, dim: int, levels: Sequence[int], num_quantizers: int, quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
                 accept_image_fmap: bool = False, channel_last: bool = True, is_channel_first: bool = False,
                 soft_clamp_input_value: float | Sequence[float] | torch.Tensor | None = None,
                 bound_hard_clamp: bool | None = None, bound_input_once: bool | None = None, **kwargs):
        levels = check_levels(levels)
        positive_int("num_quantizers", num_quantizers)
        for own in ("dim", "channel_first"):
            if own in kwargs:
                raise TypeError(f"ResidualFSQ sets {own} of its FSQ layers itself")
        release = release_for(kwargs.get("defaults"))
        bound_hard_clamp = bool(default_for(release, "ResidualFSQ", "bound_hard_clamp", bound_hard_clamp))
        symmetric_layers = behaves_as_latest(release, "ResidualFSQ", "layer levels and scales")
        if symmetric_layers:
            if "preserve_symmetry" in kwargs:
                raise TypeError("ResidualFSQ sets preserve_symmetry of its FSQ layers itself (always on, as 1.32.0)")
            if bound_hard_clamp and soft_clamp_input_value is not None:
                raise ValueError("bound_hard_clamp=True clamps the input at 1 + 1 / (levels - 1) itself: "
                                 "soft_clamp_input_value needs bound_hard_clamp=False")
            kwargs = dict(kwargs, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp)
        elif bound_hard_clamp or soft_clamp_input_value is not None:
            raise ValueError("bound_hard_clamp and soft_clamp_input_value belong to 1.32.0's ResidualFSQ scheme; "
                             "under defaults='1.14.17' ResidualFSQ computes as 1.14.17 did")
        if symmetric_layers and bound_input_once is not None:
            raise ValueError("bound_input_once belongs to the scheme before 1.26.0 (defaults='1.14.17')")
        layer_dim = len(levels)
        layers = [FSQ(levels=levels, dim=layer_dim, **kwargs) for _ in range(num_quantizers)]
        if layers[0].num_codebooks != 1:
            raise ValueError("ResidualFSQ layers quantize with one codebook (num_codebooks=1)")
        super().__init__(dim, layer_dim, layers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, accept_image_fmap or bool(is_channel_first),
                         channel_last and not is_channel_first)
        self.levels = levels
        self.is_channel_first = bool(is_channel_first)
        # releases 1.18.5 to 1.25 quantize the unbounded input (bound_input_once=False)
        self.bounds_input_once = not symmetric_layers and bound_input_once is not False
        levels_tensor = torch.tensor(levels, dtype=torch.float32)
        base = levels_tensor if symmetric_layers else levels_tensor - 1
        self.register_buffer("scales", torch.stack([base ** -i for i in range(num_quantizers)]), persistent=False)
        clamp = _soft_clamp_values(soft_clamp_input_value, layer_dim)
        if bound_hard_clamp:
            clamp = 1 + 1 / (levels_tensor - 1)
        self.register_buffer("soft_clamp_input_value", clamp, persistent=False)

    def start_residual(self, x: torch.Tensor) -> torch.Tensor:
        if self.bounds_input_once:
            return self.layers[0].bound(x)
        if self.soft_clamp_input_value is None:
            return x
        return soft_clamp(x, self.soft_clamp_input_value.to(x.dtype))

    def layer_scale(self, index: int) -> torch.Tensor:
        return self.scales[index]

    @property
    def codebooks(self) -> torch.Tensor:
        """(q, codebook_size, len(levels)): every layer's implicit grid (before its scale)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def forward(self, x: torch.Tensor, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None,
                num_quantizers: int | None = None):
        """x: (b, n, dim), (b, dim) or, with ``accept_image_fmap``/``channel_last=False``/``is_channel_first``,
        channel-first.  Returns ``(quantized, indices (b, *tokens, q))``, plus ``all_codes`` when asked; with
        ``is_channel_first`` the indices are (b, q, *tokens), as 1.32.0 returns them (``get_output_from_indices``
        takes them with q last: ``indices.movedim(1, -1)``)."""
        out = _without_losses(super().forward(x, return_all_codes=return_all_codes,
                                              rand_quantize_dropout_fixed_seed=rand_quantize_dropout_fixed_seed,
                                              num_quantizers=num_quantizers))
        return out._replace(indices=out.indices.movedim(-1, 1)) if self.is_channel_first else out


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
