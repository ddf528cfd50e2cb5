"""``export`` (a quantizer, alone or between a user's networks, to a bundle) and ``verify`` (a bundle's graphs
against PyTorch).  The graphs are built in ``graphs``, checked in ``checks``; ``bundle`` reads and writes the
files."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bundle_format import (DECODER_FILE, ENCODER_FILE, FORMAT, FREQUENCIES_FILE, MANIFEST, REFERENCE_FILE,
                             WEIGHTS_FILE, BundleError, quantizer_classes, read_manifest, write_manifest)
from ..config import config_to_json
from .audio_fields import audio_entry
from .bundle import load
from .checks import (MAX_REFERENCE_BYTES, VerifyReport, check_inputs, check_onnx_file, encoder_inputs,
                     load_reference, record_reference, verify_graphs, verify_recorded)
from .folding import fold_code_transforms
from .graphs import (INDEX_DTYPES, DecoderGraph, EncoderGraph, default_example, dynamic_input_axes,
                     dynamic_output_axes, has_decoder, is_residual, value_info)

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
    encoder and decoder networks; with networks, what PyTorch gives on one seeded input of the example's shape
    (batch 1) is recorded in the bundle (``reference_outputs.safetensors``) so that ``verify`` can check it without them.
    The bundle is written into a directory beside ``path`` and renamed into place when complete: a failed export
    leaves no file behind, and an old bundle (``overwrite``) is replaced only by a complete one.
    Raises ``ExportParityError`` when onnxruntime disagrees with PyTorch; the bundle is left for inspection at
    ``path``, or beside it when that holds an old bundle (which is then kept), as the error says."""
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
    decoder_graph = DecoderGraph(quantizer, decoder, num_quantizers) if has_decoder(quantizer) else None
    reference = None
    if encoder is not None or decoder is not None:  # networks the bundle will not hold as PyTorch code
        reference = _reference(encoder_graph, decoder_graph, example)
    if reference is not None:  # the lowest format version that describes what the bundle holds
        manifest["format_version"] = 3
    elif frequencies is not None or audio is not None:
        manifest["format_version"] = 2
    check_target(Path(path), overwrite)  # only now: a call that fails above changes no file
    target = Path(os.path.realpath(path))  # a symbolic link's directory is replaced, not the link
    manifest.update(wrapped=encoder is not None or decoder is not None, encoder_network=encoder is not None,
                    decoder_network=decoder is not None)
    manifest["float16"] = float16
    staging = _staging_directory(target)
    try:
        _write_graphs(staging, manifest, (quantizer, encoder, decoder), example, example_indices, input_axes,
                      index_axes)
        _write_data(staging, manifest, quantizer, frequencies, reference)
        report = verify_graphs(staging, manifest, encoder_graph, decoder_graph, provider) if verify else None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if report is not None and not report.passed:
        kept = _holds_files(target)
        if not kept:
            _place(staging, target, overwrite)
        report.raise_if_failed(f" (the bundle is left for inspection in {staging if kept else target}"
                               + (f"; the bundle at {target} was kept)" if kept else ")"))
    _place(staging, target, overwrite)
    return ExportResult(Path(path), manifest, report)


def _reference(encoder_graph, decoder_graph, example: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """PyTorch's outputs on one input of the example's shape (batch 1), for ``verify`` without the networks;
    None, with a warning, when they would pass the size a bundle may hold."""
    record = record_reference(encoder_graph, decoder_graph, (1, *example.shape[1:]))
    size = sum(t.numel() * t.element_size() for t in record.values())
    if size > MAX_REFERENCE_BYTES:
        warnings.warn(f"not recording reference outputs: they take {size:,} bytes, more than a bundle may hold "
                      f"({MAX_REFERENCE_BYTES:,}); verify this bundle with its networks (a shorter example "
                      "records them)", RuntimeWarning, stacklevel=3)
        return None
    return record


def _write_graphs(directory: Path, manifest: dict, modules, example, example_indices, input_axes, index_axes) -> None:
    """encoder.onnx and decoder.onnx, from float32 modules or half copies of them (float16 bundles; the float32
    ones stay the parity reference); their entries go into the manifest."""
    float16 = manifest["float16"]
    quantizer, encoder, decoder = (copy.deepcopy(m).half() if float16 and m is not None else m for m in modules)
    num_quantizers, opset = manifest["num_quantizers"], manifest["opset"]
    manifest["encoder"] = _export_graph(EncoderGraph(quantizer, encoder, INDEX_DTYPES[manifest["index_dtype"]],
                                                     num_quantizers),
                                        example.half() if float16 else example, input_axes, directory / ENCODER_FILE,
                                        opset, "inputs", "indices")
    if has_decoder(quantizer):
        manifest["decoder"] = _export_graph(DecoderGraph(quantizer, decoder, num_quantizers), example_indices,
                                            index_axes, directory / DECODER_FILE, opset, "indices", "outputs")


def _write_data(directory: Path, manifest: dict, quantizer, frequencies, reference) -> None:
    """The weights, the optional code frequencies and reference outputs, the manifest hashing them all; every
    file then checked (ONNX) and given the mode a new file gets (0666 less the umask)."""
    from safetensors.torch import save_file, save_model

    save_model(quantizer, str(directory / WEIGHTS_FILE))
    manifest["files"] = [ENCODER_FILE, WEIGHTS_FILE] + ([DECODER_FILE] if "decoder" in manifest else [])
    if frequencies is not None:
        from ..codestream.entropy import save_frequencies

        save_frequencies(frequencies, directory / FREQUENCIES_FILE)
        manifest["files"].append(FREQUENCIES_FILE)
    if reference is not None:
        save_file(reference, str(directory / REFERENCE_FILE))
        manifest["files"].append(REFERENCE_FILE)
    write_manifest(directory, manifest)
    _check_onnx_files(directory, manifest)
    _set_modes(directory)


def verify(path: str | Path, *, encoder: torch.nn.Module | None = None, decoder: torch.nn.Module | None = None,
           provider: str = "cpu", seed: int = 0,
           inputs: torch.Tensor | list[torch.Tensor] | None = None) -> VerifyReport:
    """Check a bundle's graphs with onnxruntime against PyTorch: against the quantizer rebuilt from the bundle,
    and the user's networks for a wrapped bundle (which the bundle does not hold).  ``inputs``: your own encoder
    inputs (a tensor or a list, shaped like the export example on its fixed axes) instead of seeded random ones.
    Without the networks, a wrapped bundle is checked on the input recorded at export, against the outputs
    PyTorch gave then (bundles exported before vqdeploy recorded them need the networks).
    Returns the report; raises ``ExportParityError`` on a real disagreement (near-ties are reported)."""
    directory = Path(path)
    manifest = read_manifest(directory)
    if inputs is not None:
        inputs = check_inputs(inputs, manifest)
    networks = [graph for graph in ("encoder", "decoder") if manifest[f"{graph}_network"]]
    missing = [graph for graph, network in (("encoder", encoder), ("decoder", decoder))
               if graph in networks and network is None]
    if missing and missing == networks and inputs is None:
        return _verify_recorded(directory, manifest, provider)
    if missing:
        raise ValueError(f"this bundle's {missing[0]} graph holds a user network: pass the {missing[0]} module to "
                         "verify it")
    quantizer, encoder, decoder = _frozen_copies(load(directory), encoder, decoder)
    _check_onnx_files(directory, manifest)
    num_quantizers = manifest["num_quantizers"]
    encoder_graph = EncoderGraph(quantizer, encoder, INDEX_DTYPES[manifest["index_dtype"]], num_quantizers)
    decoder_graph = DecoderGraph(quantizer, decoder, num_quantizers) if "decoder" in manifest else None
    report = verify_graphs(directory, manifest, encoder_graph, decoder_graph, provider, seed, inputs)
    report.raise_if_failed()
    return report


def _verify_recorded(directory: Path, manifest: dict, provider: str) -> VerifyReport:
    """A wrapped bundle checked without its networks: onnxruntime on the recorded input against the recorded
    PyTorch outputs."""
    if REFERENCE_FILE not in manifest["files"]:
        networks = ", ".join(f"{graph}=..." for graph in ("encoder", "decoder") if manifest[f"{graph}_network"])
        raise ValueError(f"{directory}'s graphs hold user networks, which it does not hold as PyTorch code, and it "
                         f"records no reference outputs (it was exported before vqdeploy recorded them): verify it "
                         f"in Python with verify(bundle, {networks}), or export it again to record them")
    quantizer = load(directory)
    _check_onnx_files(directory, manifest)
    report = verify_recorded(directory, manifest, quantizer, load_reference(directory, manifest, quantizer),
                             provider)
    report.raise_if_failed()
    return report


def _check_onnx_files(directory: Path, manifest: dict) -> None:
    """onnx.checker and the standard-ops rule on every graph of the bundle."""
    for name in manifest["files"]:
        if name.endswith(".onnx"):
            check_onnx_file(directory / name)


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


BUNDLE_FILES = (MANIFEST, ENCODER_FILE, DECODER_FILE, WEIGHTS_FILE, FREQUENCIES_FILE, REFERENCE_FILE)


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


def check_target(directory: Path, overwrite: bool) -> None:
    """Where a bundle may go: nowhere yet, an empty directory, or (with ``overwrite``) an old bundle.  A directory
    holding anything but bundle files is never touched."""
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if not _holds_files(directory):
        return
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


def _holds_files(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def _staging_directory(target: Path) -> Path:
    """A fresh directory beside ``target`` (same file system, so that renaming it into place is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))


def _place(staging: Path, target: Path, overwrite: bool) -> None:
    """Rename the complete bundle into place.  An empty directory or old bundle there (checked again) keeps its
    mode and is removed only once the new bundle stands in its place."""
    if not target.exists():
        os.rename(staging, target)
        return
    check_target(target, overwrite)
    os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
    old = staging.with_name(staging.name + ".old")
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _set_modes(directory: Path) -> None:
    """Every file 0666 and the directory 0777 less the umask, as a plain ``open``/``mkdir`` makes them (safetensors
    writes 0600 and ``mkdtemp`` makes 0700)."""
    mask = _umask()
    for file in directory.iterdir():
        os.chmod(file, 0o666 & ~mask)
    os.chmod(directory, 0o777 & ~mask)


def _umask() -> int:
    """The process's umask, read from /proc where there is one: setting it (the portable way to read it) would
    change it for a moment under every other thread."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _manifest(quantizer, index_dtype: str, num_quantizers: int | None, opset: int) -> dict:
    import onnx
    import onnxscript

    import vqdeploy

    config, dropped = config_to_json(quantizer.init_config)
    json.dumps(config)  # a config that cannot be written fails here, before any file is
    return {
        "format": FORMAT, "format_version": 1,  # 1 until the bundle holds what versions 2 and 3 added
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
