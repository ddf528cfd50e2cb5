"""RandomProjectionQuantizer: the frozen targets of BEST-RQ (https://arxiv.org/abs/2202.01855).

Normalise the features, project them with a fixed random matrix per codebook,
l2-normalise and take the nearest code of a fixed random codebook: the indices
are self-supervised targets, nothing here trains.

The reference builds its inner VectorQuantize without ``codebook_dim``, which
adds a random ``dim -> heads * dim`` projection before the lookup (673M
parameters in its README configuration).  vqdeploy leaves it out: each
codebook sees its ``codebook_dim`` projection directly.  A reference
checkpoint that carries that projection still loads (the inner quantizer is
rebuilt in the reference's shape) and then reproduces the reference's indices.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .checks import positive_int
from .config import records_config
from .vector_quantize import VectorQuantize


@records_config
class RandomProjectionQuantizer(nn.Module):
    """dim -> ``num_codebooks`` indices per token, from frozen random projections and codebooks."""

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, num_codebooks: int = 1, norm: bool = True,
                 **vector_quantize_kwargs):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("codebook_dim", codebook_dim),
                            ("num_codebooks", num_codebooks)):
            positive_int(name, value)
        for fixed in ("heads", "use_cosine_sim", "separate_codebook_per_head", "dim", "codebook_dim"):
            if fixed in vector_quantize_kwargs:
                raise TypeError(f"RandomProjectionQuantizer sets {fixed} of its codebooks itself")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self._vector_quantize_kwargs = vector_quantize_kwargs

        rand_projs = torch.empty(num_codebooks, dim, codebook_dim)
        nn.init.xavier_normal_(rand_projs)
        self.register_buffer("rand_projs", rand_projs)
        # "The input data is normalized to have 0 mean and standard deviation of 1" (BEST-RQ, section 3)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.vq = self._make_vq(reference_projection=False)

    def _make_vq(self, reference_projection: bool) -> VectorQuantize:
        """The frozen cosine codebooks; with ``reference_projection``, the reference's shape (see the module doc)."""
        width = self.codebook_dim * self.num_codebooks
        vq = VectorQuantize(dim=width, codebook_size=self.codebook_size, heads=self.num_codebooks,
                            codebook_dim=None if reference_projection else self.codebook_dim,
                            use_cosine_sim=True, separate_codebook_per_head=True, **self._vector_quantize_kwargs)
        return vq.to(self.rand_projs.device).eval()

    @property
    def has_reference_projection(self) -> bool:
        return self.vq.has_projections

    def train(self, mode: bool = True):
        # the codebooks are frozen targets: the inner quantizer never trains (the reference forces eval too)
        super().train(mode)
        self.vq.eval()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        reference_projection = prefix + "vq.project_in.weight" in state_dict
        if reference_projection != self.has_reference_projection:
            self.vq = self._make_vq(reference_projection)  # loaded next, as a child
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 3 or x.shape[-1] != self.dim or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"expected input of shape (batch, n, {self.dim}), got {tuple(x.shape)}")
        projected = torch.einsum("bnd,hde->bnhe", self.norm(x), self.rand_projs)
        return rearrange(projected, "b n h e -> b n (h e)")

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """x: (b, n, dim) -> indices (b, n, num_codebooks) ((b, n) with one codebook, as the reference);
        with ``indices`` given, the cross-entropy of the code similarities against them (a 0-d loss)."""
        tokens = self._project(x)
        if indices is None:
            return self.vq.encode(tokens)
        return self.vq.quantize_tokens(tokens, target=self._target(indices, x)).ce_loss

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The indices, as ``forward`` without ``indices`` (the export encoder)."""
        return self.vq.encode(self._project(x))

    def _target(self, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        expected = (x.shape[0], x.shape[1]) + ((self.num_codebooks,) if self.num_codebooks > 1 else ())
        if tuple(indices.shape) != expected:
            raise ValueError(f"indices must have shape {expected}, got {tuple(indices.shape)}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        return indices.reshape(x.shape[0], x.shape[1], self.num_codebooks).long()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, codebook_dim={self.codebook_dim}, "
                f"num_codebooks={self.num_codebooks}")

