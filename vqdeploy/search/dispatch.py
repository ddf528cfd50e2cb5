"""When ``nearest_codes`` takes the fused kernel, and the custom op that puts the kernel in a compiled graph.

The kernel runs for float32 rows and codes on a CUDA device, with Triton installed, outside export, for code
dimensions up to ``MAX_FUSED_DIM``; ``VQDEPLOY_FUSED_SEARCH=0`` in the environment or
``fused_search_settings(enabled=False)`` keeps the float32 torch path everywhere.  A kernel that fails to build
warns once and leaves the torch path in charge, so a broken Triton never stops training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import warnings

import torch

from .bounds import MAX_FUSED_DIM, check_precision
from .torch_path import nearest_codes_torch


@dataclasses.dataclass
class FusedSearchSettings:
    """``precision``: the tensor-core operands ("bf16", "tf32"; "ieee" for plain float32 FMAs);
    ``candidates``: codes kept per row for the float64 rescoring (a power of two)."""

    enabled: bool = os.environ.get("VQDEPLOY_FUSED_SEARCH", "1") != "0"
    precision: str = "bf16"
    candidates: int = 16


SETTINGS = FusedSearchSettings()
_BROKEN: list[str] = []  # the error of a kernel that failed to build, once seen


@contextlib.contextmanager
def fused_search_settings(**changes):
    """Change the fused search's settings for a ``with`` block (benchmarks, tests, A/B checks)."""
    unknown = set(changes) - {f.name for f in dataclasses.fields(FusedSearchSettings)}
    if unknown:
        raise TypeError(f"unknown fused search settings {sorted(unknown)}")
    check_precision(changes.get("precision", SETTINGS.precision))
    saved = dataclasses.replace(SETTINGS)
    for name, value in changes.items():
        setattr(SETTINGS, name, value)
    try:
        yield SETTINGS
    finally:
        for field in dataclasses.fields(FusedSearchSettings):
            setattr(SETTINGS, field.name, getattr(saved, field.name))


# decided once, without importing Triton (a constant for torch.compile to trace through)
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def fused_search_used(x: torch.Tensor, codes: torch.Tensor) -> bool:
    """Whether ``nearest_codes(x, codes)`` runs the fused kernel (decided from devices, dtypes and shapes)."""
    return (SETTINGS.enabled and not _BROKEN and x.is_cuda and x.dtype == torch.float32
            and codes.dtype == torch.float32 and x.shape[-1] <= MAX_FUSED_DIM
            and not (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()) and TRITON_AVAILABLE)


def search_nearest(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool) -> torch.Tensor:
    """(h, n, d), (h, k, d) -> (h, n) through the custom op (opaque to torch.compile: one graph, no break)."""
    return fused_nearest_codes(x, codes, use_cosine_sim, SETTINGS.precision, SETTINGS.candidates)


@torch.library.custom_op("vqdeploy::fused_nearest_codes", mutates_args=())
def fused_nearest_codes(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool, precision: str,
                        candidates: int) -> torch.Tensor:
    from .kernel import launch

    if not _BROKEN:
        try:
            return launch(x, codes, use_cosine_sim, precision, candidates)[0]
        except (ValueError, TypeError):  # bad input: the caller's error, not a broken kernel
            raise
        except Exception as error:  # a Triton that cannot build the kernel here: the torch path, said once
            _BROKEN.append(f"{type(error).__name__}: {error}")
            warnings.warn(f"vqdeploy: the fused nearest-code kernel failed ({_BROKEN[0][:200]}); "
                          "using the float32 torch search", RuntimeWarning, stacklevel=2)
    return nearest_codes_torch(x, codes, use_cosine_sim)


@fused_nearest_codes.register_fake
def _fused_nearest_codes_shape(x, codes, use_cosine_sim, precision, candidates):
    return x.new_empty(x.shape[:2], dtype=torch.int64)
