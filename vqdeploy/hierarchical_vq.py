"""HierarchicalVQ: VAR-style multi-scale residual quantization (Tian et al. 2024, arXiv 2404.02905), 1.32.0's.

The feature map is quantized coarse to fine: at each level the residual is average-pooled to that level's fixed
token map (``scales``), quantized by a ``VectorQuantize`` (one shared codebook by default), upsampled back to
the full size, passed through a residual convolution phi (``quant_resi``), added to the reconstruction and
taken off the residual.  The output is the reconstruction, one index map per level and the mean of the levels'
losses.  Every level's shape is fixed by the module, so the loop is static: one graph under
``torch.compile(fullgraph=True)`` (EMA, k-means and dead codes of the shared codebook run once per level, in
order, as the reference's), and an encoder graph whose outputs are the index maps of every level.

``nested_dropout`` (training: with that probability keep only the levels up to a random cutoff) draws the cutoff
on the device; the reconstruction and loss keep the levels up to it with ``torch.where``, so shapes stay fixed;
``return_cutoff=True`` gives the cutoff as a 0-d tensor (None when no level can be dropped).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import number, positive_int
from .config import records_config
from .token_layout import check_indices_dtype, lens_to_mask
from .vector_quantize import VectorQuantize


class HierarchicalOutput(NamedTuple):
    """What ``forward`` returns; unpacks like the reference's tuple."""

    reconstruction: torch.Tensor  # the input's shape
    indices: tuple[torch.Tensor, ...]  # per level: (b, *level_shape)
    loss: torch.Tensor  # ()


class HierarchicalOutputWithCutoff(NamedTuple):
    reconstruction: torch.Tensor
    indices: tuple[torch.Tensor, ...]
    loss: torch.Tensor
    cutoff: torch.Tensor | None  # the last kept level (0-d), or None


class Phi(nn.Module):
    """The residual convolution after upsampling: ``lerp(x, conv(x), resi_ratio)`` (state key ``conv``)."""

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float):
        super().__init__()
        self.conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1](dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(resi_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.resi_ratio <= 1e-8 else x.lerp(self.conv(x), self.resi_ratio)


def _level_shape(scale, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(scale, int) and not isinstance(scale, bool):
        shape = (scale,) * spatial_dims
    elif isinstance(scale, (tuple, list)) and len(scale) == spatial_dims:
        shape = tuple(scale)
    else:
        raise ValueError(f"each scale must be an int or a sequence of {spatial_dims} ints, got {scale!r}")
    for size in shape:
        positive_int("each scale", size)
    return shape


@records_config
class HierarchicalVQ(nn.Module):
    """Multi-scale residual VQ with 1.32.0's keyword arguments and state keys (``vq._codebook.*`` or
    ``vqs.{i}._codebook.*``, ``phi_shared.conv.*`` or ``phi_levels.{i}.conv.*``).  Input (b, dim, *spatial) with
    ``channel_first`` (default) or (b, *spatial, dim): one spatial axis, two with ``accept_image_fmap``, three with
    ``accept_3d_fmap``."""

    def __init__(self, *, dim: int, codebook_size: int | tuple[int, ...], scales: Sequence[int | Sequence[int]],
                 shared_codebook: bool = True, channel_first: bool = True, sync_codebook: bool | None = None,
                 decay: float = 0.99, commitment_weight: float = 1.0, rotation_trick: bool = False,
                 kmeans_init: bool = True, kmeans_iters: int = 10, threshold_ema_dead_code: float = 2,
                 stochastic_sample_codes: bool = False, sample_codebook_temp: float = 0.1,
                 orthogonal_reg_weight: float = 0.0, orthogonal_reg_max_codes: int | None = 128,
                 orthogonal_reg_active_codes_only: bool = False, quant_resi: float = 0.5, share_quant_resi: int = 1,
                 nested_dropout: float = 0.0, nested_dropout_min_levels: int = 1, accept_image_fmap: bool = False,
                 accept_3d_fmap: bool = False):
        super().__init__()
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("choose at most one of accept_image_fmap and accept_3d_fmap")
        positive_int("dim", dim)
        number("nested_dropout", nested_dropout, 0.0, 1.0)
        positive_int("nested_dropout_min_levels", nested_dropout_min_levels)
        number("quant_resi", quant_resi)
        if not isinstance(scales, (tuple, list)) or not scales:
            raise ValueError(f"scales must be a non-empty sequence of level sizes, got {scales!r}")
        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        level_shapes = tuple(_level_shape(scale, spatial_dims) for scale in scales)
        for coarse, fine in zip(level_shapes, level_shapes[1:]):
            if any(a > b for a, b in zip(coarse, fine)):
                raise ValueError(f"scales must be non-decreasing, got {list(scales)}")
        sizes = (codebook_size,) * len(level_shapes) if isinstance(codebook_size, int) else tuple(codebook_size)
        if len(sizes) != len(level_shapes):
            raise ValueError(f"codebook_size must be an int or one size per scale ({len(level_shapes)}), "
                             f"got {codebook_size!r}")
        if shared_codebook and len(set(sizes)) > 1:
            raise ValueError("shared_codebook needs one codebook_size for every level")
        self.dim, self.spatial_dims, self.channel_first = dim, spatial_dims, bool(channel_first)
        self.scales, self.level_shapes, self.num_levels = tuple(scales), level_shapes, len(level_shapes)
        self.codebook_sizes = sizes
        self.nested_dropout, self.nested_dropout_min_levels = float(nested_dropout), nested_dropout_min_levels
        vq_kwargs = dict(dim=dim, decay=decay, commitment_weight=commitment_weight, rotation_trick=rotation_trick,
                         kmeans_init=kmeans_init, kmeans_iters=kmeans_iters,
                         threshold_ema_dead_code=threshold_ema_dead_code,
                         stochastic_sample_codes=stochastic_sample_codes, sample_codebook_temp=sample_codebook_temp,
                         orthogonal_reg_weight=orthogonal_reg_weight, orthogonal_reg_max_codes=orthogonal_reg_max_codes,
                         orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
                         sync_codebook=sync_codebook, defaults="1.32.0")  # a class of 1.29.0 and later
        self.vq = VectorQuantize(codebook_size=sizes[0], **vq_kwargs) if shared_codebook else None
        self.vqs = None if shared_codebook else nn.ModuleList(
            [VectorQuantize(codebook_size=size, **vq_kwargs) for size in sizes])
        self.phi_shared = self.phi_levels = None
        if share_quant_resi == 1:
            self.phi_shared = Phi(dim, spatial_dims, quant_resi)
        else:
            count = self.num_levels if share_quant_resi <= 0 else min(self.num_levels, int(share_quant_resi))
            self.phi_levels = nn.ModuleList([Phi(dim, spatial_dims, quant_resi) for _ in range(count)])

    @property
    def codebook_size(self) -> int:
        return max(self.codebook_sizes)

    def get_vq(self, level: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level]

    def choose_phi(self, level: int) -> Phi:
        if self.phi_shared is not None:
            return self.phi_shared
        position = level / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (len(self.phi_levels) - 1))]

    # ------------------------------------------------------------------ pieces of a level

    def _checked_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input, channel-first (b, dim, *spatial), after checks."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point tensor of features, got {type(x).__name__} "
                            f"{getattr(x, 'dtype', '')}")
        axis = 1 if self.channel_first else -1
        layout = f"(batch, {self.dim}, *{self.spatial_dims} spatial)" if self.channel_first \
            else f"(batch, *{self.spatial_dims} spatial, {self.dim})"
        if x.ndim != self.spatial_dims + 2 or x.shape[axis] != self.dim:
            raise ValueError(f"expected input {layout}, got shape {tuple(x.shape)}")
        return x if self.channel_first else x.movedim(-1, 1)

    def pool_residual(self, residual: torch.Tensor, level_shape: tuple[int, ...], mask: torch.Tensor | None):
        """The residual averaged onto a level's token map, and which of its tokens cover real input."""
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.spatial_dims - 1]
        if mask is None:
            return pool(residual, level_shape), None
        weights = mask.unsqueeze(1).to(residual.dtype)
        pooled_mask = pool(weights, level_shape)
        if all(size == 1 for size in level_shape):  # the coarsest level: a masked mean over everything
            spatial = tuple(range(2, residual.ndim))
            pooled = (residual * weights).sum(dim=spatial, keepdim=True) \
                / weights.expand_as(residual).sum(dim=spatial, keepdim=True).clamp(min=1e-5)
        else:
            pooled = pool(residual * weights, level_shape) / pooled_mask.clamp(min=1e-6)
        return pooled, pooled_mask[:, 0] > 0

    def upsample(self, q: torch.Tensor, full_shape: tuple[int, ...], level: int) -> torch.Tensor:
        """A level's codes (b, dim, *level_shape) at the full size, through phi.

        An axis of one token is broadcast, not interpolated (linear interpolation of one sample is that sample):
        the interpolation's backward is a scatter-add whose target does not move along that axis, which
        inductor's vectorised multi-threaded CPU code cannot emit (torch 2.13: ``CppVecKernel.store`` asserts a
        vector index for ``atomic_add``)."""
        q = q.expand(*q.shape[:2], *(full if size == 1 else size for size, full in zip(q.shape[2:], full_shape)))
        if tuple(q.shape[2:]) != tuple(full_shape):
            mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
            q = F.interpolate(q, size=full_shape, mode=mode, align_corners=False)
        return self.choose_phi(level)(q)

    upsample_to_full = upsample  # the reference's name

    def _nested_cutoff(self, device) -> torch.Tensor | None:
        """The last level a training step keeps (0-d, drawn on the device), or None when none can be dropped."""
        low = self.nested_dropout_min_levels - 1
        if not self.training or self.nested_dropout <= 0 or self.num_levels <= 1 or low >= self.num_levels - 1:
            return None
        apply, which = torch.rand(2, device=device).unbind()
        span = self.num_levels - 1 - low
        cutoff = low + (which * span).floor().long().clamp(max=span - 1)
        return torch.where(apply < self.nested_dropout, cutoff, self.num_levels - 1)

    sample_nested_cutoff = _nested_cutoff  # the reference's name (a 0-d tensor here, not a Python int)

    # ------------------------------------------------------------------ forward and decoding

    def forward(self, x: torch.Tensor, indices=None, mask: torch.Tensor | None = None,
                lens: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                return_cutoff: bool = False):
        """Returns ``(reconstruction, per-level indices, loss)`` (and the cutoff with ``return_cutoff``)."""
        if indices is not None:
            raise ValueError("HierarchicalVQ has no forward from indices (nor has 1.32.0): use "
                             "get_output_from_indices")
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        x = self._checked_input(x)
        b, full_shape = x.shape[0], tuple(x.shape[2:])
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("lens needs one spatial axis; pass a mask for feature maps")
            mask = lens_to_mask(lens, b, full_shape[0])
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, *full_shape)):
            raise ValueError(f"mask must be a bool tensor of shape {(b, *full_shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        kwargs = {} if sample_codebook_temp is None else dict(sample_codebook_temp=sample_codebook_temp)
        residual, levels, all_indices, losses = x, [], [], []
        for level, level_shape in enumerate(self.level_shapes):
            pooled, level_mask = self.pool_residual(residual, level_shape, mask)
            tokens = pooled.flatten(2).transpose(1, 2)
            quantized, level_indices, loss = self.get_vq(level)(
                tokens, mask=None if level_mask is None else level_mask.reshape(b, -1), **kwargs)
            quantized = self.upsample(quantized.transpose(1, 2).reshape(b, self.dim, *level_shape), full_shape,
                                      level)
            residual = residual - quantized
            levels.append(quantized)
            all_indices.append(level_indices.reshape(b, *level_shape))
            losses.append(loss.reshape(()))
        cutoff = self._nested_cutoff(x.device)
        reconstruction, losses = None, torch.stack(losses)
        for level, quantized in enumerate(levels):  # the levels up to the cutoff, summed in order
            if cutoff is not None:
                quantized = torch.where(cutoff >= level, quantized, torch.zeros((), dtype=x.dtype, device=x.device))
            reconstruction = quantized if reconstruction is None else reconstruction + quantized
        if cutoff is None:
            loss = losses.mean()
        else:
            kept = (torch.arange(self.num_levels, device=x.device) <= cutoff).to(losses.dtype)
            loss = (losses * kept).sum() / kept.sum().clamp(min=1e-5)
        if mask is not None:
            reconstruction = torch.where(mask.unsqueeze(1), reconstruction,
                                         torch.zeros((), dtype=x.dtype, device=x.device))
        reconstruction = reconstruction if self.channel_first else reconstruction.movedim(1, -1)
        if return_cutoff:
            return HierarchicalOutputWithCutoff(reconstruction, tuple(all_indices), loss, cutoff)
        return HierarchicalOutput(reconstruction, tuple(all_indices), loss)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each level's index map (b, *level_shape), without touching any state (the export encoder)."""
        x = self._checked_input(x)
        b, full_shape = x.shape[0], tuple(x.shape[2:])
        residual, all_indices = x, []
        for level, level_shape in enumerate(self.level_shapes):
            pooled, _ = self.pool_residual(residual, level_shape, None)
            codes, level_indices = self.get_vq(level).encode_tokens(pooled.flatten(2).transpose(1, 2))
            residual = residual - self.upsample(codes.transpose(1, 2).reshape(b, self.dim, *level_shape),
                                                full_shape, level)
            all_indices.append(level_indices.reshape(b, *level_shape))
        return tuple(all_indices)

    def get_output_from_indices(self, indices: Sequence[torch.Tensor], full_shape=None) -> torch.Tensor:
        """The reconstruction from every level's index map (-1 decodes to nothing), at ``full_shape`` (default:
        the finest level's), in the input's layout."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(f"indices must be a sequence of {self.num_levels} index maps, one per level")
        full_shape = self.level_shapes[-1] if full_shape is None else _level_shape(full_shape, self.spatial_dims)
        reconstruction = None
        for level, (level_indices, level_shape) in enumerate(zip(indices, self.level_shapes)):
            check_indices_dtype(level_indices)
            b = level_indices.shape[0]
            if tuple(level_indices.shape[1:]) != level_shape:
                raise ValueError(f"indices of level {level} must have shape (batch, {', '.join(map(str, level_shape))})"
                                 f", got {tuple(level_indices.shape)}")
            flat = level_indices.reshape(b, -1)
            kept = (flat >= 0).unsqueeze(-1)
            codes = self.get_vq(level).lookup(torch.where(flat >= 0, flat, 0))
            codes = torch.where(kept, codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
            q = self.upsample(codes.transpose(1, 2).reshape(b, self.dim, *level_shape), full_shape, level)
            reconstruction = q if reconstruction is None else reconstruction + q
        return reconstruction if self.channel_first else reconstruction.movedim(1, -1)

    decode = get_output_from_indices

    # ------------------------------------------------------------------ one token sequence (the export graphs)

    static_spatial = True  # the levels pool to fixed sizes: an exported graph's spatial axes are fixed

    @property
    def level_tokens(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.level_shapes)

    def flatten_indices(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Every level's index map -> one token sequence (b, sum of level tokens), coarse to fine, as VAR's
        transformer reads them."""
        return torch.cat([level.reshape(level.shape[0], -1) for level in indices], dim=1)

    def split_indices(self, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A token sequence (b, sum of level tokens) -> each level's index map (b, *level_shape)."""
        check_indices_dtype(tokens)
        if tokens.ndim != 2 or tokens.shape[1] != sum(self.level_tokens):
            raise ValueError(f"a token sequence must have shape (batch, {sum(self.level_tokens)}), "
                             f"got {tuple(tokens.shape)}")
        levels = tokens.split(list(self.level_tokens), dim=1)
        return tuple(level.reshape(tokens.shape[0], *shape) for level, shape in zip(levels, self.level_shapes))

    def export_encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder graph's output: ``flatten_indices(encode(x))``."""
        return self.flatten_indices(self.encode(x))

    def export_decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The decoder graph: a token sequence -> the reconstruction at the finest level's size."""
        return self.get_output_from_indices(self.split_indices(tokens))
