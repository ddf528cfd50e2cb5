"""Turning user tensors into token rows and back, with clear errors on bad input.

Quantizers work on tokens ``(batch, n, features)``.  Users hand in single
vectors ``(b, d)``, sequences ``(b, n, d)``, channel-first sequences
``(b, d, n)`` or feature maps ``(b, c, *spatial)`` (images, video); a
:class:`TokenLayout` remembers which, so outputs and indices go back to the
user's layout.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class TokenLayout(NamedTuple):
    kind: str  # "vector" | "sequence" | "channel_first" | "feature_map" | "channel_last_map"
    spatial: tuple[int, ...]  # the token dimensions after the batch: (n,) or (h, w) or (t, h, w)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial)

    def restore_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, d) -> the user's layout."""
        b, _, d = tokens.shape
        if self.kind == "vector":
            return tokens.reshape(b, d)
        if self.kind == "sequence":
            return tokens
        if self.kind == "channel_last_map":
            return tokens.reshape(b, *self.spatial, d)
        channel_first = tokens.transpose(1, 2)
        return channel_first.reshape(b, d, *self.spatial)

    def restore_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, n, *heads) -> (b, *spatial, *heads), or (b, *heads) for single vectors."""
        b, _, *heads = indices.shape
        if self.kind == "vector":
            return indices.reshape(b, *heads)
        return indices.reshape(b, *self.spatial, *heads)

    def token_indices(self, indices: torch.Tensor, heads: int, what: str = "indices") -> torch.Tensor:
        """Indices in the user's layout -> (b, n, heads), with shape and dtype checks."""
        head_dims = (heads,) if heads > 1 else ()
        expect_tail = (() if self.kind == "vector" else self.spatial) + head_dims
        check_indices_dtype(indices, what)
        if tuple(indices.shape[1:]) != expect_tail:
            raise ValueError(f"{what} must have shape (batch, {', '.join(map(str, expect_tail))}) "
                             f"to match the input, got {tuple(indices.shape)}")
        return indices.reshape(indices.shape[0], self.num_tokens, heads).long()

    def token_weights(self, mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """A boolean mask over tokens -> float weights (b, n), or None."""
        if mask is None:
            return None
        if self.kind == "vector":
            raise ValueError("a mask needs tokens: it cannot be used with (batch, dim) input")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        allowed = {(batch, *self.spatial), (batch, self.num_tokens)}
        if tuple(mask.shape) not in allowed:
            raise ValueError(f"mask must have shape {(batch, *self.spatial)}, got {tuple(mask.shape)}")
        return mask.reshape(batch, self.num_tokens).float()


def check_indices_dtype(indices: torch.Tensor, what: str = "indices") -> None:
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor, got {indices.dtype}")


def check_index_range(indices: torch.Tensor, codebook_size: int, allow_minus_one: bool = False) -> None:
    """Out-of-range codes raise eagerly; under torch.compile the check is left
    out, since reading the result back would be a host-device sync."""
    if torch.compiler.is_compiling():
        return
    low = -1 if allow_minus_one else 0
    indices = indices.long()
    if indices.numel() and bool(((indices < low) | (indices >= codebook_size)).any()):
        found = (int(indices.min()), int(indices.max()))
        raise ValueError(f"indices must lie in [{low}, {codebook_size - 1}], found values in [{found[0]}, {found[1]}]")


def check_grid_indices(indices: torch.Tensor, codebook_size: int, num_codebooks: int | None) -> None:
    """Indices of an implicit grid (FSQ, LFQ): integer, in range, and ending with a codebook axis of size
    ``num_codebooks`` when the quantizer keeps one (``num_codebooks`` not None)."""
    check_indices_dtype(indices)
    if num_codebooks is not None and (indices.ndim < 2 or indices.shape[-1] != num_codebooks):
        raise ValueError(f"indices must end with a codebook axis of size {num_codebooks}, got {tuple(indices.shape)}")
    check_index_range(indices, codebook_size)


def lens_to_mask(lens: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
    """Sequence lengths (b,) -> a bool mask (b, n) of each sequence's first ``lens`` tokens."""
    if not isinstance(lens, torch.Tensor) or lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise TypeError(f"lens must be an integer tensor of sequence lengths, got {lens!r:.80}")
    if tuple(lens.shape) != (batch,):
        raise ValueError(f"lens must have shape ({batch},), one length per sequence, got {tuple(lens.shape)}")
    return torch.arange(num_tokens, device=lens.device) < lens[:, None]


def to_tokens(x: torch.Tensor, dim: int, channel_last: bool = True, accept_image_fmap: bool = False,
              channel_last_maps: bool = False):
    """Validate ``x`` and return ``(tokens (b, n, dim), TokenLayout)``.  ``channel_last_maps``: also take
    (b, *spatial, dim) of any rank (SimVQ's layout)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor of features, got {x.dtype}")
    if accept_image_fmap:
        if x.ndim < 3:
            raise ValueError(f"accept_image_fmap=True expects (batch, {dim}, *spatial) input, got shape {tuple(x.shape)}")
        layout = TokenLayout("feature_map", tuple(x.shape[2:]))
        feature_size = x.shape[1]
    elif x.ndim == 2:
        layout = TokenLayout("vector", (1,))
        feature_size = x.shape[1]
    elif x.ndim == 3 and channel_last:
        layout = TokenLayout("sequence", (x.shape[1],))
        feature_size = x.shape[2]
    elif x.ndim > 3 and channel_last and channel_last_maps:
        layout = TokenLayout("channel_last_map", tuple(x.shape[1:-1]))
        feature_size = x.shape[-1]
    elif x.ndim == 3:
        layout = TokenLayout("channel_first", (x.shape[2],))
        feature_size = x.shape[1]
    else:
        expected = f"(batch, n, {dim})" if channel_last else f"(batch, {dim}, n)"
        raise ValueError(f"expected input of shape (batch, {dim}) or {expected}, got {tuple(x.shape)}"
                         " (set accept_image_fmap=True for feature maps)")
    if feature_size != dim:
        raise ValueError(f"expected {dim} features, got {feature_size} in input of shape {tuple(x.shape)}")
    if x.shape[0] == 0 or layout.num_tokens == 0:
        raise ValueError(f"expected at least one batch element and one token, got input of shape {tuple(x.shape)}")
    b = x.shape[0]
    if layout.kind in ("vector", "sequence", "channel_last_map"):
        return x.reshape(b, layout.num_tokens, dim), layout
    return x.reshape(b, dim, layout.num_tokens).transpose(1, 2), layout
