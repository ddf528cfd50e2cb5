"""Whose defaults a quantizer takes: vector-quantize-pytorch 1.32.0's, or 1.14.17's for models trained with it.

A checkpoint does not record which release's defaults trained it, and some defaults changed between the two
(1.18.0 turned the rotation trick on; 1.18.2 dropped LFQ's commitment weight, whose 0.25 collapses code usage),
so the choice is explicit.  1.32.0's defaults apply unless a program asks otherwise:

- for one module: ``VectorQuantize(..., defaults="1.14.17")`` (VectorQuantize, LFQ and FSQ take ``defaults``, and the
  residual, grouped and random-projection classes built on them pass it to their layers);
- for a whole program: ``vqdeploy.use_defaults("1.14.17")`` before building modules, or the environment
  variable ``VQDEPLOY_DEFAULTS=1.14.17``;
- for a block: ``with vqdeploy.use_defaults("1.14.17"): ...`` (the previous choice returns on exit).

An argument whose default differs is ``None`` in the signature and resolved here; an explicit value always
wins.  ``DIFFERING_DEFAULTS`` is the one table of these differences; the README's table is written from it.
"""

from __future__ import annotations

import os

RELEASES = ("1.14.17", "1.32.0")
LATEST = "1.32.0"
ENVIRONMENT_VARIABLE = "VQDEPLOY_DEFAULTS"

# (class, argument or behaviour) -> value per release, and the release that changed it
DIFFERING_DEFAULTS: dict[tuple[str, str], dict[str, object]] = {
    ("VectorQuantize", "rotation_trick"): {"1.14.17": False, "1.32.0": True, "changed in": "1.18.0",
                                           "note": "True only when dim > 1 and straight_through is off"},
    ("VectorQuantize", "return_zeros_for_masked_padding"): {"1.14.17": False, "1.32.0": True, "changed in": "1.15.5",
                                                            "note": "masked tokens output 0, not their input"},
    ("VectorQuantize", "initial cluster_size"): {"1.14.17": 0.0, "1.32.0": 1.0, "changed in": "1.15.3",
                                                 "note": "the EMA code counts of a new codebook (not an argument)"},
    ("VectorQuantize", "index of masked tokens"): {"1.14.17": "nearest code", "1.32.0": -1, "changed in": None,
                                                   "note": "what forward returns for tokens a mask leaves out"},
    ("VectorQuantize", "shape of the loss"): {"1.14.17": "(1,)", "1.32.0": "()", "changed in": None,
                                              "note": "ResidualVQ's losses (1, q) -> (q,), GroupedResidualVQ's "
                                                      "(g, 1, q) -> (g, q)"},
    ("VectorQuantize", "codes after k-means init"): {"1.14.17": "the cluster means",
                                                     "1.32.0": "recomputed from the EMA state", "changed in": None,
                                                     "note": "smoothed counts; a cluster that got no rows becomes "
                                                             "a zero vector"},
    ("VectorQuantize", "dead codes without EMA"): {"1.14.17": "never replaced", "1.32.0": "replaced",
                                                  "changed in": None,
                                                  "note": "ema_update=False with threshold_ema_dead_code > 0: code "
                                                          "counts are tracked and dead codes replaced (DiVeQ needs it)"},
    ("VectorQuantize", "get_codes_from_indices of feature maps"): {
        "1.14.17": "channel-last", "1.32.0": "channel-first", "changed in": None,
        "note": "with accept_image_fmap / accept_3d_fmap, codes and outputs from indices come (b, dim, *spatial)"},
    ("ResidualVQ", "updates of a shared codebook"): {"1.14.17": "each layer moves the codes",
                                                     "1.32.0": "once, after the last layer", "changed in": "1.17.5",
                                                     "note": "layers track counts and sums (manual_ema_update); "
                                                             "dead codes are then replaced from every layer's rows"},
    ("FSQ", "levels of 2"): {"1.14.17": "allowed", "1.32.0": "need preserve_symmetry", "changed in": "1.27.15",
                             "note": "a level count of 2 has no centre level; 1.32.0 asks for the symmetric bound"},
    ("ResidualFSQ", "bound_hard_clamp"): {"1.14.17": False, "1.32.0": True, "changed in": "1.26.0",
                                         "note": "a tanh clamp of the input to 1 + 1/(levels - 1), then hard clamps "
                                                 "(1.14.17 has no such argument)"},
    ("ResidualFSQ", "layer levels and scales"): {"1.14.17": "input bounded once, layer i scaled (levels - 1)^-i",
                                                "1.32.0": "symmetric levels, layer i scaled levels^-i",
                                                "changed in": "1.26.0",
                                                "note": "every layer has preserve_symmetry"},
    ("LatentQuantize", "layout of (b, x, y) input"): {"1.14.17": "(b, n, dim)", "1.32.0": "(b, dim, n)",
                                                      "changed in": None,
                                                      "note": "1.32.0 reads every input channel-first; outputs and "
                                                              "indices_to_codes follow"},
    ("LatentQuantize", "values of equal levels"): {"1.14.17": "one tensor values_per_latent",
                                                   "1.32.0": "a ParameterList values_per_latent.i",
                                                   "changed in": "1.14.23",
                                                   "note": "checkpoints of either form load into either"},
    ("LFQ", "commitment_loss_weight"): {"1.14.17": 0.25, "1.32.0": 0.0, "changed in": "1.18.2",
                                        "note": "0.25 collapses code usage of small LFQ models"},
    ("ResidualLFQ", "soft_clamp_input_value of layer i"): {"1.14.17": "v", "1.32.0": "v * 2^-i",
                                                           "changed in": "1.14.22",
                                                           "note": "the clamp shrinks with the layers' codes"},
}


def _checked(release, what: str) -> str:
    if release not in RELEASES:
        raise ValueError(f"{what} must be one of {', '.join(repr(r) for r in RELEASES)} (the vector-quantize-pytorch "
                         f"release whose defaults to use), got {release!r}")
    return release


_active = _checked(os.environ.get(ENVIRONMENT_VARIABLE, LATEST), f"the environment variable {ENVIRONMENT_VARIABLE}")


class use_defaults:  # noqa: N801 (used like a function, as torch.set_grad_enabled)
    """Make ``release``'s defaults the program's: now, or inside a ``with`` block."""

    def __init__(self, release: str):
        global _active
        self.previous, _active = _active, _checked(release, "use_defaults(release)")

    def __enter__(self) -> str:
        return _active

    def __exit__(self, *exc_info) -> None:
        global _active
        _active = self.previous


def active_defaults() -> str:
    """The release whose defaults modules built now take."""
    return _active


def release_for(defaults: str | None) -> str:
    """A module's ``defaults`` argument -> the release it follows (None: the program's choice)."""
    return _active if defaults is None else _checked(defaults, "defaults")


def default_for(release: str, cls: str, argument: str, value=None):
    """``value`` if given, else ``release``'s default of ``cls``'s ``argument``."""
    return DIFFERING_DEFAULTS[(cls, argument)][release] if value is None else value


def behaves_as_latest(release: str, cls: str, behaviour: str) -> bool:
    """Whether ``release`` has 1.32.0's ``behaviour`` (a row of the table that is no argument)."""
    row = DIFFERING_DEFAULTS[(cls, behaviour)]
    return row[release] == row[LATEST]


def markdown_table() -> str:
    """``DIFFERING_DEFAULTS`` as the README shows it (a test keeps the two equal)."""
    lines = ["| class | argument or behaviour | 1.14.17 | 1.32.0 (vqdeploy's default) | changed in | note |",
             "|---|---|---|---|---|---|"]
    for (cls, name), row in DIFFERING_DEFAULTS.items():
        shown = f"`{name}`" if name.isidentifier() else name
        lines.append(f"| {cls} | {shown} | {row['1.14.17']} | {row['1.32.0']} | {row['changed in'] or 'after 1.14.17'} "
                     f"| {row['note']} |")
    return "\n".join(lines)
