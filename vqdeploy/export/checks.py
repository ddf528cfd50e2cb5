"""Checks of exported graphs: ONNX validity, standard ops only, and onnxruntime against PyTorch.

Parity runs on fresh random inputs at shapes other than the export example (so that
no size is baked in).  The encoder's indices must agree token by token, except for
near-ties: tokens whose two choices are within float32 rounding of each other at the
first layer where they differ (see ``ties``), which are counted and reported.  Any
other disagreement is real and fails.  The decoder's outputs must lie within
``FLOAT32_ATOL``.  Every failure is collected and raised as one ``ExportParityError``.
Float16 graphs are compared with the float32 PyTorch model and their agreement is
reported, not required (only a graph that fails to run fails).

A bundle whose graphs hold user networks cannot rebuild them in PyTorch, so its export records what PyTorch
gave on one seeded input (``REFERENCE_FILE``: the input, the features at the quantizer's input, the indices
and the decoder's outputs); ``verify_recorded`` checks onnxruntime against that record.  The record is
untrusted input like every bundle file: its size, names, dtypes and shapes are checked before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..bundle_format import REFERENCE_FILE, BundleError
from .graphs import INDEX_DTYPES, EncoderGraph, is_residual
from .ties import NEAR_TIE_RTOL, Agreement, compare_indices

FLOAT32_ATOL = 1e-5
STANDARD_DOMAINS = ("", "ai.onnx")


class ExportParityError(RuntimeError):
    """onnxruntime disagrees with PyTorch on an exported graph, or a graph is not plain standard ONNX."""


@dataclass
class GraphCheck:
    graph: str  # "encoder" or "decoder"
    input_shape: tuple
    agreement: Agreement | None = None  # tokens identical / near-tie / real (encoder)
    max_abs_error: float | None = None  # largest |onnxruntime - torch| (decoder)
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None

    @property
    def indices_equal(self) -> float | None:
        """The fraction of tokens whose indices are identical (encoder)."""
        if self.agreement is None:
            return None
        return self.agreement.identical / max(self.agreement.tokens, 1)


@dataclass
class VerifyReport:
    provider: str
    float16: bool = False
    checks: list[GraphCheck] = field(default_factory=list)
    recorded: bool = False  # compared with the PyTorch outputs recorded at export, not with PyTorch now

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def table(self) -> str:
        lines = [f"{'graph':11} {'input shape':>20} {'tokens':>8} {'identical':>10} {'near-tie':>9} {'real':>6} "
                 f"{'max |error|':>12}  result"]
        for c in self.checks:
            counts = [""] * 4
            if c.agreement is not None:
                counts = [str(v) if v is not None else "-" for v in c.agreement[:4]]
            error = "" if c.max_abs_error is None else f"{c.max_abs_error:.2e}"
            lines.append(f"{c.graph:11} {str(c.input_shape):>20} {counts[0]:>8} {counts[1]:>10} {counts[2]:>9} "
                         f"{counts[3]:>6} {error:>12}  {c.problem or 'ok'}")
        if self.float16:
            lines.append("float16 graphs: agreement with the float32 PyTorch model is reported, not required")
        elif any(c.agreement is not None and c.agreement.near_ties for c in self.checks):
            lines.append(f"near-tie: within {NEAR_TIE_RTOL:.1e} of its computation's size of the decision boundary "
                         "at the first layer that differs (float32 rounding), not an export error")
        if self.recorded:
            lines.append("compared with the outputs PyTorch gave at export on the input recorded in the bundle "
                         "(its user networks are not in it as PyTorch code; verify(bundle, encoder=..., "
                         "decoder=...) checks other inputs)")
        return "\n".join(lines)

    def raise_if_failed(self, note: str = "") -> None:
        """ExportParityError with the table (and the report, as ``error.report``) when a check failed."""
        if not self.passed:
            error = ExportParityError(f"onnxruntime ({self.provider}) disagrees with PyTorch{note}:\n{self.table()}")
            error.report = self
            raise error

    @property
    def first_problem(self) -> str | None:
        """The first failed check, in a line: which graph, on what shape, and what went wrong."""
        failed = [c for c in self.checks if not c.passed]
        return f"{failed[0].graph} on {failed[0].input_shape}: {failed[0].problem}" if failed else None

    @property
    def min_indices_equal(self) -> float | None:
        fractions = [c.indices_equal for c in self.checks if c.indices_equal is not None]
        return min(fractions) if fractions else None

    @property
    def near_ties(self) -> int:
        return sum(c.agreement.near_ties or 0 for c in self.checks if c.agreement is not None)

    @property
    def max_abs_error(self) -> float | None:
        errors = [c.max_abs_error for c in self.checks if c.max_abs_error is not None]
        return max(errors) if errors else None


def check_onnx_file(path: Path) -> None:
    """onnx.checker with full_check (shape inference included), and standard-domain ops only."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise ExportParityError(f"{path.name} fails onnx.checker: {error}") from None
    custom = sorted({f"{n.domain}::{n.op_type}" for n in _all_nodes(model.graph) if n.domain not in STANDARD_DOMAINS})
    custom += [f"opset {o.domain}" for o in model.opset_import if o.domain not in STANDARD_DOMAINS]
    if custom or len(model.functions):
        raise ExportParityError(f"{path.name} uses non-standard ops or local functions: "
                                f"{custom or [f.name for f in model.functions]}")


def _all_nodes(graph):
    """Every node of a graph, those inside If/Loop/Scan bodies included."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _all_nodes(subgraph)


def session(path: Path, provider: str = "cpu"):
    """An onnxruntime session on the CPU, or on CUDA; a CUDA check that onnxruntime would quietly run on the
    CPU raises instead."""
    import onnxruntime as ort

    if provider not in ("cpu", "cuda"):
        raise ValueError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
        providers = [("CUDAExecutionProvider", {"use_tf32": 0})]
    created = ort.InferenceSession(str(path), options, providers=providers)
    if provider == "cuda" and created.get_providers()[0] != "CUDAExecutionProvider":
        raise ExportParityError(f"onnxruntime could not run {path.name} on CUDA (providers: {created.get_providers()})")
    return created


def verify_shapes(example_shape: tuple, dynamic_axes: list[int]) -> list[tuple]:
    """Two input shapes unlike the example: batch 3 with token axes doubled, batch 1 with them tripled."""
    shapes = []
    for batch, factor in ((3, 2), (1, 3)):
        shape = list(example_shape)
        for axis in dynamic_axes:
            shape[axis] = batch if axis == 0 else shape[axis] * factor
        shapes.append(tuple(shape))
    return shapes


def check_inputs(inputs, manifest: dict) -> list[torch.Tensor]:
    """A user's own encoder inputs for a check: float tensors shaped like the export example on its fixed axes."""
    return encoder_inputs(inputs, manifest["encoder"]["example_shape"], manifest["encoder"]["dynamic_axes"])


def encoder_inputs(inputs, example_shape, dynamic_axes, what: str = "inputs") -> list[torch.Tensor]:
    """``inputs`` (a tensor or a list) as float32 CPU tensors, each shaped like ``example_shape`` on every axis
    but ``dynamic_axes`` and finite; a clear error naming ``what`` otherwise."""
    inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    pattern = ["*" if axis in dynamic_axes else size for axis, size in enumerate(example_shape)]
    for tensor in inputs:
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise TypeError(f"{what} must be floating-point torch tensors, got {tensor!r:.80}")
        fits = tensor.ndim == len(pattern) and all(p == "*" or p == s for p, s in zip(pattern, tensor.shape))
        if not fits:
            readable = ", ".join(map(str, pattern))
            raise ValueError(f"{what} must have shape ({readable}) (* = any size) like the export example, got "
                             f"{tuple(tensor.shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{what} must be finite (NaN or Inf gives no defined indices)")
    return [tensor.detach().cpu().float() for tensor in inputs]


def verify_graphs(directory: Path, manifest: dict, encoder_graph, decoder_graph, provider: str = "cpu",
                  seed: int = 0, inputs: list[torch.Tensor] | None = None) -> VerifyReport:
    """Run the bundle's graphs under onnxruntime against the PyTorch graphs they were exported from, on
    ``inputs`` or on seeded random inputs of two shapes unlike the export example."""
    float16 = manifest.get("float16", False)
    report = VerifyReport(provider, float16)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder_session = session(directory / manifest["encoder"]["file"], provider)
        decoder_session = None if decoder_graph is None else session(directory / manifest["decoder"]["file"],
                                                                     provider)
        if inputs is None:
            shapes = verify_shapes(tuple(manifest["encoder"]["example_shape"]), manifest["encoder"]["dynamic_axes"])
            inputs = [torch.randn(shape) for shape in shapes]
        wrapped = encoder_graph.encoder is not None
        for batch in inputs:
            with torch.no_grad():
                features = encoder_graph.features(batch)
                expected = encoder_graph.indices(features)
            report.checks.append(_check_encoder(encoder_session, encoder_graph.quantizer, wrapped, batch, features,
                                                expected, float16))
            if decoder_session is not None:
                for label, indices in _decoder_inputs(encoder_graph.quantizer, expected):
                    with torch.no_grad():
                        outputs = decoder_graph(indices).float()
                    report.checks.append(_check_decoder(decoder_session, indices, outputs, label, float16))
    finally:
        torch.random.set_rng_state(generator_state)
    return report


# ------------------------------------------------------------------------------------- recorded outputs

REFERENCE_OUTPUTS = {"decoder": "outputs", "decoder, -1": "outputs_dropped"}  # decoder check label -> tensor name
MAX_REFERENCE_BYTES = 256 << 20  # one input of the export example's shape and what it gives (export skips more)
MAX_REFERENCE_DIMS = 8


def record_reference(encoder_graph, decoder_graph, shape, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the PyTorch graphs give on one seeded random input of ``shape``: the input, the features at the
    quantizer's input, the indices, and the decoder's outputs for them (and for them with the dropped layers
    of a residual quantizer)."""
    inputs = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        features = encoder_graph.features(inputs).float()
        indices = encoder_graph.indices(features)
        record = {"inputs": inputs, "features": features, "indices": indices}
        if decoder_graph is not None:
            for label, value in _decoder_inputs(encoder_graph.quantizer, indices):
                record[REFERENCE_OUTPUTS[label]] = decoder_graph(value).float()
    return {name: tensor.contiguous() for name, tensor in record.items()}


def load_reference(directory: Path, manifest: dict, quantizer) -> dict[str, torch.Tensor]:
    """A bundle's recorded reference outputs, after checking its size, names, dtypes and shapes against the
    manifest and the rebuilt quantizer (the file is untrusted: its hash only ties it to an unsigned manifest)."""
    from safetensors.torch import load_file

    from .consistency import read_safetensors_header

    path = directory / REFERENCE_FILE
    if path.stat().st_size > MAX_REFERENCE_BYTES:
        raise BundleError(f"{path} holds {path.stat().st_size:,} bytes, more than reference outputs take "
                          f"({MAX_REFERENCE_BYTES:,} at most)")
    header = read_safetensors_header(path)
    index_dtype = INDEX_DTYPES[manifest["index_dtype"]]
    expected = {"inputs": (torch.float32, manifest["encoder"]["input"]["shape"]), "features": (torch.float32, None),
                "indices": (index_dtype, manifest["encoder"]["output"]["shape"])}
    if "decoder" in manifest:
        labels = _decoder_labels(quantizer, header["indices"][1] if "indices" in header else ())
        expected.update({REFERENCE_OUTPUTS[label]: (torch.float32, manifest["decoder"]["output"]["shape"])
                         for label in labels})
    if set(header) != set(expected):
        raise BundleError(f"{path} must hold exactly {sorted(expected)}, got {sorted(header)}")
    for name, (dtype, declared) in expected.items():
        stored_dtype, shape = header[name]
        if stored_dtype != dtype or not _fits(shape, declared):
            want = "any shape" if declared is None else f"shape {declared}"
            raise BundleError(f"{path}: {name!r} is {stored_dtype}{list(shape)}, the manifest implies {dtype} of "
                              f"{want} (sizes of at least 1, at most {MAX_REFERENCE_DIMS} axes)")
    record = load_file(str(path))
    _check_recorded_values(path, manifest, quantizer, record)
    return record


def _fits(shape: tuple, declared) -> bool:
    """A shape of positive sizes matching a graph's declared shape (ints fixed, symbols any), or any shape."""
    if not 1 <= len(shape) <= MAX_REFERENCE_DIMS or min(shape) < 1:
        return False
    return declared is None or (len(shape) == len(declared) and all(
        not isinstance(want, int) or want == size for size, want in zip(shape, declared)))


def _check_recorded_values(path: Path, manifest: dict, quantizer, record: dict[str, torch.Tensor]) -> None:
    """Finite floats, indices within the codebooks, and indices that the quantizer gives for the recorded features
    (up to near-ties): comparing onnxruntime's indices with them trusts them to be PyTorch's."""
    if not all(bool(torch.isfinite(t).all()) for name, t in record.items() if name != "indices"):
        raise BundleError(f"{path}: the recorded inputs and outputs must be finite")
    indices = record["indices"]
    if int(indices.min()) < 0 or int(indices.max()) >= manifest["codebook_size"]:
        raise BundleError(f"{path}: recorded indices must lie in [0, {manifest['codebook_size'] - 1}]")
    graph = EncoderGraph(quantizer, None, INDEX_DTYPES[manifest["index_dtype"]], manifest["num_quantizers"])
    try:
        with torch.no_grad():
            now = graph.indices(record["features"])
    except (RuntimeError, ValueError, IndexError) as error:
        raise BundleError(f"{path}: the recorded features {list(record['features'].shape)} are not an input of "
                          f"this {manifest['class']}: {error}") from None
    if now.shape != indices.shape:
        raise BundleError(f"{path}: the recorded features give indices of shape {list(now.shape)}, the recorded "
                          f"indices are {list(indices.shape)}")
    agreement = compare_indices(quantizer, record["features"], now, indices, wrapped=manifest["encoder_network"])
    if agreement.real:
        raise BundleError(f"{path}: {agreement.real} of its {agreement.tokens} recorded tokens' indices are not what "
                          f"this {manifest['class']} gives for the recorded features (changed since export?)")
    for name in REFERENCE_OUTPUTS.values():
        if name in record and record[name].shape != record["outputs"].shape:
            raise BundleError(f"{path}: {name!r} must have the shape of 'outputs'")


def verify_recorded(directory: Path, manifest: dict, quantizer, record: dict[str, torch.Tensor],
                    provider: str = "cpu") -> VerifyReport:
    """Run the bundle's graphs under onnxruntime on the recorded input and compare with the recorded PyTorch
    outputs: indices identical up to near-ties, decoder outputs within ``FLOAT32_ATOL``."""
    float16 = manifest.get("float16", False)
    report = VerifyReport(provider, float16, recorded=True)
    encoder_session = session(directory / manifest["encoder"]["file"], provider)
    report.checks.append(_check_encoder(encoder_session, quantizer, manifest["encoder_network"], record["inputs"],
                                        record["features"], record["indices"], float16))
    if "decoder" in manifest:
        decoder_session = session(directory / manifest["decoder"]["file"], provider)
        for label, indices in _decoder_inputs(quantizer, record["indices"]):
            report.checks.append(_check_decoder(decoder_session, indices, record[REFERENCE_OUTPUTS[label]], label,
                                                float16))
    return report


def _decoder_inputs(quantizer, indices: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The encoder's indices, and for residual quantizers the same with every layer after the first
    dropped (-1), which must decode to zero."""
    if len(_decoder_labels(quantizer, tuple(indices.shape))) == 1:
        return [("decoder", indices)]
    dropped = indices.clone()
    dropped[..., 1:] = -1
    return [("decoder", indices), ("decoder, -1", dropped)]


def _decoder_labels(quantizer, index_shape: tuple) -> list[str]:
    """The decoder checks of indices of ``index_shape``: the dropped-layer one for residual quantizers."""
    if is_residual(quantizer) and len(index_shape) and index_shape[-1] >= 2:
        return ["decoder", "decoder, -1"]
    return ["decoder"]


def _check_encoder(encoder_session, quantizer, wrapped: bool, inputs: torch.Tensor, features: torch.Tensor,
                   expected: torch.Tensor, float16: bool) -> GraphCheck:
    check = GraphCheck("encoder", tuple(inputs.shape))
    feed = (inputs.half() if float16 else inputs).numpy()
    try:
        got = encoder_session.run(None, {encoder_session.get_inputs()[0].name: feed})[0]
    except Exception as error:  # an onnxruntime failure is a finding: report it with the others
        check.problem = f"onnxruntime failed: {type(error).__name__}: {error}"[:300]
        return check
    if got.shape != tuple(expected.shape) or got.dtype != expected.numpy().dtype:
        check.problem = f"got {got.dtype}{got.shape}, expected {expected.numpy().dtype}{tuple(expected.shape)}"
        return check
    check.agreement = compare_indices(quantizer, features, expected, torch.from_numpy(got), wrapped=wrapped,
                                      classify=not float16)
    if check.agreement.real:
        check.problem = (f"indices differ: {check.agreement.real} real disagreement(s), up to "
                         f"{check.agreement.worst:.3g}x the near-tie tolerance")
    return check


def _check_decoder(decoder_session, indices: torch.Tensor, outputs: torch.Tensor, label: str,
                   float16: bool) -> GraphCheck:
    """onnxruntime's decoder outputs for ``indices`` against PyTorch's ``outputs`` (float32)."""
    check = GraphCheck(label, tuple(indices.shape))
    expected = outputs.numpy()
    try:
        got = decoder_session.run(None, {decoder_session.get_inputs()[0].name: indices.numpy()})[0]
    except Exception as error:  # an onnxruntime failure is a finding: report it with the others
        check.problem = f"onnxruntime failed: {type(error).__name__}: {error}"[:300]
        return check
    if got.shape != expected.shape:
        check.problem = f"got shape {got.shape}, expected {expected.shape}"
        return check
    check.max_abs_error = float(np.abs(got.astype(np.float32) - expected).max()) if got.size else 0.0
    if not check.max_abs_error <= FLOAT32_ATOL and not (float16 and np.isfinite(check.max_abs_error)):
        check.problem = f"outputs differ by more than {FLOAT32_ATOL}"
    return check
