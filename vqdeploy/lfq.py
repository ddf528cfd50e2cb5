"""LFQ: lookup-free quantization (MAGVIT-v2, https://arxiv.org/abs/2310.05737).

Each channel is quantized to its sign (times ``codebook_scale``), so a token of d
channels is one of 2^d codes and its index is the binary number of its signs.
Training adds the entropy loss of the paper: low per-token entropy (confident
codes), high entropy of the batch's average code distribution (all codes used).
The reference builds an N x 2^d probability table for it; vqdeploy uses the
factorisation in ``primitives.factorized_code_entropies`` (exact, no table), so
2^16 and 2^18 codebooks train in a few MB, and under torch.distributed the code
distribution of the whole batch (every rank's tokens) is summed inside the graph.

1.32.0's options: ``spherical`` (binary spherical quantization, arXiv 2406.07548:
inputs and codes on the sphere of radius ``codebook_scale``), a cosine-similarity
input projection, ``orthogonal_rotation``, ``channel_first``, a softplus-shifted
entropy loss, forced projections and full-precision quantization under autocast.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from .checks import number, positive_int
from .config import records_config
from .defaults import default_for, release_for
from .distributed import all_reduce_sum_differentiable
from .grid import GridQuantizer
from .primitives import bit_table, factorized_code_entropies, l2norm, soft_clamp
from .returns import QuantizeOutput


class LFQOutput(NamedTuple):
    """What ``LFQ.forward`` returns; unpacks like the reference's ``Return``."""

    quantized: torch.Tensor  # the input's shape, float32
    indices: torch.Tensor  # int64 (b, *tokens) or (b, *tokens, num_codebooks)
    entropy_aux_loss: torch.Tensor  # 0-d: entropy and commitment terms, weighted (0 in eval)


class LossBreakdown(NamedTuple):
    per_sample_entropy: torch.Tensor
    batch_entropy: torch.Tensor
    commitment: torch.Tensor


def _codebook_dim(dim: int | None, codebook_size: int | None) -> int:
    if dim is None and codebook_size is None:
        raise ValueError("LFQ needs dim or codebook_size")
    if codebook_size is None:
        positive_int("dim", dim)
        return dim
    if not isinstance(codebook_size, int) or codebook_size < 2 or codebook_size & (codebook_size - 1):
        raise ValueError(f"codebook_size must be a power of two >= 2 for lookup-free quantization, got "
                         f"{codebook_size!r} (suggested {2 ** math.ceil(math.log2(max(codebook_size, 2)))})"
                         if isinstance(codebook_size, int) else f"codebook_size must be an int, got {codebook_size!r}")
    return codebook_size.bit_length() - 1


@records_config
class LFQ(GridQuantizer):
    """Lookup-free quantization of ``num_codebooks`` groups of log2(codebook_size) channels."""

    def __init__(self, dim: int | None = None, codebook_size: int | None = None, entropy_loss_weight: float = 0.1,
                 commitment_loss_weight: float | None = None, diversity_gamma: float = 1.0,
                 straight_through_activation: nn.Module | None = None, num_codebooks: int = 1,
                 keep_num_codebooks_dim: bool | None = None, codebook_scale: float = 1.0,
                 frac_per_sample_entropy: float = 1.0, use_code_agnostic_commit_loss: bool = False,
                 projection_has_bias: bool = True, soft_clamp_input_value: float | None = None,
                 has_projections: bool | None = None, cosine_sim_project_in: bool = False,
                 cosine_sim_project_in_scale: float | None = None, channel_first: bool | None = None,
                 experimental_softplus_entropy_loss: bool = False, entropy_loss_offset: float = 5.0,
                 spherical: bool = False, force_quantization_f32: bool = True, orthogonal_rotation: bool = False,
                 defaults: str | None = None):
        super().__init__()
        self.defaults_release = release_for(defaults)
        commitment_loss_weight = default_for(self.defaults_release, "LFQ", "commitment_loss_weight",
                                             commitment_loss_weight)
        codebook_dim = _codebook_dim(dim, codebook_size)
        number("entropy_loss_weight", entropy_loss_weight)
        number("commitment_loss_weight", commitment_loss_weight)
        number("diversity_gamma", diversity_gamma)
        number("codebook_scale", codebook_scale, 0.0, low_open=True)
        number("frac_per_sample_entropy", frac_per_sample_entropy, 0.0, 1.0, low_open=True)
        number("entropy_loss_offset", entropy_loss_offset)
        if soft_clamp_input_value is not None:  # 1.14.17 asked for >= 1, 1.32.0 for >= codebook_scale
            number("soft_clamp_input_value", soft_clamp_input_value, min(1.0, codebook_scale))
        if channel_first is not None and not isinstance(channel_first, bool):
            raise TypeError(f"channel_first must be None (decide by the input's rank), True or False, "
                            f"got {channel_first!r}")
        if cosine_sim_project_in_scale is not None:
            number("cosine_sim_project_in_scale", cosine_sim_project_in_scale, 0.0, low_open=True)

        cosine_scale = None
        if cosine_sim_project_in:
            cosine_scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
        self._init_groups(codebook_dim, num_codebooks, keep_num_codebooks_dim, dim, projection_has_bias,
                          has_projections, cosine_scale)
        self.codebook_size = 2 ** codebook_dim
        self.activation = nn.Identity() if straight_through_activation is None else straight_through_activation
        self.entropy_loss_weight = entropy_loss_weight
        self.commitment_loss_weight = commitment_loss_weight
        self.diversity_gamma = diversity_gamma
        self.codebook_scale = codebook_scale
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.use_code_agnostic_commit_loss = use_code_agnostic_commit_loss
        self.soft_clamp_input_value = soft_clamp_input_value
        self.channel_first = channel_first
        self.experimental_softplus_entropy_loss = bool(experimental_softplus_entropy_loss)
        self.entropy_loss_offset = entropy_loss_offset
        self.spherical = bool(spherical)
        self.force_quantization_f32 = bool(force_quantization_f32)
        self._init_rotation(orthogonal_rotation)

        # the reference's buffers: ``mask`` (bit weights, saved), the codebook (not saved)
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)
        self.register_buffer("codebook", self.bits_to_codes(bit_table(codebook_dim)), persistent=False)

    @property
    def maps_channel_first(self) -> bool:
        """``channel_first=False`` takes images and video channel-last (b, *spatial, dim)."""
        return self.channel_first is not False

    @property
    def code_magnitude(self) -> float:
        """Each channel's |value| in a code: ``codebook_scale``, or on the sphere of that radius / sqrt(d)."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    def to_sphere(self, x: torch.Tensor) -> torch.Tensor:
        """With ``spherical``, each codebook's d channels scaled onto the sphere of radius ``codebook_scale``."""
        return l2norm(x) * self.codebook_scale if self.spherical else x

    # ------------------------------------------------------------------ codes and indices

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    @property
    def dtype(self) -> torch.dtype:
        return self.codebook.dtype

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (..., num_codebooks * codebook_dim) for indices, before ``project_out``."""
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self.to_sphere(self.bits_to_codes(self.index_bits(indices).to(self.dtype)))
        return rearrange(self.rotate_back(codes), "... c d -> ... (c d)")

    def index_bits(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> their bits (..., codebook_dim) as bools, most significant first."""
        return (indices.unsqueeze(-1).int() & self.mask.int()) != 0

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices -> codes (after ``project_out`` unless told otherwise), channel-first for images and video."""
        return self._decode_indices(indices, project_out, channel_first=bool(self.channel_first),
                                    maps_channel_first=self.maps_channel_first)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False,
                mask: torch.Tensor | None = None):
        """x: (b, n, dim) or channel-first images/video (b, dim, *spatial); mask: bool (b, n) of tokens that
        count in the losses.  Returns ``(quantized, indices, aux_loss)``, and a ``LossBreakdown`` when asked."""
        number("inv_temperature", inv_temperature, 0.0, low_open=True)
        tokens, layout = self._tokens(x)
        token_weights = layout.token_weights(mask, tokens.shape[0])
        quantized, indices, loss, breakdown = self._quantize(tokens, token_weights, inv_temperature)
        out = LFQOutput(layout.restore_features(quantized), layout.restore_indices(indices), loss)
        return (out, breakdown) if return_loss_breakdown else out

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure eval quantization of tokens (b, n, dim): ``(quantized, indices)``."""
        with self._precision(tokens):
            x = self._split_codebooks(tokens)
            signs = torch.where(x > 0, self.codebook_scale, -self.codebook_scale).to(x.dtype)
            return self._merge_codebooks(self.to_sphere(signs)), self._indices(signs)

    def quantize_tokens(self, tokens: torch.Tensor, token_weights: torch.Tensor | None = None,
                        target: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                        freeze_codebook: bool = False, active: torch.Tensor | None = None,
                        inv_temperature: float = 100.0) -> QuantizeOutput:
        """The residual loop's layer interface (LFQ has no codebook state; ``active`` changes nothing)."""
        if target is not None:
            raise ValueError("LFQ has no cross-entropy loss against given indices")
        quantized, indices, loss, _ = self._quantize(tokens, token_weights, inv_temperature)
        return QuantizeOutput(quantized, indices, loss)

    def _precision(self, tokens: torch.Tensor):
        """Autocast off around the quantization with ``force_quantization_f32`` (it then runs in float32)."""
        if self.force_quantization_f32:
            return torch.autocast(device_type=tokens.device.type, enabled=False)
        return contextlib.nullcontext()

    def _split_codebooks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (b, n, dim) -> what is quantized (b, n, c, d): projected, soft-clamped, rotated, on the
        sphere with ``spherical``, in float32 with ``force_quantization_f32``."""
        x = self._project_in(tokens)
        x = self.soft_clamp(x.float() if self.force_quantization_f32 else x)
        return self.to_sphere(self.rotate(rearrange(x, "b n (c d) -> b n c d", c=self.num_codebooks)))

    def _merge_codebooks(self, codes: torch.Tensor) -> torch.Tensor:
        """(b, n, c, d) codes -> the output (b, n, dim): rotated back, merged and projected out."""
        return self._project_out(rearrange(self.rotate_back(codes), "b n c d -> b n (c d)"))

    def soft_clamp(self, x: torch.Tensor) -> torch.Tensor:
        """``tanh(x / v) * v`` with v = ``soft_clamp_input_value``, when set."""
        return x if self.soft_clamp_input_value is None else soft_clamp(x, self.soft_clamp_input_value)

    def _indices(self, quantized: torch.Tensor) -> torch.Tensor:
        indices = ((quantized > 0).long() * self.mask).sum(dim=-1)
        return indices if self.keep_num_codebooks_dim else indices[..., 0]

    def _quantize(self, tokens: torch.Tensor, token_weights: torch.Tensor | None, inv_temperature: float):
        with self._precision(tokens):
            x = self._split_codebooks(tokens)  # (b, n, c, d)
            codebook_value = torch.full_like(x, self.codebook_scale)
            signs = torch.where(x > 0, codebook_value, -codebook_value)
            indices = self._indices(signs)
            quantized = self.to_sphere(signs)
            out = quantized
            if self.training:
                activated = self.activation(x)
                out = activated + (quantized - activated).detach()
            per_sample_entropy = batch_entropy = commitment = self.zero
            entropy_aux_loss = self.zero
            if self.training:
                per_sample_entropy, batch_entropy = self._entropies(x, token_weights, inv_temperature)
                entropy_aux_loss = per_sample_entropy - self.diversity_gamma * batch_entropy
                if self.experimental_softplus_entropy_loss:  # kept positive (1.14.29)
                    entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
                if self.commitment_loss_weight > 0:
                    commitment = self._commitment(x, quantized, token_weights)
            loss = entropy_aux_loss * self.entropy_loss_weight + commitment * self.commitment_loss_weight
            out = self._merge_codebooks(out)
        return out, indices, loss, LossBreakdown(per_sample_entropy, batch_entropy, commitment)

    def _entropies(self, x: torch.Tensor, token_weights: torch.Tensor | None, inv_temperature: float):
        """The reference's softmax(2 * inv_temperature * x . c) over all codes c (each channel +-m, m =
        ``code_magnitude``) has per-bit logits 4 * inv_temperature * m * x_j.  Under torch.distributed both
        entropies are of every rank's tokens together (sums all-reduced, so ranks may hold different numbers
        of kept tokens)."""
        weights = None if token_weights is None else token_weights.reshape(-1)
        if self.frac_per_sample_entropy < 1:
            weights = self._random_fraction(x.shape[0] * x.shape[1], weights, x.device)
        bit_logits = 4 * inv_temperature * self.code_magnitude * x.flatten(0, 1)
        return factorized_code_entropies(bit_logits, weights, all_reduce=all_reduce_sum_differentiable)

    def _random_fraction(self, num_tokens: int, weights: torch.Tensor | None, device) -> torch.Tensor:
        """0/1 weights on floor(frac * kept) random kept tokens (a static-shape stand-in for the reference's
        random subset)."""
        kept = torch.ones(num_tokens, device=device) if weights is None else (weights > 0).float()
        keys = torch.where(kept > 0, torch.rand(num_tokens, device=device), torch.full((num_tokens,), 2.0, device=device))
        ranks = keys.argsort().argsort()
        chosen = ranks < (kept.sum() * self.frac_per_sample_entropy).floor()
        return chosen.float() * kept

    def _commitment(self, x, quantized, token_weights):
        if self.use_code_agnostic_commit_loss:  # 1.14.17's option: |x|^2 against |code|^2, whatever the code
            error = (x.pow(2) - quantized.detach().pow(2)).pow(2)
        else:
            error = (x - quantized.detach()).pow(2)
        if token_weights is None:
            return error.mean()
        per_token = error.flatten(2).mean(dim=-1)  # (b, n)
        kept = token_weights > 0
        return torch.where(kept, per_token, 0.0).sum() / kept.sum().clamp(min=1)

    # ------------------------------------------------------------------ pure eval API

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Indices for x, without touching any state (the export encoder)."""
        tokens, layout = self._tokens(x)
        return layout.restore_indices(self.encode_tokens(tokens)[1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices_to_codes``: the quantized output for indices (the export decoder)."""
        return self.indices_to_codes(indices)

