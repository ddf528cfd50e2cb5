"""Learned transforms of a codebook folded into the codes they produce, for export.

A ``VectorQuantize`` ``vq_bridge`` (codes = bridge(embed)) and a ``SimVQ`` ``codebook_transform`` (codes =
transform(frozen_codebook)) are modules a bundle's JSON config cannot hold, and in eval each only ever produces
one fixed table of codes.  ``fold_code_transforms`` writes that table in their place, on the exporter's frozen
copy, and drops the modules from the recorded configs, so the rebuilt bundle gives the same codes exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..codebooks import Codebook
from ..sim_vq import SimVQ

# config entries a folded module no longer has, and what they become
_FOLDED_CONFIG = {
    "vq_bridge": dict(vq_bridge=None, ema_update=False, learnable_codebook=True),
    "codebook_transform": dict(codebook_transform=None, frozen_codebook_dim=None),
}


def fold_code_transforms(module: nn.Module) -> nn.Module:
    """Fold every vq_bridge and custom SimVQ codebook_transform inside ``module``, in place; returns it."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, Codebook) and sub.vq_bridge is not None:
                sub.embed.copy_(sub.vq_bridge(sub.embed))
                sub.vq_bridge = None
            elif isinstance(sub, SimVQ) and sub.init_config.get("codebook_transform") is not None:
                codes = sub.codebook
                identity = nn.Linear(sub.dim, sub.dim, bias=False).to(codes)
                identity.weight.copy_(torch.eye(sub.dim))  # reproduces the codes exactly
                sub.code_transform, sub.frozen_codebook, sub.frozen_codebook_dim = identity, codes, sub.dim
    for sub in module.modules():
        config = sub.__dict__.get("init_config")
        if config is None:
            continue
        for key, replacement in _FOLDED_CONFIG.items():
            if config.get(key) is not None:
                config = dict(config, **replacement)
        sub.__dict__["init_config"] = config
    return module
