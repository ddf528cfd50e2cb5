"""Checks of exported graphs: ONNX validity, standard ops only, and onnxruntime against PyTorch.

Parity runs on fresh random inputs at shapes other than the export example (so that
no size is baked in): the encoder's indices must be identical, the decoder's outputs
within ``FLOAT32_ATOL``.  Every failure is collected and raised as one
``ExportParityError``.  With a user network inside the encoder graph, its convolutions
and matmuls round differently in onnxruntime and PyTorch, so a token within about 1e-6
of a decision boundary may flip: there at least ``WRAPPED_MIN_INDICES_EQUAL`` of the
indices must agree (the codec recipe measures 4 flips in 64,000).  Float16 graphs are compared with the float32 PyTorch model and
their agreement is reported, not required (only a graph that fails to run fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .graphs import is_residual

FLOAT32_ATOL = 1e-5
WRAPPED_MIN_INDICES_EQUAL = 0.999
STANDARD_DOMAINS = ("", "ai.onnx")


class ExportParityError(RuntimeError):
    """onnxruntime disagrees with PyTorch on an exported graph, or a graph is not plain standard ONNX."""


@dataclass
class GraphCheck:
    graph: str  # "encoder" or "decoder"
    input_shape: tuple
    indices_equal: float | None = None  # fraction of identical indices (encoder)
    max_abs_error: float | None = None  # largest |onnxruntime - torch| (decoder)
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None


@dataclass
class VerifyReport:
    provider: str
    float16: bool = False
    checks: list[GraphCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def table(self) -> str:
        lines = [f"{'graph':11} {'input shape':>22} {'indices equal':>14} {'max |error|':>12}  result"]
        for c in self.checks:
            equal = "" if c.indices_equal is None else f"{100 * c.indices_equal:.4f}%"
            error = "" if c.max_abs_error is None else f"{c.max_abs_error:.2e}"
            lines.append(f"{c.graph:11} {str(c.input_shape):>22} {equal:>14} {error:>12}  {c.problem or 'ok'}")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ExportParityError(f"onnxruntime ({self.provider}) disagrees with PyTorch:\n{self.table()}")

    @property
    def min_indices_equal(self) -> float | None:
        fractions = [c.indices_equal for c in self.checks if c.indices_equal is not None]
        return min(fractions) if fractions else None

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


def verify_graphs(directory: Path, manifest: dict, encoder_graph, decoder_graph, provider: str = "cpu",
                  seed: int = 0) -> VerifyReport:
    """Run the bundle's graphs under onnxruntime against the PyTorch graphs they were exported from."""
    float16 = manifest.get("float16", False)
    report = VerifyReport(provider, float16)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder_session = session(directory / manifest["encoder"]["file"], provider)
        decoder_session = None if decoder_graph is None else session(directory / manifest["decoder"]["file"],
                                                                     provider)
        for shape in verify_shapes(tuple(manifest["encoder"]["example_shape"]), manifest["encoder"]["dynamic_axes"]):
            inputs = torch.randn(shape)
            with torch.no_grad():
                expected = encoder_graph(inputs)
            min_equal = WRAPPED_MIN_INDICES_EQUAL if manifest.get("encoder_network") else 1.0
            report.checks.append(_check_encoder(encoder_session, inputs, expected, float16, min_equal))
            if decoder_session is not None:
                for label, indices in _decoder_inputs(encoder_graph.quantizer, expected):
                    report.checks.append(_check_decoder(decoder_session, decoder_graph, indices, label, float16))
    finally:
        torch.random.set_rng_state(generator_state)
    return report


def _decoder_inputs(quantizer, indices: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The encoder's indices, and for residual quantizers the same with every layer after the first
    dropped (-1), which must decode to zero."""
    if not is_residual(quantizer) or indices.shape[-1] < 2:
        return [("decoder", indices)]
    dropped = indices.clone()
    dropped[..., 1:] = -1
    return [("decoder", indices), ("decoder, -1", dropped)]


def _check_encoder(encoder_session, inputs: torch.Tensor, expected: torch.Tensor, float16: bool,
                   min_equal: float) -> GraphCheck:
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
    check.indices_equal = float((got == expected.numpy()).mean())
    if check.indices_equal < min_equal and not float16:
        check.problem = "indices differ" if min_equal == 1 else f"fewer than {min_equal:.1%} of indices agree"
    return check


def _check_decoder(decoder_session, decoder_graph, indices: torch.Tensor, label: str, float16: bool) -> GraphCheck:
    check = GraphCheck(label, tuple(indices.shape))
    with torch.no_grad():
        expected = decoder_graph(indices).float().numpy()
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
