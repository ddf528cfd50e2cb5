"""Export a vqdeploy quantizer, alone or between a user's encoder and decoder networks, to an ONNX bundle.

    from vqdeploy.export import export, verify
    result = export(quantizer, "bundle/")                      # encoder.onnx, decoder.onnx, weights, manifest
    result = export(quantizer, "codec/", encoder=net_in, decoder=net_out, example=waveform)
    print(result.report.table())

Codebooks and projections become constants of the graphs; batch, sequence and
spatial axes stay dynamic.  Every export is checked: onnx.checker (full check),
standard ops only, and onnxruntime against PyTorch on fresh inputs of other shapes.

Names are imported from their submodules on first use, so reading a manifest (``vqdeploy.export.bundle``)
loads no torch.
"""

from __future__ import annotations

import importlib

_SUBMODULE_NAMES = {
    "bundle": ("BundleError", "load", "read_manifest"),
    "checks": ("FLOAT32_ATOL", "ExportParityError", "VerifyReport"),
    "exporter": ("DEFAULT_OPSET", "ExportResult", "export", "verify"),
    "ties": ("NEAR_TIE_RTOL",),
}
_WHERE = {name: module for module, names in _SUBMODULE_NAMES.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = ["export", "verify", "load", "read_manifest", "ExportResult", "VerifyReport", "BundleError",
           "ExportParityError", "FLOAT32_ATOL", "NEAR_TIE_RTOL", "DEFAULT_OPSET"]
