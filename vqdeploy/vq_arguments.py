"""VectorQuantize's constructor arguments: their checks, the values derived from them, and the codebook's config."""

from __future__ import annotations

import dataclasses
import functools

from torch import nn

from . import distributed as D
from .checks import number, positive_int
from .codebooks import CodebookConfig
from .defaults import behaves_as_latest, default_for

_NUMBERS = (  # name, low, high, low_open
    ("decay", 0.0, 1.0, False), ("eps", 0.0, None, True), ("affine_param_batch_decay", 0.0, 1.0, False),
    ("affine_param_codebook_decay", 0.0, 1.0, False), ("commitment_weight", 0.0, None, False),
    ("orthogonal_reg_weight", 0.0, None, False), ("sample_codebook_temp", 0.0, None, False),
    ("threshold_ema_dead_code", 0.0, None, False), ("directional_reparam_variance", 0.0, None, False),
    ("codebook_diversity_loss_weight", 0.0, None, False), ("codebook_diversity_temperature", 0.0, None, True),
    ("sync_update_v", 0.0, 1.0, False),
)

# the codebook options VectorQuantize takes under the same name (dim and learnable_codebook are derived)
_CODEBOOK_ARGUMENTS = tuple(f.name for f in dataclasses.fields(CodebookConfig)
                            if f.name not in ("dim", "learnable_codebook"))


def checked_arguments(args: dict, release: str) -> dict:
    """Check VectorQuantize's arguments (by name) and return them with the derived ones resolved: the training
    setup (``ema_update``, ``learnable_codebook``, ``rotation_trick``, ``commitment_weight``), ``codebook_dim``,
    ``sync_codebook`` and the behaviours that follow ``release``."""
    a = dict(args)
    for name in ("dim", "codebook_size", "heads", "kmeans_iters"):
        positive_int(name, a[name])
    for name in ("codebook_dim", "orthogonal_reg_max_codes"):
        if a[name] is not None:
            positive_int(name, a[name])
    for name, low, high, low_open in _NUMBERS:
        number(name, a[name], low, high, low_open)
    bridge, reparam, straight_through, rotation = (a["vq_bridge"], a["directional_reparam"], a["straight_through"],
                                                   a["rotation_trick"])
    # DiVeQ and a vq_bridge learn the codebook by gradient: no EMA, a learnable codebook (1.32.0's defaults)
    if bridge is not None and not isinstance(bridge, nn.Module):
        raise TypeError(f"vq_bridge must be an nn.Module transforming the codes, got {type(bridge).__name__}")
    learned = bool(reparam) or bridge is not None
    ema_update = a["ema_update"] = not learned if a["ema_update"] is None else a["ema_update"]
    learnable = a["learnable_codebook"] = learned if a["learnable_codebook"] is None else a["learnable_codebook"]
    if bridge is not None and (ema_update or not learnable):
        raise ValueError("vq_bridge needs learnable_codebook=True and ema_update=False (the codes learn through it)")
    if reparam and (straight_through or rotation):
        raise ValueError("directional_reparam excludes rotation_trick and straight_through (one gradient path)")
    if reparam and a["threshold_ema_dead_code"] <= 0:
        raise ValueError("directional_reparam needs dead-code replacement (threshold_ema_dead_code > 0), as "
                         "1.32.0 requires")
    if ema_update and learnable:
        raise ValueError("learnable_codebook=True needs ema_update=False (the EMA would overwrite learned codes)")
    if a["accept_image_fmap"] and a["accept_3d_fmap"]:
        raise ValueError("accept_image_fmap and accept_3d_fmap exclude each other (accept_3d_fmap is for "
                         "(batch, dim, depth, height, width) input)")
    if a["sync_update_v"] > 0 and not learnable:
        raise ValueError("sync_update_v > 0 needs learnable_codebook=True")
    if rotation and straight_through:
        raise ValueError("rotation_trick=True and straight_through=True exclude each other (rotation_trick is a "
                         "gradient through the nearest code, straight_through one through sampled codes)")
    if rotation is None:
        rotation = default_for(release, "VectorQuantize", "rotation_trick") and a["dim"] > 1 \
            and not straight_through and not reparam
    latest = functools.partial(behaves_as_latest, release, "VectorQuantize")
    a.update(
        codebook_dim=a["dim"] if a["codebook_dim"] is None else a["codebook_dim"],
        directional_reparam=bool(reparam),
        directional_reparam_variance=float(a["directional_reparam_variance"]),
        commitment_weight=0.0 if reparam else a["commitment_weight"],  # DiVeQ has no commitment loss
        rotation_trick=bool(rotation),
        sync_codebook=D.is_distributed() if a["sync_codebook"] is None else a["sync_codebook"],
        masked_indices_are_minus_one=latest("index of masked tokens"),
        scalar_loss=latest("shape of the loss"),
        feature_map_codes_channel_first=latest("get_codes_from_indices of feature maps"),
        return_zeros_for_masked_padding=bool(default_for(release, "VectorQuantize", "return_zeros_for_masked_padding",
                                                         a["return_zeros_for_masked_padding"])),
    )
    return a


def codebook_config(a: dict, release: str) -> CodebookConfig:
    """The codebook's config from ``checked_arguments``' result."""
    latest = functools.partial(behaves_as_latest, release, "VectorQuantize")
    return CodebookConfig(
        dim=a["codebook_dim"],
        num_codebooks=a["heads"] if a["separate_codebook_per_head"] else 1,
        use_ddp=a["sync_codebook"],
        learnable_codebook=a["orthogonal_reg_weight"] > 0 or a["learnable_codebook"],
        initial_cluster_size=default_for(release, "VectorQuantize", "initial cluster_size"),
        codes_from_kmeans_state=latest("codes after k-means init"),
        dead_codes_without_ema=latest("dead codes without EMA"),
        **{name: a[name] for name in _CODEBOOK_ARGUMENTS if name in a},
    )
