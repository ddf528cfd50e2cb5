"""vqdeploy: vector quantizers that train as one compiled graph and export to ONNX.

Importing the package is cheap: onnx and onnxruntime are only imported by the
export and runtime modules.
"""

from .binary_mapper import BinaryMapper, BinaryMapperOutput, BinaryMapperOutputWithIndices
from .codebooks import Codebook, CodebookConfig
from .defaults import active_defaults, use_defaults
from .fsq import FSQ, FSQOutput
from .fsp import FSP, FSPOutput
from .latent_quantize import LatentQuantize, LatentQuantizeOutput
from .evo_lfq import EvoLFQ, EvoLFQOutput, EvolutionResult
from .lfq import LFQ, LFQOutput, LossBreakdown
from .grouped import GroupedOutput, GroupedOutputWithCodes, GroupedResidualQuantizer
from .random_projection import RandomProjectionQuantizer
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ, ResidualFSQOutput, ResidualFSQOutputWithCodes
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual import ResidualOutput, ResidualOutputWithCodes, ResidualQuantizer
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .hierarchical_vq import HierarchicalVQ
from .sequential import Sequential
from .sim_vq import ResidualSimVQ, SimVQ
from .vector_quantize import (QuantizeLossOutput, QuantizeOutput, QuantizeOutputWithBreakdown, VectorQuantize,
                              VQLossBreakdown)

__version__ = "0.1.0"


def load(bundle, max_derived_bytes: int | None = None):
    """Rebuild the PyTorch quantizer of an export bundle (see ``vqdeploy.export``): JSON and safetensors only,
    after its config is checked against its weights and graphs."""
    from .export.bundle import load as load_bundle

    return load_bundle(bundle, max_derived_bytes)


__all__ = [
    "load", "use_defaults", "active_defaults", "VectorQuantize", "QuantizeOutput", "QuantizeLossOutput",
    "QuantizeOutputWithBreakdown", "VQLossBreakdown", "Codebook", "CodebookConfig",
    "ResidualVQ", "GroupedResidualVQ", "RandomProjectionQuantizer", "FSQ", "FSQOutput", "FSP", "FSPOutput",
    "BinaryMapper", "BinaryMapperOutput", "BinaryMapperOutputWithIndices",
    "ResidualFSQ", "GroupedResidualFSQ", "ResidualFSQOutput", "ResidualFSQOutputWithCodes",
    "LFQ", "LFQOutput", "LossBreakdown", "LatentQuantize", "LatentQuantizeOutput", "ResidualLFQ", "GroupedResidualLFQ",
    "EvoLFQ", "EvoLFQOutput", "EvolutionResult",
    "ResidualQuantizer", "GroupedResidualQuantizer", "SimVQ", "ResidualSimVQ", "Sequential", "HierarchicalVQ",
    "ResidualOutput", "ResidualOutputWithCodes", "GroupedOutput", "GroupedOutputWithCodes",
]
