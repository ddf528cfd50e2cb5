"""Rebuild the PyTorch quantizer of a bundle (its format: ``vqdeploy.bundle_format``); nothing is unpickled."""

from __future__ import annotations

from pathlib import Path

from ..bundle_format import (MANIFEST, REFERENCE_FILE, WEIGHTS_FILE, BundleError, build_quantizer,  # noqa: F401
                             quantizer_classes, read_manifest, write_manifest)


def load(directory: str | Path, max_derived_bytes: int | None = None) -> torch.nn.Module:
    """Rebuild the PyTorch quantizer of a bundle (in eval mode) from its manifest and safetensors weights.
    User networks exported around it live only in the ONNX graphs.  The config is checked against the
    weights and graphs first (``consistency``); ``max_derived_bytes`` bounds what it may build beyond the
    weights (None: ``consistency.MAX_DERIVED_BYTES``, 2 GiB)."""
    from safetensors.torch import load_model

    from .consistency import check_bundle

    directory = Path(directory)
    manifest = read_manifest(directory)
    check_bundle(directory, manifest, max_derived_bytes)
    quantizer = build_quantizer(manifest)
    missing, unexpected = load_model(quantizer, str(directory / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise BundleError(f"{directory / WEIGHTS_FILE} does not fit {manifest['class']}: missing {sorted(missing)}, "
                          f"unexpected {sorted(unexpected)}")
    return quantizer.eval()
