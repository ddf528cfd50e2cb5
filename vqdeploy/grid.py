"""What the implicit-grid quantizers (FSQ, LFQ, LatentQuantize) share.

Each splits ``dim`` features, through optional linear projections, into
``num_codebooks`` groups of ``codebook_dim`` channels, quantizes every group on
a fixed grid, and numbers a group's code with one integer.  The shapes, the
projections and decoding indices back to features are the same for all three.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .checks import positive_int
from .token_layout import check_grid_indices, to_tokens


class CosineSimLinear(nn.Module):
    """A projection of unit vectors onto unit columns, times ``scale`` (LFQ's ``cosine_sim_project_in``):
    the quantizer sees cosines, whatever the input's norm.  ``weight`` is (dim_in, dim_out), as the reference
    stores it (transposed against ``nn.Linear``), and has no bias."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


class GridQuantizer(nn.Module):
    """Base class: codebook groups, projections and ``indices_to_codes``; subclasses give ``lookup``
    (indices -> codes before ``project_out``) and ``codebook_size``."""

    def _init_groups(self, codebook_dim: int, num_codebooks: int, keep_num_codebooks_dim: bool | None,
                     dim: int | None, projection_has_bias: bool = True, has_projections: bool | None = None,
                     cosine_sim_project_in_scale: float | None = None) -> None:
        """``has_projections``: None projects when ``dim`` differs from the codes' channels; True always (as
        LFQ allows); ``cosine_sim_project_in_scale``: project in with :class:`CosineSimLinear` at that scale."""
        positive_int("num_codebooks", num_codebooks)
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("keep_num_codebooks_dim=False needs num_codebooks=1 (indices need a codebook axis)")
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim
        positive_int("dim", self.dim)
        needs_projections = self.dim != self.effective_codebook_dim
        if has_projections is False and needs_projections:
            raise ValueError(f"has_projections=False needs dim == num_codebooks * codebook_dim "
                             f"({self.effective_codebook_dim}), got dim={self.dim}")
        self.has_projections = needs_projections if has_projections is None else bool(has_projections)
        if not self.has_projections:
            self.project_in = nn.Identity()
        elif cosine_sim_project_in_scale is not None:
            self.project_in = CosineSimLinear(self.dim, self.effective_codebook_dim, cosine_sim_project_in_scale)
        else:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
        self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias) \
            if self.has_projections else nn.Identity()

    def _init_levels(self, levels: list[int]) -> None:
        """Per-channel level counts and the mixed-radix basis that numbers a code (non-persistent, as in the
        reference: checkpoints hold only the projections)."""
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1]), dim=0, dtype=torch.int32)
        self.register_buffer("_basis", basis, persistent=False)

    def indices_to_level_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (...) -> each channel's level index (..., codebook_dim)."""
        return (indices.unsqueeze(-1) // self._basis) % self._levels

    def level_indices_to_indices(self, level_indices: torch.Tensor) -> torch.Tensor:
        """Level indices (..., codebook_dim) -> int32 indices (...), the mixed-radix number."""
        return (level_indices * self._basis).sum(dim=-1).to(torch.int32)

    def _init_rotation(self, enabled: bool) -> None:
        """A persistent random orthogonal rotation of each group's channels (arXiv 2307.13304), as 1.32.0."""
        self.orthogonal_rotation = bool(enabled)
        if enabled:
            rotation = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)

    def rotate(self, z: torch.Tensor) -> torch.Tensor:
        """(..., codebook_dim) into the rotated basis the grid quantizes in."""
        return z @ self.orthogonal_rot.to(z.dtype) if self.orthogonal_rotation else z

    def rotate_back(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.orthogonal_rot.to(codes.dtype).t() if self.orthogonal_rotation else codes

    def _project_in(self, tokens: torch.Tensor) -> torch.Tensor:
        """project_in in its weights' dtype (half inputs meet float32 weights, or float32 codes half weights)."""
        return self.project_in(tokens.to(self.project_in.weight.dtype)) if self.has_projections else tokens

    def _project_out(self, codes: torch.Tensor) -> torch.Tensor:
        return self.project_out(codes.to(self.project_out.weight.dtype)) if self.has_projections else codes

    def _decode_indices(self, indices: torch.Tensor, project_out: bool = True, channel_first: bool = False,
                        maps_channel_first: bool = True) -> torch.Tensor:
        """Checked indices -> codes (after ``project_out`` unless told otherwise), channel-first when
        ``channel_first``, and for images and video (indices with two or more token axes) unless
        ``maps_channel_first`` is off (LFQ's ``channel_first=False``)."""
        check_grid_indices(indices, self.codebook_size, self.num_codebooks if self.keep_num_codebooks_dim else None)
        is_img_or_video = indices.ndim >= 3 + int(self.keep_num_codebooks_dim)
        codes = self.lookup(indices)
        if project_out:
            codes = self._project_out(codes)
        return codes.movedim(-1, 1) if channel_first or (is_img_or_video and maps_channel_first) else codes

    @property
    def maps_channel_first(self) -> bool:
        """Whether images and video come channel-first (b, dim, *spatial), as they do unless a subclass says."""
        return True

    def _tokens(self, x: torch.Tensor):
        """``(tokens (b, n, dim), layout)`` for (b, n, dim), (b, dim, n) with ``channel_first``, images and
        video (channel-first, or channel-last where ``maps_channel_first`` is off); the reference's grid
        quantizers never take single vectors (b, dim)."""
        if isinstance(x, torch.Tensor) and x.ndim == 2:
            raise ValueError(f"{type(self).__name__} expects (batch, n, {self.dim}) or channel-first feature maps, "
                             f"got {tuple(x.shape)}")
        is_img_or_video = isinstance(x, torch.Tensor) and x.ndim >= 4
        if is_img_or_video and not self.maps_channel_first:
            return to_tokens(x, self.dim, channel_last_maps=True)
        return to_tokens(x, self.dim, channel_last=not getattr(self, "channel_first", False),
                         accept_image_fmap=is_img_or_video)
