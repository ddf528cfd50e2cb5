"""vqdeploy: vector quantizers that train as one compiled graph and export to ONNX.

Importing the package is cheap: every public name is imported from its submodule on first use (PEP 562), so
``import vqdeploy`` (and the ``vqdeploy`` command's ``--help`` and ``info``) loads neither torch nor onnx;
``from vqdeploy import ResidualVQ`` and ``vqdeploy.ResidualVQ`` import what they name.
"""

from __future__ import annotations

import importlib
import importlib.util

from .registry import CLASSES as _CLASSES

__version__ = "0.1.0"

# submodule -> the public names it defines besides the quantizer classes (those come from the registry)
_SUBMODULE_NAMES = {
    "binary_mapper": ("BinaryMapperOutput", "BinaryMapperOutputWithIndices"),
    "codebooks": ("Codebook", "CodebookConfig"),
    "defaults": ("active_defaults", "use_defaults"),
    "fsq": ("FSQOutput",),
    "fsp": ("FSPOutput",),
    "latent_quantize": ("LatentQuantizeOutput",),
    "evo_lfq": ("EvoLFQOutput", "EvolutionResult"),
    "lfq": ("LFQOutput", "LossBreakdown"),
    "grouped": ("GroupedOutput", "GroupedOutputWithCodes", "GroupedResidualQuantizer"),
    "residual_fsq": ("ResidualFSQOutput", "ResidualFSQOutputWithCodes"),
    "residual": ("ResidualQuantizer",),
    "returns": ("QuantizeLossOutput", "QuantizeOutput", "ResidualOutput", "ResidualOutputWithCodes"),
    "vector_quantize": ("QuantizeOutputWithBreakdown", "VQLossBreakdown"),
}
_WHERE = {name: module for module, names in _SUBMODULE_NAMES.items() for name in names}
_WHERE.update({entry.name: entry.module.rpartition(".")[2] for entry in _CLASSES})


def load(bundle, max_derived_bytes: int | None = None):
    """Rebuild the PyTorch quantizer of an export bundle (see ``vqdeploy.export``): JSON and safetensors only,
    after its config is checked against its weights and graphs."""
    from .export.bundle import load as load_bundle

    return load_bundle(bundle, max_derived_bytes)


def __getattr__(name: str):
    """Import a public name's submodule on first use (and a submodule itself, as an eager import made it an
    attribute of the package before)."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["load", *_WHERE]
