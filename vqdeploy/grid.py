"""What the implicit-grid quantizers (FSQ, LFQ, LatentQuantize) share.

Each splits ``dim`` features, through optional linear projections, into
``num_codebooks`` groups of ``codebook_dim`` channels, quantizes every group on
a fixed grid, and numbers a group's code with one integer.  The shapes, the
projections and decoding indices back to features are the same for all three.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import check_grid_indices, to_tokens
from .vector_quantize import _positive_int


class GridQuantizer(nn.Module):
    """Base class: codebook groups, projections and ``indices_to_codes``; subclasses give ``lookup``
    (indices -> codes before ``project_out``) and ``codebook_size``."""

    def _init_groups(self, codebook_dim: int, num_codebooks: int, keep_num_codebooks_dim: bool | None,
                     dim: int | None, projection_has_bias: bool = True) -> None:
        _positive_int("num_codebooks", num_codebooks)
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1 (indices need a codebook axis)")
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim
        _positive_int("dim", self.dim)
        self.has_projections = self.dim != self.effective_codebook_dim
        self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias) \
            if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias) \
            if self.has_projections else nn.Identity()

    def _project_in(self, tokens: torch.Tensor) -> torch.Tensor:
        """project_in in its weights' dtype (half inputs meet float32 weights, or float32 codes half weights)."""
        return self.project_in(tokens.to(self.project_in.weight.dtype)) if self.has_projections else tokens

    def _project_out(self, codes: torch.Tensor) -> torch.Tensor:
        return self.project_out(codes.to(self.project_out.weight.dtype)) if self.has_projections else codes

    def _decode_indices(self, indices: torch.Tensor, project_out: bool = True,
                        channel_first: bool = False) -> torch.Tensor:
        """Checked indices -> codes (after ``project_out`` unless told otherwise), channel-first for images and
        video (indices with two or more token axes) or when ``channel_first``."""
        check_grid_indices(indices, self.codebook_size, self.num_codebooks if self.keep_num_codebooks_dim else None)
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self.lookup(indices)
        if project_out:
            codes = self._project_out(codes)
        return codes.movedim(-1, 1) if is_img_or_video or channel_first else codes

    def _tokens(self, x: torch.Tensor):
        """``(tokens (b, n, dim), layout)`` for (b, n, dim), (b, dim, n) with ``channel_first``, or channel-first
        images and video; the reference's grid quantizers never take single vectors (b, dim)."""
        if isinstance(x, torch.Tensor) and x.ndim == 2:
            raise ValueError(f"{type(self).__name__} expects (batch, n, {self.dim}) or channel-first feature maps, "
                             f"got {tuple(x.shape)}")
        is_img_or_video = isinstance(x, torch.Tensor) and x.ndim >= 4
        return to_tokens(x, self.dim, channel_last=not getattr(self, "channel_first", False),
                         accept_image_fmap=is_img_or_video)
