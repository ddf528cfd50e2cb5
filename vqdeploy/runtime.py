"""onnxruntime sessions over an export bundle: ``encode`` (inputs -> indices) and ``decode`` (indices -> outputs).

    from vqdeploy.runtime import Session
    session = Session("bundle/")                # CUDA when available, else CPU
    indices = session.encode(features)          # numpy in, numpy out; torch in, torch out (same device)
    features = session.decode(indices)

On CUDA, torch CUDA tensors are bound in and out with IO binding: outputs are
allocated by torch at the size the graph's symbolic output shape gives, and nothing
passes through host memory (if a symbolic size uses an operation the runtime cannot
evaluate, onnxruntime allocates the output and it is copied over through the host).  TF32 is off unless asked for, so indices match
PyTorch's float32 argmin.  ``onnxruntime.InferenceSession.run`` is thread-safe and
every call makes its own binding, so one Session may serve several threads.
"""

from __future__ import annotations

import ast
import operator
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .bundle_format import read_manifest
from .codestream import StreamSpec
from .export.consistency import check_bundle

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


def symbolic_size(expression: str | int, sizes: dict[str, int]) -> int | None:
    """Evaluate an ONNX symbolic dimension ("s3", "2*s5", "(s34//2)") for known input sizes; None when it
    uses anything beyond integer +, -, *, //, %."""
    if isinstance(expression, int):
        return expression

    def evaluate(node):
        if isinstance(node, ast.Expression):
            return evaluate(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in sizes:
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](evaluate(node.left), evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -evaluate(node.operand)
        raise ValueError(expression)

    try:
        return evaluate(ast.parse(expression, mode="eval"))
    except (ValueError, SyntaxError, ZeroDivisionError):
        return None


@dataclass(frozen=True)
class OpenedBundle:
    """A bundle read once (``read_manifest``: fields, every file's sha256), passed on in its path's place."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, bundle: str | Path | OpenedBundle) -> OpenedBundle:
        return bundle if isinstance(bundle, cls) else cls(Path(bundle), read_manifest(bundle))

    @cached_property
    def spec(self) -> StreamSpec:  # made on first use: Session needs none
        return StreamSpec.from_bundle(self.path, self.manifest)


class Session:
    """Encode and decode with a bundle's ONNX graphs.

    provider: "auto" (CUDA when torch and onnxruntime see a GPU, else CPU), "cuda" (falls back to CPU with a
    warning) or "cpu"; tf32: allow TF32 matmuls on CUDA (faster, but indices may then differ from PyTorch
    float32); check_indices: range-check decode's input (one ``aminmax`` read back from CUDA tensors)."""

    def __init__(self, bundle: str | Path | OpenedBundle, provider: str = "auto", device_id: int = 0,
                 tf32: bool = False, check_indices: bool = True, session_options=None):
        import onnxruntime as ort

        if provider not in ("auto", "cuda", "cpu"):
            raise ValueError(f"provider must be 'auto', 'cuda' or 'cpu', got {provider!r}")
        opened = OpenedBundle.open(bundle)
        self.path, self.manifest = opened.path, opened.manifest
        check_bundle(self.path, self.manifest)  # an untrusted manifest's sizes must be its files' before any use
        self.device_id = device_id
        self.check_indices = check_indices
        use_cuda = provider != "cpu" and torch.cuda.is_available() \
            and "CUDAExecutionProvider" in ort.get_available_providers()
        if provider == "cuda" and not use_cuda:
            warnings.warn("CUDA was asked for but torch or onnxruntime sees no CUDA device: running on the CPU",
                          RuntimeWarning, stacklevel=2)
        providers = ["CPUExecutionProvider"]
        if use_cuda:
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id, "use_tf32": int(tf32)}))
        options = session_options or ort.SessionOptions()
        self.sessions = {}
        for graph in ("encoder", "decoder"):
            if graph in self.manifest:
                self.sessions[graph] = ort.InferenceSession(str(self.path / self.manifest[graph]["file"]), options,
                                                            providers=providers)
        self.on_cuda = use_cuda and self.sessions["encoder"].get_providers()[0] == "CUDAExecutionProvider"
        if use_cuda and not self.on_cuda:
            warnings.warn("onnxruntime could not start its CUDA provider: running on the CPU", RuntimeWarning,
                          stacklevel=2)

    @property
    def providers(self) -> list[str]:
        return self.sessions["encoder"].get_providers()

    def encode(self, inputs):
        """Inputs in the layout of the export example (any batch and token sizes) -> indices."""
        dtype = inputs.dtype if isinstance(inputs, torch.Tensor) else np.asarray(inputs).dtype
        if not (dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)):
            raise TypeError(f"encode expects floating-point inputs, got {dtype}")
        return self._run("encoder", inputs)

    def decode(self, indices):
        """Indices as ``encode`` gives them -> outputs.  Indices outside the codebook raise ValueError
        (-1 is allowed for residual quantizers: a dropped layer, which decodes to zero)."""
        if "decoder" not in self.sessions:
            raise ValueError(f"a {self.manifest['class']} bundle has no decoder")
        self._check_index_dtype(indices)
        if self.check_indices:
            self._check_index_range(indices)
        return self._run("decoder", indices)

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _check_index_dtype(indices) -> None:
        if isinstance(indices, torch.Tensor):
            if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
                raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        elif not np.issubdtype(np.asarray(indices).dtype, np.integer):
            raise TypeError(f"indices must be an integer array, got {np.asarray(indices).dtype}")

    def _check_index_range(self, indices) -> None:
        """Every index below its layer's codebook size (the last axis of a residual quantizer's indices holds
        its layers); -1 (a dropped layer) only where the quantizer drops layers."""
        indices = indices.long().cpu() if isinstance(indices, torch.Tensor) else torch.from_numpy(
            np.asarray(indices).astype(np.int64))
        allowed_low = -1 if self.manifest["dropped_index"] is not None else 0
        sizes = self.manifest.get("codebook_sizes")
        if sizes is None or indices.ndim == 0 or not 1 <= indices.shape[-1] <= len(sizes):
            sizes, columns = [max(sizes or [self.manifest["codebook_size"]])], indices.reshape(-1, 1)
        else:
            columns = indices.reshape(-1, indices.shape[-1])
        for layer, size in enumerate(sizes[:columns.shape[1]]):
            column = columns[:, layer]
            low, high = (int(v) for v in torch.aminmax(column)) if column.numel() else (0, 0)
            if low < allowed_low or high >= size:
                where = f" of layer {layer}" if len(sizes) > 1 else ""
                raise ValueError(f"indices{where} must lie in [{allowed_low}, {size - 1}], "
                                 f"found values in [{low}, {high}]")

    def _checked_shape(self, graph: str, shape: tuple) -> dict[str, int]:
        """Match an input shape against the graph's input; returns the symbolic sizes it binds."""
        expected = self.manifest[graph]["input"]["shape"]
        sizes = {}
        fits = len(shape) == len(expected)
        for size, want in zip(shape, expected):
            if isinstance(want, int):
                fits = fits and size == want
            else:
                fits = fits and sizes.setdefault(want, size) == size
        if not fits:
            readable = ", ".join(str(w) if isinstance(w, int) else "*" for w in expected)
            raise ValueError(f"{graph} input must have shape ({readable}) (* = any size), got {tuple(shape)}")
        return sizes

    def _run(self, graph: str, value):
        spec = self.manifest[graph]["input"]
        if isinstance(value, torch.Tensor):
            sizes = self._checked_shape(graph, tuple(value.shape))
            value = value.detach().to(_TORCH_DTYPES[spec["dtype"]]).contiguous()
            if value.is_cuda and self.on_cuda:
                return self._run_bound(graph, value, sizes)
            out = self.sessions[graph].run(None, {spec["name"]: value.cpu().numpy()})[0]
            return torch.from_numpy(out).to(value.device)
        value = np.asarray(value)
        self._checked_shape(graph, value.shape)
        return self.sessions[graph].run(None, {spec["name"]: np.ascontiguousarray(value, dtype=spec["dtype"])})[0]

    def _run_bound(self, graph: str, value: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
        """IO binding: torch owns both buffers on the GPU; no host copy."""
        spec, out_spec = self.manifest[graph]["input"], self.manifest[graph]["output"]
        session = self.sessions[graph]
        binding = session.io_binding()
        device = value.device
        index = torch.cuda.current_device() if device.index is None else device.index
        if index != self.device_id:
            raise ValueError(f"the session runs on cuda:{self.device_id}, the tensor is on cuda:{index}")
        torch.cuda.current_stream(device).synchronize()  # onnxruntime reads the input on its own stream
        binding.bind_input(spec["name"], "cuda", index, np.dtype(spec["dtype"]).type, tuple(value.shape),
                           value.data_ptr())
        out_shape = [symbolic_size(d, sizes) for d in out_spec["shape"]]
        if None in out_shape:  # a shape the runtime cannot predict: onnxruntime allocates, copied over the host
            binding.bind_output(out_spec["name"], "cuda", index)
            session.run_with_iobinding(binding)
            return torch.from_numpy(binding.copy_outputs_to_cpu()[0]).to(device)
        out = torch.empty(out_shape, dtype=_TORCH_DTYPES[out_spec["dtype"]], device=device)
        binding.bind_output(out_spec["name"], "cuda", index, np.dtype(out_spec["dtype"]).type, tuple(out_shape),
                            out.data_ptr())
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # written on onnxruntime's stream: done before torch reads them
        return out
