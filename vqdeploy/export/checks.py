"""Checks of exported graphs: ONNX validity, standard ops only, and onnxruntime against PyTorch.

Parity runs on fresh random inputs at shapes other than the export example (so that
no size is baked in).  The encoder's indices must agree token by token, except for
near-ties: tokens whose two choices are within float32 rounding of each other at the
first layer where they differ (see ``ties``), which are counted and reported.  Any
other disagreement is real and fails.  The decoder's outputs must lie within
``FLOAT32_ATOL``.  Every failure is collected and raised as one ``ExportParityError``.
Float16 graphs are compared with the float32 PyTorch model and their agreement is
reported, not required (only a graph that fails to run fails).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .graphs import is_residual
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
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise ExportParityError(f"onnxruntime ({self.provider}) disagrees with PyTorch:\n{self.table()}")

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
        for batch in inputs:
            with torch.no_grad():
                features = encoder_graph.features(batch)
                expected = encoder_graph.indices(features)
            report.checks.append(_check_encoder(encoder_session, encoder_graph, batch, features, expected, float16))
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


def _check_encoder(encoder_session, encoder_graph, inputs: torch.Tensor, features: torch.Tensor,
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
    check.agreement = compare_indices(encoder_graph.quantizer, features, expected, torch.from_numpy(got),
                                      wrapped=encoder_graph.encoder is not None, classify=not float16)
    if check.agreement.real:
        check.problem = (f"indices differ: {check.agreement.real} real disagreement(s), up to "
                         f"{check.agreement.worst:.3g}x the near-tie tolerance")
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
