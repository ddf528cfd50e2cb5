"""SimVQ and ResidualSimVQ (Zhu et al. 2024, arXiv 2411.02038): a frozen random codebook seen through a learned
transform, so that every code moves with the transform and none goes dead.

The codes are ``codebook_transform(frozen_codebook)`` (a bias-free linear layer unless given); a token takes its
nearest code, and the transform learns from the commitment loss (codes to inputs, plus a smaller weight of
inputs to codes), not from an EMA.  Nothing is updated in place, so a training step is pure autograd and
compiles as one graph; matching goes through ``primitives.nearest_codes`` (blocks of rows, never the whole
tokens x codes matrix), which matters for the 2^14 to 2^18 codes image tokenizers use.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checks import number, positive_int
from .config import records_config
from .token_layout import check_index_range, check_indices_dtype, to_tokens
from .primitives import lookup_codes, masked_mse, nearest_codes, rotate_to
from .residual import ResidualQuantizer, prepare_call
from .returns import QuantizeOutput, ResidualOutput, ResidualOutputWithCodes


class SimVQLayerOutput(NamedTuple):
    quantized: torch.Tensor  # (b, n, dim)
    indices: torch.Tensor  # (b, n)
    loss: torch.Tensor  # ()


@records_config
class SimVQ(nn.Module):
    """SimVQ with 1.32.0's arguments.  ``codebook_transform``: a module mapping (codebook_size,
    frozen_codebook_dim) codes to (codebook_size, dim) (default: ``nn.Linear(frozen_codebook_dim, dim,
    bias=False)``); ``init_fn``: applied once to the random frozen codebook; ``channel_first``: input
    (b, dim, *spatial) instead of (b, *spatial, dim)."""

    def __init__(self, dim: int, codebook_size: int, codebook_transform: nn.Module | None = None,
                 init_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, channel_first: bool = False,
                 rotation_trick: bool = True, input_to_quantize_commit_loss_weight: float = 0.25,
                 commitment_weight: float = 1.0, frozen_codebook_dim: int | None = None):
        super().__init__()
        positive_int("dim", dim)
        positive_int("codebook_size", codebook_size)
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        positive_int("frozen_codebook_dim", frozen_codebook_dim)
        number("input_to_quantize_commit_loss_weight", input_to_quantize_commit_loss_weight)
        number("commitment_weight", commitment_weight)
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(f"codebook_transform must be an nn.Module, got {type(codebook_transform).__name__}")
        if init_fn is not None and not callable(init_fn):
            raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.frozen_codebook_dim = frozen_codebook_dim
        self.channel_first = bool(channel_first)
        self.rotation_trick = bool(rotation_trick)
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.commitment_weight = float(commitment_weight)
        codebook = torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim ** -0.5
        if init_fn is not None:
            codebook = init_fn(codebook)
        self.code_transform = codebook_transform if codebook_transform is not None \
            else nn.Linear(frozen_codebook_dim, dim, bias=False)
        self.register_buffer("frozen_codebook", codebook)
        # the export layer and residual loop read these
        self.project_in, self.project_out = nn.Identity(), nn.Identity()
        self.heads, self.channel_last, self.channel_last_maps = 1, True, True

    @property
    def accept_image_fmap(self) -> bool:  # channel-first input of any rank is a feature map to the layout
        return self.channel_first

    @property
    def codebook(self) -> torch.Tensor:
        """The implicit codes (codebook_size, dim)."""
        return self.code_transform(self.frozen_codebook)

    def _to_tokens(self, x: torch.Tensor):
        return to_tokens(x, self.dim, True, self.channel_first, channel_last_maps=True)

    # ------------------------------------------------------------------ the layer protocol (residual.py)

    def quantize_tokens(self, tokens: torch.Tensor, token_weights: torch.Tensor | None = None,
                        target: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                        freeze_codebook: bool = False, active: torch.Tensor | None = None) -> SimVQLayerOutput:
        """Tokens (b, n, dim) -> code, index and commitment loss (computed in eval too, as the reference)."""
        if target is not None:
            raise TypeError("SimVQ has no cross-entropy loss against given indices")
        codebook = self.codebook
        indices = nearest_codes(tokens.detach().reshape(1, -1, self.dim), codebook.detach()[None])[0]
        quantized = F.embedding(indices, codebook).reshape(tokens.shape)
        weights = token_weights
        if active is not None:
            weights = active.to(tokens.dtype).expand(tokens.shape[:2]) if weights is None else weights * active
        loss = masked_mse(tokens.detach(), quantized, weights) \
            + masked_mse(tokens, quantized.detach(), weights) * self.input_to_quantize_commit_loss_weight
        if self.rotation_trick:
            quantized = rotate_to(tokens, quantized)
        else:
            quantized = tokens + (quantized - tokens).detach()
        return SimVQLayerOutput(quantized, indices.reshape(tokens.shape[:2]), loss * self.commitment_weight)

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codebook = self.codebook
        indices = nearest_codes(tokens.reshape(1, -1, self.dim), codebook[None])[0].reshape(tokens.shape[:2])
        return lookup_codes(codebook[None], indices.reshape(1, -1))[0].reshape(tokens.shape), indices

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (..., dim) for indices (...)."""
        check_indices_dtype(indices)
        check_index_range(indices, self.codebook_size)
        return F.embedding(indices.long(), self.codebook)

    # ------------------------------------------------------------------ user API

    def forward(self, x: torch.Tensor) -> QuantizeOutput:
        """x: (b, *spatial, dim), or (b, dim, *spatial) with ``channel_first``.
        Returns ``(quantized like x, indices (b, *spatial), loss ())``."""
        tokens, layout = self._to_tokens(x)
        out = self.quantize_tokens(tokens)
        return QuantizeOutput(layout.restore_features(out.quantized), layout.restore_indices(out.indices), out.loss)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Indices for ``x`` (the export encoder)."""
        tokens, layout = self._to_tokens(x)
        return layout.restore_indices(self.encode_tokens(tokens)[1])

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for indices (b, *spatial), channel-first with ``channel_first`` (the reference's name)."""
        codes = self.lookup(indices)
        return codes.movedim(-1, 1) if self.channel_first and indices.ndim > 1 else codes

    decode = indices_to_codes


@records_config
class ResidualSimVQ(ResidualQuantizer):
    """Residual SimVQ: ``num_quantizers`` SimVQ layers, each quantizing what the ones before left, with the
    residual family's quantize dropout and bandwidth.  ``sim_vq_kwargs`` go to every layer."""

    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, heads: int = 1,
                 quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, channel_first: bool = False, rotation_trick: bool = True,
                 **sim_vq_kwargs):
        positive_int("num_quantizers", num_quantizers)
        if heads != 1:
            raise ValueError(f"ResidualSimVQ quantizes with one head (heads=1), got heads={heads!r}")
        layers = [SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick,
                        channel_first=channel_first, **sim_vq_kwargs) for _ in range(num_quantizers)]
        super().__init__(dim, dim, layers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, accept_image_fmap=channel_first)
        self.channel_first = bool(channel_first)
        self.channel_last_maps = True

    @property
    def codebooks(self) -> torch.Tensor:
        """(q, codebook_size, dim): every layer's implicit codes."""
        return torch.stack([layer.codebook for layer in self.layers])

    def forward(self, x: torch.Tensor, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None, mask: torch.Tensor | None = None,
                num_quantizers: int | None = None):
        """x: (b, *spatial, dim), or (b, dim, *spatial) with ``channel_first``; ``mask`` (b, *spatial) keeps
        padding out of the losses.  Returns ``(quantized, indices (b, *spatial, q), losses (q,))`` (and every
        layer's codes with ``return_all_codes``, channel-first with ``channel_first``)."""
        k = self.bandwidth(num_quantizers)
        tokens, layout, token_weights = prepare_call(self, x, mask, None, rand_quantize_dropout_fixed_seed)
        active_count = self.draw_active_count(k, tokens.device, rand_quantize_dropout_fixed_seed) \
            if self.training else None
        out = self.quantize_tokens(tokens, token_weights, None, None, False, k, active_count)
        quantized, indices = layout.restore_features(out.quantized), layout.restore_indices(out.indices)
        if not return_all_codes:
            return ResidualOutput(quantized, indices, out.losses)
        return ResidualOutputWithCodes(quantized, indices, out.losses, self.get_codes_from_indices(indices, k))

    def get_codes_from_indices(self, indices: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """(q, b, *spatial, dim), or (q, b, dim, *spatial) with ``channel_first``, as the reference."""
        codes = super().get_codes_from_indices(indices, num_quantizers)
        return codes.movedim(-1, 2) if self.channel_first and codes.ndim > 3 else codes

    def get_output_from_indices(self, indices: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """The summed codes, in the input's layout."""
        return self.get_codes_from_indices(indices, num_quantizers).sum(dim=0)

    def decode(self, indices: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        return self.get_output_from_indices(indices, num_quantizers)
