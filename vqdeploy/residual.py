"""The residual loop (SoundStream, EnCodec, RQ-VAE), written once for every quantizer family.

Each layer quantizes what the layers before it left over; the output is the
sum of their outputs.  Two things codec users need are built in:

- quantize dropout (SoundStream section 3.3): in training, a random number of
  leading layers is kept per step.  The number is a 0-d tensor drawn on the
  device, and every layer always runs: a dropped layer is told it is not
  ``active`` (its codebook then sees zero weights and updates nothing) and
  its output, indices (-1) and loss are masked out.  Shapes never change, so
  the step stays one graph, and distributed ranks always run the same collectives.
- bandwidth: ``num_quantizers=k`` uses only the first k layers, which is
  exactly a model with k quantizers (a Python int, fixed at trace time).

A layer is any module with ``quantize_tokens(tokens, token_weights, target,
sample_codebook_temp, freeze_codebook, active)``, ``encode_tokens(tokens)`` and
``lookup(indices)`` working on tokens (b, n, d) (see ``VectorQuantize``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .checks import number, positive_int
from .token_layout import TokenLayout, check_index_range, check_indices_dtype, to_tokens
from .primitives import SEED_LIMIT, uniform_from_seed
from .returns import QuantizeLossOutput, ResidualOutput, ResidualOutputWithCodes


def dropout_active_count(uniform: torch.Tensor, cutoff_index: int, num_quantizers: int,
                         multiple_of: int = 1) -> torch.Tensor:
    """How many leading layers a quantize-dropout step keeps (0-d int64).

    The last kept layer is uniform in [cutoff_index, num_quantizers), rounded
    up so that the count is a multiple of ``multiple_of`` (EnCodec's
    structured dropout), the reference's ``randrange`` as tensor arithmetic."""
    span = num_quantizers - cutoff_index
    last = cutoff_index + (uniform * span).floor().long().clamp(max=span - 1)
    return torch.div(last + multiple_of, multiple_of, rounding_mode="floor") * multiple_of


def check_seed(seed) -> None:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype == torch.bool:
            raise TypeError(f"rand_quantize_dropout_fixed_seed must be an int or a one-element integer tensor, "
                            f"got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"rand_quantize_dropout_fixed_seed must be an int, got {type(seed).__name__}")
    if not -SEED_LIMIT <= seed < SEED_LIMIT:
        raise ValueError(f"rand_quantize_dropout_fixed_seed must lie in [-2**31, 2**31), got {seed}")


def prepare_call(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, sample_codebook_temp, seed):
    """Validate a residual or grouped forward's arguments: ``(tokens (b, n, dim), layout, token weights)``."""
    if sample_codebook_temp is not None:
        number("sample_codebook_temp", sample_codebook_temp, 0.0)
    if seed is not None:
        check_seed(seed)
    tokens, layout = to_tokens(x, module.dim, module.channel_last, module.accept_image_fmap,
                               getattr(module, "channel_last_maps", False))
    return tokens, layout, layout.token_weights(mask, tokens.shape[0])


class ResidualQuantizer(nn.Module):
    """The shared residual loop: projections, layout, quantize dropout, bandwidth,
    index checks and code lookup.  Subclasses build ``layers`` and name the family."""

    def __init__(self, dim: int, layer_dim: int, layers: Sequence[nn.Module], quantize_dropout: bool = False,
                 quantize_dropout_cutoff_index: int = 0, quantize_dropout_multiple_of: int = 1,
                 accept_image_fmap: bool = False, channel_last: bool = True):
        super().__init__()
        positive_int("dim", dim)
        positive_int("quantize_dropout_multiple_of", quantize_dropout_multiple_of)
        if not isinstance(quantize_dropout_cutoff_index, int) or quantize_dropout_cutoff_index < 0:
            raise ValueError(f"quantize_dropout_cutoff_index must be an int >= 0, got {quantize_dropout_cutoff_index!r}")
        num_quantizers = len(layers)
        if quantize_dropout and num_quantizers > 1 and quantize_dropout_cutoff_index >= num_quantizers:
            raise ValueError(f"quantize_dropout_cutoff_index must be below num_quantizers ({num_quantizers}), "
                             f"got {quantize_dropout_cutoff_index}")
        self.dim = dim
        self.num_quantizers = num_quantizers
        self.accept_image_fmap = accept_image_fmap
        self.channel_last = channel_last
        self.has_projections = layer_dim != dim
        self.project_in = nn.Linear(dim, layer_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(layer_dim, dim) if self.has_projections else nn.Identity()
        self.layers = nn.ModuleList(layers)
        self.quantize_dropout = bool(quantize_dropout) and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    channel_last_maps = False  # also take channel-last feature maps (b, *spatial, dim) (residual SimVQ)

    # ------------------------------------------------------------------ hooks for families

    def start_residual(self, x: torch.Tensor) -> torch.Tensor:
        """The first residual, from the projected input (residual FSQ bounds it first)."""
        return x

    def layer_scale(self, index: int) -> torch.Tensor | None:
        """Layer ``index`` quantizes residual / scale and contributes its output * scale (residual FSQ)."""
        return None

    @property
    def codebook_size(self) -> int:
        """Codes of the first layer (of every layer, unless ``ResidualVQ`` was given one size per layer)."""
        return self.layers[0].codebook_size

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        """Codes of each layer."""
        return tuple(layer.codebook_size for layer in self.layers)

    # ------------------------------------------------------------------ arguments

    def bandwidth(self, num_quantizers: int | None) -> int:
        """The number of layers to use: all of them, or the first ``num_quantizers``."""
        if num_quantizers is None:
            return self.num_quantizers
        if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) \
                or not 1 <= num_quantizers <= self.num_quantizers:
            raise ValueError(f"num_quantizers must be an int in [1, {self.num_quantizers}], got {num_quantizers!r}")
        return num_quantizers

    def draw_active_count(self, num_quantizers: int, device, seed=None) -> torch.Tensor | None:
        """The quantize-dropout draw for one training step, or None when nothing can be dropped."""
        cutoff = self.quantize_dropout_cutoff_index
        if not self.quantize_dropout or cutoff >= num_quantizers - 1:
            return None
        uniform = torch.rand((), device=device) if seed is None else uniform_from_seed(seed, device)
        return dropout_active_count(uniform, cutoff, num_quantizers, self.quantize_dropout_multiple_of)

    def _target_tokens(self, indices: torch.Tensor, layout: TokenLayout, num_quantizers: int) -> torch.Tensor:
        """Indices in the user's layout (b, *tokens, q) -> (b, n, q), checked."""
        check_indices_dtype(indices)
        expected = (() if layout.kind == "vector" else layout.spatial) + (num_quantizers,)
        if tuple(indices.shape[1:]) != expected:
            raise ValueError(f"indices must have shape (batch, {', '.join(map(str, expected))}): one code per "
                             f"token for each of the {num_quantizers} quantizers, got {tuple(indices.shape)}")
        if not torch.compiler.is_compiling() and indices.numel() and bool((indices < 0).any()):
            raise ValueError("indices hold -1 (a dropped-out quantizer): the cross-entropy loss needs indices "
                             "from every quantizer, as eval mode gives")
        return indices.reshape(indices.shape[0], layout.num_tokens, num_quantizers).long()

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, indices: torch.Tensor | None = None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool = False, rand_quantize_dropout_fixed_seed: int | torch.Tensor | None = None,
                num_quantizers: int | None = None, beam_size: int | None = None):
        """x: (b, dim), (b, n, dim), (b, dim, n) with ``channel_last=False`` or (b, dim, *spatial) with
        ``accept_image_fmap=True``; mask: bool (b, n); indices: (b, *tokens, q) for the cross-entropy loss;
        beam_size: beam search over the layers' codes (``ResidualVQ``; default: its ``beam_size`` in training,
        ``eval_beam_size`` in eval).

        Returns ``(quantized, indices (b, *tokens, q), losses (q,))`` (plus ``all_codes`` when asked),
        or ``(quantized, ce_loss)`` when ``indices`` are given."""
        beam_size = self.beam_for_call(beam_size)
        if beam_size is not None and indices is not None:
            raise ValueError("beam search does not combine with indices (the cross-entropy loss)")
        k = self.bandwidth(num_quantizers)
        tokens, layout, token_weights = prepare_call(self, x, mask, sample_codebook_temp,
                                                     rand_quantize_dropout_fixed_seed)
        target = None if indices is None else self._target_tokens(indices, layout, k)
        active_count = None
        if self.training and target is None:
            active_count = self.draw_active_count(k, tokens.device, rand_quantize_dropout_fixed_seed)
        out = self.quantize_tokens(tokens, token_weights, target, sample_codebook_temp, freeze_codebook, k,
                                   active_count, beam_size)
        quantized = layout.restore_features(out.quantized)
        if target is not None:
            return QuantizeLossOutput(quantized, out.ce_loss)
        out_indices = layout.restore_indices(out.indices)
        if not return_all_codes:
            return ResidualOutput(quantized, out_indices, out.losses)
        return ResidualOutputWithCodes(quantized, out_indices, out.losses, self._codes(out_indices))

    def quantize_tokens(self, tokens: torch.Tensor, token_weights: torch.Tensor | None = None,
                        target: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                        freeze_codebook: bool = False, num_quantizers: int | None = None,
                        active_count: torch.Tensor | None = None, beam_size: int | None = None):
        """The loop on tokens (b, n, dim); ``active_count`` (0-d) keeps only that many leading layers.

        Returns ``ResidualOutput`` on tokens (indices (b, n, q)), or ``QuantizeLossOutput``
        with the summed cross-entropy when ``target`` (b, n, q) is given."""
        k = self.bandwidth(num_quantizers)
        if beam_size is not None:
            return self.beam_search_tokens(tokens, token_weights, beam_size, sample_codebook_temp, freeze_codebook,
                                           k, active_count)
        projected = self.project_in(tokens)
        residual = self.start_residual(projected)
        quantized_out, all_indices, all_losses, ce_loss, layer_inputs = None, [], [], None, []
        for i, layer in enumerate(self.layers[:k]):
            active = None if active_count is None else active_count > i
            layer_target = None if target is None else target[..., i:i + 1]
            scale = self.layer_scale(i)
            layer_inputs.append(residual if scale is None else residual / scale)
            out = layer.quantize_tokens(layer_inputs[-1], token_weights, layer_target, sample_codebook_temp,
                                        freeze_codebook, active, **self.layer_arguments(i, quantized_out))
            quantized = out[0] if scale is None else out[0] * scale
            if active is not None:
                quantized = torch.where(active, quantized, torch.zeros((), dtype=quantized.dtype,
                                                                        device=quantized.device))
            residual = residual - self.residual_gradient(quantized)
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            if target is not None:
                ce_loss = out.ce_loss if ce_loss is None else ce_loss + out.ce_loss
                continue
            layer_indices, loss = out.indices, out.loss
            if active is not None:
                layer_indices = torch.where(active, layer_indices, -1)
                loss = torch.where(active, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
            all_indices.append(layer_indices)
            all_losses.append(loss)
        if self.training and target is None and not freeze_codebook:
            self.end_of_step_(layer_inputs, token_weights, active_count)
        quantized_out = self.project_out(self.reparameterize(projected, quantized_out, token_weights))
        if target is not None:
            return QuantizeLossOutput(quantized_out, ce_loss)
        return ResidualOutput(quantized_out, torch.stack(all_indices, dim=-1), torch.stack(all_losses, dim=-1))

    def layer_arguments(self, index: int, quantized_so_far: torch.Tensor | None) -> dict:
        """Extra arguments of layer ``index``'s call, given the sum of the outputs before it (None for the
        first): ``ResidualVQ``'s implicit neural codebook passes each layer its code transform."""
        return {}

    def reparameterize(self, projected: torch.Tensor, quantized: torch.Tensor,
                       token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The summed output before ``project_out`` (``ResidualVQ(diveq=True)`` reparameterises it in training)."""
        return quantized

    def beam_for_call(self, beam_size: int | None) -> int | None:
        """The beam of this call (None: greedy); only ``ResidualVQ`` searches."""
        if beam_size is not None and beam_size != 1:
            raise TypeError(f"{type(self).__name__} has no beam search (ResidualVQ has)")
        return None

    def beam_search_tokens(self, tokens, token_weights, beam_size, sample_codebook_temp, freeze_codebook,
                           num_quantizers, active_count):
        raise TypeError(f"{type(self).__name__} has no beam search (ResidualVQ has)")

    def residual_gradient(self, quantized: torch.Tensor) -> torch.Tensor:
        """What a layer's output takes off the residual: detached, each layer's loss trains its own input only
        (``ResidualVQ`` passes a fraction of the gradient on)."""
        return quantized.detach()

    def end_of_step_(self, layer_inputs: list[torch.Tensor], token_weights: torch.Tensor | None,
                     active_count: torch.Tensor | None) -> None:
        """Hook for state updates that need every layer's input (b, n, d) of a training step; none here."""

    # ------------------------------------------------------------------ pure eval API

    def encode(self, x: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """Indices (b, *tokens, q) for ``x``, without touching any state (the export encoder)."""
        tokens, layout = to_tokens(x, self.dim, self.channel_last, self.accept_image_fmap, self.channel_last_maps)
        return layout.restore_indices(self.encode_tokens(tokens, num_quantizers))

    def encode_tokens(self, tokens: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        residual = self.start_residual(self.project_in(tokens))
        all_indices, quantized_out = [], None
        for i, layer in enumerate(self.layers[:self.bandwidth(num_quantizers)]):
            scale = self.layer_scale(i)
            quantized, indices = layer.encode_tokens(residual if scale is None else residual / scale,
                                                     **self.layer_arguments(i, quantized_out))
            quantized = quantized if scale is None else quantized * scale
            residual = residual - quantized
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
            all_indices.append(indices)
        return torch.stack(all_indices, dim=-1)

    def decode(self, indices: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """The output for ``indices`` in the layout ``forward`` returns (channel-first for feature maps)."""
        out = self.get_output_from_indices(indices, num_quantizers)
        has_tokens = indices.ndim > 2
        return out.movedim(-1, 1) if has_tokens and (self.accept_image_fmap or not self.channel_last) else out

    # ------------------------------------------------------------------ codes from indices

    def get_codes_from_indices(self, indices: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """Every layer's codes (q, b, *tokens, codebook_dim) for indices (b, *tokens, q); -1 gives zeros.

        Like the reference, with quantize dropout fewer than ``num_quantizers``
        columns are accepted and the missing fine layers count as dropped."""
        check_indices_dtype(indices)
        k = self.bandwidth(num_quantizers)
        if indices.ndim < 2:
            raise ValueError(f"indices must have shape (batch, ..., {k}), got {tuple(indices.shape)}")
        given = indices.shape[-1]
        if num_quantizers is None and self.quantize_dropout and 1 <= given < k:
            indices = torch.nn.functional.pad(indices, (0, k - given), value=-1)
        elif given != k:
            raise ValueError(f"indices must end with one column per quantizer ({k}), got shape {tuple(indices.shape)}")
        return self._codes(indices)

    def get_output_from_indices(self, indices: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """The summed codes through ``project_out``: (b, *tokens, dim), channel-last as in the reference."""
        codes = self.get_codes_from_indices(indices, num_quantizers).sum(dim=0)
        if self.has_projections:  # grid layers decode in float32; the projection may be half
            codes = codes.to(self.project_out.weight.dtype)
        return self.project_out(codes)

    def _codes(self, indices: torch.Tensor) -> torch.Tensor:
        codes = []
        for i, layer in enumerate(self.layers[:indices.shape[-1]]):
            layer_indices = indices[..., i]
            kept = layer_indices >= 0
            check_index_range(layer_indices, layer.codebook_size, allow_minus_one=True)
            layer_codes = self.layer_codes(i, layer.lookup(torch.where(kept, layer_indices, 0)), codes)
            codes.append(torch.where(kept.unsqueeze(-1), layer_codes, torch.zeros((), dtype=layer_codes.dtype,
                                                                                   device=layer_codes.device)))
        return torch.stack(codes)

    def layer_codes(self, index: int, codes: torch.Tensor, earlier: list[torch.Tensor]) -> torch.Tensor:
        """Layer ``index``'s looked-up codes as they add to the output, given the ``earlier`` layers' (dropped
        ones zero): scaled for residual FSQ."""
        scale = self.layer_scale(index)
        return codes if scale is None else codes * scale

