"""Export a vqdeploy quantizer, alone or between a user's encoder and decoder networks, to an ONNX bundle.

    from vqdeploy.export import export, verify
    result = export(quantizer, "bundle/")                      # encoder.onnx, decoder.onnx, weights, manifest
    result = export(quantizer, "codec/", encoder=net_in, decoder=net_out, example=waveform)
    print(result.report.table())

Codebooks and projections become constants of the graphs; batch, sequence and
spatial axes stay dynamic.  Every export is checked: onnx.checker (full check),
standard ops only, and onnxruntime against PyTorch on fresh inputs of other shapes.
"""

from .bundle import BundleError, load, read_manifest
from .checks import FLOAT32_ATOL, ExportParityError, VerifyReport
from .exporter import DEFAULT_OPSET, ExportResult, export, verify
from .ties import NEAR_TIE_RTOL

__all__ = ["export", "verify", "load", "read_manifest", "ExportResult", "VerifyReport", "BundleError",
           "ExportParityError", "FLOAT32_ATOL", "NEAR_TIE_RTOL", "DEFAULT_OPSET"]
