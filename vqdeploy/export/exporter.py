"""``export`` (a quantizer, alone or between a user's networks, to a bundle) and ``verify`` (a bundle's graphs
against PyTorch).  The graphs are built in ``graphs``, checked in ``checks``; ``bundle`` reads and writes the
files."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import config_to_json
from .audio import audio_entry
from .bundle import (DECODER_FILE, ENCODER_FILE, FORMAT, FORMAT_VERSION, FREQUENCIES_FILE, MANIFEST, WEIGHTS_FILE,
                     BundleError, load, quantizer_classes, read_manifest, value_info, write_manifest)
from .checks import VerifyReport, check_inputs, check_onnx_file, encoder_inputs, verify_graphs
from .folding import fold_code_transforms
from .graphs import (INDEX_DTYPES, DecoderGraph, EncoderGraph, default_example, dynamic_input_axes,
                     dynamic_output_axes, has_decoder, is_residual)

DEFAULT_OPSET = 20


@dataclass
class ExportResult:
    path: Path
    manifest: dict
    report: VerifyReport | None


def export(quantizer: torch.nn.Module, path: str | Path, *, encoder: torch.nn.Module | None = None,
           decoder: torch.nn.Module | None = None, example: torch.Tensor | None = None,
           dynamic_axes: list[int] | None = None, index_dtype: str = "int64", num_quantizers: int | None = None,
           opset: int = DEFAULT_OPSET, float16: bool = False, verify: bool = True, provider: str = "cpu",
           overwrite: bool = False, calibration: torch.Tensor | list[torch.Tensor] | None = None,
           audio: dict | None = None) -> ExportResult:
    """Write the bundle for ``quantizer`` (wrapped between ``encoder`` and ``decoder`` when given) to ``path``.

    example: an encoder input (required with a user ``encoder``; batch >= 2); dynamic_axes: the example's
    dynamic axes (default: all but the features, or all but axis 1 with a user encoder); index_dtype: "int64"
    or "int32"; num_quantizers: residual bandwidth (encode and decode with the first k quantizers); float16:
    half-precision graphs (weights, inputs and outputs), whose agreement with the float32 PyTorch model is
    reported rather than required.
    calibration: encoder inputs (a tensor or a list) whose per-layer code frequencies the bundle stores for
    entropy-coded code streams (``vqdeploy.codestream``); audio: ``{"sample_rate": ..., "channels": ...}`` for a
    codec wrapping waveform networks (example: (batch, channels, samples)); the encoder's stride and both
    networks' receptive fields are measured and recorded for chunked processing of long inputs.
    A ``vqdeploy.Sequential`` may stand for the quantizer: its modules before and after the quantizer become the
    encoder and decoder networks.
    Raises ``ExportParityError`` when onnxruntime disagrees with PyTorch (the bundle is left for inspection)."""
    quantizer, encoder, decoder = _unwrap_sequential(quantizer, encoder, decoder)
    quantizer, encoder, decoder = _frozen_copies(quantizer, encoder, decoder)
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {list(INDEX_DTYPES)}, got {index_dtype!r}")
    if decoder is not None and not has_decoder(quantizer):
        raise ValueError(f"{type(quantizer).__name__} has no decoder graph to wrap a decoder network around")
    if example is None:
        if encoder is not None:
            raise ValueError("example is required with an encoder network (an input it accepts, batch >= 2)")
        example = default_example(quantizer)
    if not isinstance(example, torch.Tensor) or not example.dtype.is_floating_point:
        raise TypeError(f"example must be a floating-point torch.Tensor, got {example!r:.80}")
    if example.shape[0] < 2:
        raise ValueError("example needs a batch of at least 2 (torch.export fixes axes of size 1)")
    example = example.detach().float()
    encoder_graph = EncoderGraph(quantizer, encoder, INDEX_DTYPES[index_dtype], num_quantizers)
    input_axes = dynamic_input_axes(quantizer, example, encoder is not None, dynamic_axes)
    with torch.no_grad():
        example_indices = encoder_graph(example)
    index_axes = dynamic_output_axes(encoder_graph, example, input_axes)
    manifest = _manifest(quantizer, index_dtype, num_quantizers, opset)
    if audio is not None:
        manifest["audio"] = _audio_entry(audio, quantizer, encoder, decoder, example, example_indices, num_quantizers)
    frequencies = None
    if calibration is not None:
        frequencies = _code_frequencies(encoder_graph, calibration, example, input_axes, example_indices, index_axes,
                                        manifest)
    if frequencies is not None or audio is not None:
        manifest["format_version"] = FORMAT_VERSION
    directory = _fresh_directory(Path(path), overwrite)  # only now: a call that fails above changes no file
    manifest.update(wrapped=encoder is not None or decoder is not None, encoder_network=encoder is not None,
                    decoder_network=decoder is not None)
    manifest["float16"] = float16
    # the exported modules: these float32 ones, or half copies (the float32 ones stay the parity reference)
    exported = [copy.deepcopy(m).half() if float16 and m is not None else m for m in (quantizer, encoder, decoder)]
    manifest["encoder"] = _export_graph(EncoderGraph(exported[0], exported[1], INDEX_DTYPES[index_dtype],
                                                     num_quantizers),
                                        example.half() if float16 else example, input_axes, directory / ENCODER_FILE,
                                        opset, "inputs", "indices")
    decoder_graph = None
    if has_decoder(quantizer):
        decoder_graph = DecoderGraph(quantizer, decoder, num_quantizers)
        manifest["decoder"] = _export_graph(DecoderGraph(exported[0], exported[2], num_quantizers), example_indices,
                                            index_axes, directory / DECODER_FILE, opset, "indices", "outputs")

    from safetensors.torch import save_model

    save_model(quantizer, str(directory / WEIGHTS_FILE))
    manifest["files"] = [ENCODER_FILE, WEIGHTS_FILE] + ([DECODER_FILE] if decoder_graph is not None else [])
    if frequencies is not None:
        from ..codestream.entropy import save_frequencies

        save_frequencies(frequencies, directory / FREQUENCIES_FILE)
        manifest["files"].append(FREQUENCIES_FILE)
    write_manifest(directory, manifest)
    for name in manifest["files"]:
        if name.endswith(".onnx"):
            check_onnx_file(directory / name)
    report = None
    if verify:
        report = verify_graphs(directory, manifest, encoder_graph, decoder_graph, provider)
        report.raise_if_failed()
    return ExportResult(directory, manifest, report)


def verify(path: str | Path, *, encoder: torch.nn.Module | None = None, decoder: torch.nn.Module | None = None,
           provider: str = "cpu", seed: int = 0,
           inputs: torch.Tensor | list[torch.Tensor] | None = None) -> VerifyReport:
    """Check a bundle's graphs with onnxruntime against PyTorch: against the quantizer rebuilt from the bundle,
    and the user's networks for a wrapped bundle (which the bundle does not hold).  ``inputs``: your own encoder
    inputs (a tensor or a list, shaped like the export example on its fixed axes) instead of seeded random ones.
    Returns the report; raises ``ExportParityError`` on a real disagreement (near-ties are reported)."""
    directory = Path(path)
    manifest = read_manifest(directory)
    if inputs is not None:
        inputs = check_inputs(inputs, manifest)
    for graph, network in (("encoder", encoder), ("decoder", decoder)):
        if manifest[f"{graph}_network"] and network is None:
            raise ValueError(f"this bundle's {graph} graph holds a user network: pass the {graph} module to verify it")
    quantizer, encoder, decoder = _frozen_copies(load(directory), encoder, decoder)
    for name in manifest["files"]:
        if name.endswith(".onnx"):
            check_onnx_file(directory / name)
    num_quantizers = manifest["num_quantizers"]
    encoder_graph = EncoderGraph(quantizer, encoder, INDEX_DTYPES[manifest["index_dtype"]], num_quantizers)
    decoder_graph = DecoderGraph(quantizer, decoder, num_quantizers) if "decoder" in manifest else None
    report = verify_graphs(directory, manifest, encoder_graph, decoder_graph, provider, seed, inputs)
    report.raise_if_failed()
    return report


def _unwrap_sequential(quantizer, encoder, decoder):
    """A ``vqdeploy.Sequential`` -> (its quantizer, the modules before it, the modules after it)."""
    from ..sequential import Sequential

    quantizer = getattr(quantizer, "_orig_mod", quantizer)
    if not isinstance(quantizer, Sequential):
        return quantizer, encoder, decoder
    if encoder is not None or decoder is not None:
        raise ValueError("a Sequential brings its own networks: pass encoder/decoder only with a bare quantizer")
    before, after = quantizer.before, quantizer.after
    return quantizer.quantizer, (before if len(before) else None), (after if len(after) else None)


def _frozen_copies(quantizer, encoder, decoder):
    """Eval-mode copies without gradients, so that exporting leaves the caller's modules untouched
    (a torch.compile'd module is unwrapped to the module it compiles)."""
    quantizer, encoder, decoder = (getattr(m, "_orig_mod", m) for m in (quantizer, encoder, decoder))
    if type(quantizer) not in quantizer_classes().values():
        raise TypeError(f"expected a vqdeploy quantizer ({', '.join(quantizer_classes())}), "
                        f"got {type(quantizer).__name__}")
    copies = []
    for module in (quantizer, encoder, decoder):
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
        module = None if module is None else copy.deepcopy(module).cpu().float().eval().requires_grad_(False)
        if module is not None:
            fold_code_transforms(module)
        copies.append(module)
    return copies


BUNDLE_FILES = (MANIFEST, ENCODER_FILE, DECODER_FILE, WEIGHTS_FILE, FREQUENCIES_FILE)


def _audio_entry(audio: dict, quantizer, encoder, decoder, example, example_indices, num_quantizers) -> dict:
    if not isinstance(audio, dict) or set(audio) - {"sample_rate", "channels"} or "sample_rate" not in audio:
        raise ValueError(f"audio must be a dict of sample_rate and channels, got {audio!r}")
    features = None
    if decoder is not None:
        with torch.no_grad():
            features = DecoderGraph(quantizer, None, num_quantizers)(example_indices)
    return audio_entry(audio["sample_rate"], audio.get("channels", example.shape[1]), encoder, decoder, example,
                       features)


def _code_frequencies(encoder_graph, calibration, example, input_axes, example_indices, index_axes, manifest):
    """Per-layer code counts of the calibration inputs, encoded by the PyTorch encoder graph."""
    from ..codestream.entropy import measure_frequencies
    from ..codestream.layout import CodeLayout

    layout = CodeLayout.from_indices(example_indices.shape, index_axes, manifest["codebook_sizes"],
                                     manifest["codebook_size"])
    inputs = encoder_inputs(calibration, example.shape, input_axes, "calibration inputs")
    if not inputs:
        raise ValueError("calibration needs at least one input tensor")
    with torch.no_grad():
        return measure_frequencies([encoder_graph(tensor) for tensor in inputs], layout)


def _fresh_directory(directory: Path, overwrite: bool) -> Path:
    """An empty directory, or an old bundle whose files are removed (with ``overwrite``).  A directory holding
    anything but bundle files is never touched."""
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty (pass overwrite=True to replace a bundle)")
        others = sorted(p.name for p in directory.iterdir() if p.name not in BUNDLE_FILES or not p.is_file())
        try:
            read_manifest(directory, check_files=False)
        except BundleError:
            others = others or [MANIFEST]
        if others:
            raise FileExistsError(f"{directory} is not a vqdeploy bundle (it holds {others[:5]}); refusing to "
                                  "overwrite it")
        for name in BUNDLE_FILES:
            (directory / name).unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _manifest(quantizer, index_dtype: str, num_quantizers: int | None, opset: int) -> dict:
    import onnx
    import onnxscript

    import vqdeploy

    config, dropped = config_to_json(quantizer.init_config)
    json.dumps(config)  # a config that cannot be written fails here, before any file is
    return {
        "format": FORMAT, "format_version": 1,  # 1 until the bundle holds what version 2 added
        "class": type(quantizer).__name__, "config": config, "dropped_training_arguments": dropped,
        "index_dtype": index_dtype, "num_quantizers": num_quantizers,
        "codebook_size": quantizer.codebook_size,
        "codebook_sizes": list(quantizer.codebook_sizes) if is_residual(quantizer) else None, "dropped_index": -1 if is_residual(quantizer) else None,
        "opset": opset,
        "versions": {"vqdeploy": vqdeploy.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxscript": onnxscript.__version__},
    }


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs a line per torchvision op when torchvision is absent (vqdeploy uses none) and
    torch.export warns that its own LeafSpec check is deprecated: noise to a user, silenced here only."""
    notice_filter = _NoTorchvisionNotice()
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(notice_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        registration.removeFilter(notice_filter)


def _export_graph(graph: torch.nn.Module, example: torch.Tensor, axes: list[int], path: Path, opset: int,
                  input_name: str, output_name: str) -> dict:
    """torch.onnx.export(dynamo=True) of one graph; returns its manifest entry."""
    import onnx

    dynamic_shapes = ({axis: torch.export.Dim.AUTO for axis in axes},)
    with _quiet_exporter():
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=dynamic_shapes,
                                    opset_version=opset, input_names=[input_name], output_names=[output_name],
                                    verbose=False)
    program.save(str(path))
    model = onnx.load(str(path), load_external_data=False)
    return {"file": path.name, "example_shape": list(example.shape), "dynamic_axes": axes,
            "input": value_info(model.graph.input[0]), "output": value_info(model.graph.output[0])}
