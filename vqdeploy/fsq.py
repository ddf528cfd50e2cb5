"""FSQ: finite scalar quantization (Mentzer et al., https://arxiv.org/abs/2309.15505).

Each channel is bounded with a tanh and rounded to one of ``levels[i]`` values:
the codebook is the implicit grid of all level combinations, nothing is
learned but the optional projections, and an index is the mixed-radix number
of a code's level indices.  The API and the arithmetic follow
vector-quantize-pytorch (1.14.17, and 1.32.0's additions: the symmetry-preserving
bound and noise dropout of Stable Codec, arXiv 2411.19842, a hard clamp instead of the
tanh, an orthogonal rotation of the channels), so codes and indices are bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple, Sequence

import torch
from einops import rearrange

from .checks import number
from .config import records_config
from .defaults import behaves_as_latest, release_for
from .grid import GridQuantizer
from .primitives import draw_uniform, round_ste
from .returns import QuantizeOutput


class FSQOutput(NamedTuple):
    """What ``FSQ.forward`` returns; unpacks like the reference's tuple."""

    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # int32 (b, *tokens) or (b, *tokens, num_codebooks)


MAX_GRID_SIZE = 2**31  # indices are int32, as in the reference


def check_levels(levels) -> list[int]:
    if not isinstance(levels, Sequence) or isinstance(levels, str) or len(levels) == 0:
        raise ValueError(f"levels must be a non-empty list of ints >= 2, got {levels!r}")
    for level in levels:
        if not isinstance(level, int) or isinstance(level, bool) or level < 2:
            raise ValueError(f"levels must be ints >= 2, got {list(levels)!r}")
    if math.prod(levels) > MAX_GRID_SIZE:
        raise ValueError(f"levels {list(levels)!r} make a grid of {math.prod(levels)} codes; int32 indices hold at most "
                         f"{MAX_GRID_SIZE}")
    return list(levels)


@records_config
class FSQ(GridQuantizer):
    """Finite scalar quantization over ``num_codebooks`` groups of ``len(levels)`` channels."""

    def __init__(self, levels: Sequence[int], dim: int | None = None, num_codebooks: int = 1,
                 keep_num_codebooks_dim: bool | None = None, scale: float | None = None,
                 allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
                 channel_first: bool = False, projection_has_bias: bool = True, return_indices: bool = True,
                 force_quantization_f32: bool = True, preserve_symmetry: bool = False, noise_dropout: float = 0.0,
                 bound_hard_clamp: bool = False, orthogonal_rotation: bool = False, defaults: str | None = None):
        super().__init__()
        levels = check_levels(levels)
        self.defaults_release = release = release_for(defaults)
        if 2 in levels and not preserve_symmetry and behaves_as_latest(release, "FSQ", "levels of 2"):
            raise ValueError(f"levels {levels} hold a 2: turn on preserve_symmetry, or use 3 or more levels "
                             "(1.32.0's rule; defaults='1.14.17' allows it)")
        number("noise_dropout", noise_dropout, 0.0, 1.0)
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout needs preserve_symmetry=True (as 1.32.0)")
        self.return_indices = bool(return_indices)
        self.force_quantization_f32 = bool(force_quantization_f32)
        self.preserve_symmetry = bool(preserve_symmetry)
        self.noise_dropout = float(noise_dropout)
        self.bound_hard_clamp = bool(bound_hard_clamp)
        self.levels = levels
        self._init_groups(len(levels), num_codebooks, keep_num_codebooks_dim, dim, projection_has_bias)
        self.scale = scale  # accepted for the reference's signature; it does not use it either
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.channel_first = channel_first
        self.codebook_size = math.prod(levels)

        self._init_levels(levels)
        self.register_buffer("implicit_codebook", self._indices_to_codes(torch.arange(self.codebook_size)),
                             persistent=False)
        if orthogonal_rotation and len(set(levels)) > 1:
            warnings.warn("orthogonal_rotation mixes channels of different level counts (asymmetric levels)",
                          stacklevel=2)
        self._init_rotation(orthogonal_rotation)

    # ------------------------------------------------------------------ the grid

    def bound_scale(self, eps: float = 1e-3) -> torch.Tensor:
        """The tanh's output scale per channel, (levels - 1) * (1 + eps) / 2: the bounded range's half width."""
        return (self._levels - 1) * (1 + eps) / 2

    def _squash(self, z: torch.Tensor) -> torch.Tensor:
        """tanh, or with ``bound_hard_clamp`` a clamp to [-1, 1] (an input soft-clamped upstream)."""
        return z.clamp(-1.0, 1.0) if self.bound_hard_clamp else z.tanh()

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Squash z (..., codebook_dim) into the level range; even levels are shifted by half a step."""
        half_l = self.bound_scale(eps)
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = offset / half_l if self.bound_hard_clamp else (offset / half_l).atanh()
        return self._squash(z + shift) * half_l - offset

    def level_position(self, z: torch.Tensor) -> torch.Tensor:
        """Where z falls on each channel's levels, before rounding: level index = round(position) (for the
        tie classifier of the export layer)."""
        if self.preserve_symmetry:
            return (self._levels - 1) * (self._squash(z) + 1) / 2
        return self.bound(z) + self._levels // 2

    def position_scale(self) -> torch.Tensor:
        """How far a position moves per unit of squashed input, per channel (the tie classifier's size)."""
        return (self._levels - 1) / 2 if self.preserve_symmetry else self.bound_scale()

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Round the bounded z to the grid (straight-through), renormalised to [-1, 1]: the levels
        -1 + 2k / (levels - 1) with ``preserve_symmetry`` (Stable Codec, section 3.2 of arXiv 2411.19842)."""
        if self.preserve_symmetry:
            bracket = (self._levels - 1) * (self._squash(z) + 1) / 2 + 0.5
            bracket = bracket + (bracket.floor() - bracket).detach()  # floor, straight-through
            return 2.0 / (self._levels - 1) * bracket - 1.0
        return round_ste(self.bound(z)) / (self._levels // 2)

    def _scale_and_shift(self, zhat_normalized: torch.Tensor) -> torch.Tensor:
        if self.preserve_symmetry:
            return (zhat_normalized + 1.0) / (2.0 / (self._levels - 1))
        half_width = self._levels // 2
        return zhat_normalized * half_width + half_width

    def _scale_and_shift_inverse(self, zhat: torch.Tensor) -> torch.Tensor:
        if self.preserve_symmetry:
            return zhat * (2.0 / (self._levels - 1)) - 1.0
        half_width = self._levels // 2
        return (zhat - half_width) / half_width

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Grid codes (..., codebook_dim) -> int32 indices (...)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must end with {self.codebook_dim} channels, got shape {tuple(zhat.shape)}")
        return (self._scale_and_shift(zhat) * self._basis).sum(dim=-1).round().to(torch.int32)

    def _indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> the output ``forward`` gives for them (after ``project_out``), channel-first for
        images and video or with ``channel_first``."""
        return self._decode_indices(indices, channel_first=self.channel_first)

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor) -> FSQOutput:
        """z: (b, n, dim), (b, dim, n) with ``channel_first``, or (b, dim, *spatial) for images and video.
        Returns ``(quantized, indices)`` (indices None with ``return_indices=False``)."""
        tokens, layout = self._tokens(z)
        out, indices = self.encode_tokens(tokens, noise=self.training and self.noise_dropout > 0)
        return FSQOutput(layout.restore_features(out),
                         layout.restore_indices(indices) if self.return_indices else None)

    def _noise_dropout(self, codes: torch.Tensor) -> torch.Tensor:
        """Training: each value, with probability ``noise_dropout``, moved by uniform noise in [-0.5, 0.5)
        and clamped to [-1, 1] (Stable Codec's noise substitution); one uniform draw for both choices."""
        uniform = draw_uniform({"noise": (2, *codes.shape)}, codes.device)["noise"].to(codes.dtype)
        noisy = torch.where(uniform[0] < self.noise_dropout, codes + (uniform[1] - 0.5), codes)
        return noisy.clamp(-1.0, 1.0)

    def encode_tokens(self, tokens: torch.Tensor, noise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (b, n, dim) -> ``(quantized (b, n, dim), int32 indices (b, n) or (b, n, num_codebooks))``;
        ``noise``: apply noise dropout to the output (training)."""
        orig_dtype = tokens.dtype
        full_precision = torch.autocast(device_type=tokens.device.type, enabled=False) \
            if self.force_quantization_f32 else contextlib.nullcontext()
        with full_precision:
            if self.has_projections:  # the projections run in their own dtype (the reference fails otherwise)
                tokens = tokens.to(self.project_in.weight.dtype)
            codes = rearrange(self.project_in(tokens), "b n (c d) -> b n c d", c=self.num_codebooks)
            codes = self.rotate(codes)
            if self.force_quantization_f32 and codes.dtype not in self.allowed_dtypes:
                codes = codes.float()
            codes = self.quantize(codes)
            indices = self.codes_to_indices(codes)
            if noise:
                codes = self._noise_dropout(codes)
            codes = rearrange(self.rotate_back(codes), "b n c d -> b n (c d)").to(orig_dtype)
            if self.has_projections:
                codes = codes.to(self.project_out.weight.dtype)
            out = self.project_out(codes).to(orig_dtype)
        return out, indices if self.keep_num_codebooks_dim else indices[..., 0]

    def quantize_tokens(self, tokens: torch.Tensor, token_weights: torch.Tensor | None = None,
                        target: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                        freeze_codebook: bool = False, active: torch.Tensor | None = None) -> QuantizeOutput:
        """The residual loop's layer interface: FSQ has no state to train and no loss (a zero one)."""
        if target is not None:
            raise ValueError("FSQ has no cross-entropy loss against given indices")
        out, indices = self.encode_tokens(tokens, noise=self.training and self.noise_dropout > 0)
        return QuantizeOutput(out, indices, torch.zeros(1, device=tokens.device))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Grid codes (..., num_codebooks * codebook_dim) for indices, before ``project_out``."""
        codes = self.rotate_back(self._indices_to_codes(indices))
        return rearrange(codes, "... c d -> ... (c d)") if self.keep_num_codebooks_dim else codes

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices for z, as ``forward`` gives them in eval (the export encoder; whatever ``return_indices``)."""
        tokens, layout = self._tokens(z)
        return layout.restore_indices(self.encode_tokens(tokens)[1])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices_to_codes``: the quantized output for indices (the export decoder)."""
        return self.indices_to_codes(indices)
