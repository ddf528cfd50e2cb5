"""FSQ: finite scalar quantization (Mentzer et al., https://arxiv.org/abs/2309.15505).

Each channel is bounded with a tanh and rounded to one of ``levels[i]`` values:
the codebook is the implicit grid of all level combinations, nothing is
learned but the optional projections, and an index is the mixed-radix number
of a code's level indices.  The API and the arithmetic follow
vector-quantize-pytorch 1.14.17, so codes and indices are bit-identical.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from einops import rearrange

from .config import records_config
from .grid import GridQuantizer
from .primitives import round_ste
from .vector_quantize import QuantizeOutput


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
                 channel_first: bool = False, projection_has_bias: bool = True):
        super().__init__()
        levels = check_levels(levels)
        self.levels = levels
        self._init_groups(len(levels), num_codebooks, keep_num_codebooks_dim, dim, projection_has_bias)
        self.scale = scale  # accepted for the reference's signature; it does not use it either
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.channel_first = channel_first
        self.codebook_size = math.prod(levels)

        # non-persistent, as in the reference: checkpoints hold only the projections
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32)
        self.register_buffer("_basis", basis, persistent=False)
        self.register_buffer("implicit_codebook", self._indices_to_codes(torch.arange(self.codebook_size)),
                             persistent=False)

    # ------------------------------------------------------------------ the grid

    def bound_scale(self, eps: float = 1e-3) -> torch.Tensor:
        """The tanh's output scale per channel, (levels - 1) * (1 + eps) / 2: the bounded range's half width."""
        return (self._levels - 1) * (1 + eps) / 2

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Squash z (..., codebook_dim) into the level range; even levels are shifted by half a step."""
        half_l = self.bound_scale(eps)
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).atanh()
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Round the bounded z to the grid (straight-through), renormalised to [-1, 1]."""
        return round_ste(self.bound(z)) / (self._levels // 2)

    def _scale_and_shift(self, zhat_normalized: torch.Tensor) -> torch.Tensor:
        half_width = self._levels // 2
        return zhat_normalized * half_width + half_width

    def _scale_and_shift_inverse(self, zhat: torch.Tensor) -> torch.Tensor:
        half_width = self._levels // 2
        return (zhat - half_width) / half_width

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Grid codes (..., codebook_dim) -> int32 indices (...)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must end with {self.codebook_dim} channels, got shape {tuple(zhat.shape)}")
        return (self._scale_and_shift(zhat) * self._basis).sum(dim=-1).to(torch.int32)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> each channel's level index (..., codebook_dim)."""
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def _indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices -> the output ``forward`` gives for them (after ``project_out``), channel-first for
        images and video or with ``channel_first``."""
        return self._decode_indices(indices, channel_first=self.channel_first)

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor) -> FSQOutput:
        """z: (b, n, dim), (b, dim, n) with ``channel_first``, or (b, dim, *spatial) for images and video.
        Returns ``(quantized, indices)``."""
        tokens, layout = self._tokens(z)
        out, indices = self.encode_tokens(tokens)
        return FSQOutput(layout.restore_features(out), layout.restore_indices(indices))

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (b, n, dim) -> ``(quantized (b, n, dim), int32 indices (b, n) or (b, n, num_codebooks))``."""
        orig_dtype = tokens.dtype
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            if self.has_projections:  # the projections run in their own dtype (the reference fails otherwise)
                tokens = tokens.to(self.project_in.weight.dtype)
            codes = rearrange(self.project_in(tokens), "b n (c d) -> b n c d", c=self.num_codebooks)
            if codes.dtype not in self.allowed_dtypes:
                codes = codes.float()
            codes = self.quantize(codes)
            indices = self.codes_to_indices(codes)
            codes = rearrange(codes, "b n c d -> b n (c d)").to(orig_dtype)
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
        out, indices = self.encode_tokens(tokens)
        return QuantizeOutput(out, indices, torch.zeros(1, device=tokens.device))

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Grid codes (..., num_codebooks * codebook_dim) for indices, before ``project_out``."""
        codes = self._indices_to_codes(indices)
        return rearrange(codes, "... c d -> ... (c d)") if self.keep_num_codebooks_dim else codes

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices for z, as ``forward`` gives them (the export encoder)."""
        return self.forward(z).indices

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices_to_codes``: the quantized output for indices (the export decoder)."""
        return self.indices_to_codes(indices)
