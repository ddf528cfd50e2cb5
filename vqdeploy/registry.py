"""The quantizer classes: one entry each, the one place where a class is registered (ground floor).

The package's lazy exports, the classes a bundle may name (``bundle_format``), where a class's ``**kwargs`` go
(``export.consistency``), its graphs' index layout (``export.graphs``), its near-tie rule (``export.ties``) and the
names ``vqdeploy.substitute`` stands in for all read this table.  It imports no quantizer module (the command line
and bundle reading stay light): ``load_class`` imports one on use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class QuantizerClass:
    """``family``: how export handles the class, None for one that bundles do not hold: "vq" (a codebook lookup
    per head), "grid" (a GridQuantizer), "residual" (a ResidualQuantizer: indices (b, *tokens, layers), -1 for a
    dropped layer), "grouped" (a GroupedResidualQuantizer: (groups, b, *tokens, layers)), "projection"
    (RandomProjectionQuantizer: fixed projections onto a VectorQuantize, no decoder), "hierarchical"
    (HierarchicalVQ: every level's map in one token sequence)."""

    name: str                        # the public name: vqdeploy.<name>
    module: str                      # the module that defines it
    reference: str | None            # the vector_quantize_pytorch submodule defining the same name (substitute)
    family: str | None = None
    kwargs_go_to: str | None = None  # the class whose constructor its **kwargs reach (checked in bundles)
    decision: str | None = None      # what one layer of it decides, for export.ties's near-ties (layer classes)


CLASSES = (
    QuantizerClass("VectorQuantize", "vqdeploy.vector_quantize", "vector_quantize_pytorch", "vq", None, "vq_code"),
    QuantizerClass("ResidualVQ", "vqdeploy.residual_vq", "residual_vq", "residual", "VectorQuantize"),
    QuantizerClass("GroupedResidualVQ", "vqdeploy.residual_vq", "residual_vq", "grouped", "ResidualVQ"),
    QuantizerClass("RandomProjectionQuantizer", "vqdeploy.random_projection", "random_projection_quantizer",
                   "projection", "VectorQuantize"),
    QuantizerClass("FSQ", "vqdeploy.fsq", "finite_scalar_quantization", "grid", None, "fsq_level"),
    QuantizerClass("ResidualFSQ", "vqdeploy.residual_fsq", "residual_fsq", "residual", "FSQ"),
    QuantizerClass("GroupedResidualFSQ", "vqdeploy.residual_fsq", "residual_fsq", "grouped", "ResidualFSQ"),
    QuantizerClass("LFQ", "vqdeploy.lfq", "lookup_free_quantization", "grid", None, "lfq_sign"),
    QuantizerClass("ResidualLFQ", "vqdeploy.residual_lfq", "residual_lfq", "residual", "LFQ"),
    QuantizerClass("GroupedResidualLFQ", "vqdeploy.residual_lfq", "residual_lfq", "grouped", "ResidualLFQ"),
    QuantizerClass("LatentQuantize", "vqdeploy.latent_quantize", "latent_quantization", "grid", None, "latent_value"),
    QuantizerClass("SimVQ", "vqdeploy.sim_vq", "sim_vq", "vq", None, "sim_code"),
    QuantizerClass("ResidualSimVQ", "vqdeploy.sim_vq", "residual_sim_vq", "residual"),
    QuantizerClass("HierarchicalVQ", "vqdeploy.hierarchical_vq", "hierarchical_vq", "hierarchical"),
    QuantizerClass("FSP", "vqdeploy.fsp", "finite_scalar_perturbation", "grid", None, "fsp_bin"),
    QuantizerClass("EvoLFQ", "vqdeploy.evo_lfq", "evo_lookup_free_quantization"),
    QuantizerClass("BinaryMapper", "vqdeploy.binary_mapper", "binary_mapper"),
    QuantizerClass("Sequential", "vqdeploy.sequential", "utils"),
)
BY_NAME = {entry.name: entry for entry in CLASSES}
EXPORTED = tuple(entry.name for entry in CLASSES if entry.family is not None)  # the classes a bundle may name


def load_class(name: str) -> type:
    """The class of a registered name (imports its module, and torch)."""
    return getattr(importlib.import_module(BY_NAME[name].module), name)


def entry_of(module: object) -> QuantizerClass | None:
    """The entry of a module's class, or of the nearest registered class it derives from (None: unregistered)."""
    for cls in type(module).__mro__:
        entry = BY_NAME.get(cls.__name__)
        if entry is not None and entry.module == cls.__module__:
            return entry
    return None


def family_of(module: object) -> str | None:
    entry = entry_of(module)
    return None if entry is None else entry.family
