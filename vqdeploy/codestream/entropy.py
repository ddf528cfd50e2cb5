"""Static entropy coding of code streams: per-layer code frequencies measured on calibration data at export, and
a range coder (constriction's) driven by them.

Every code keeps a nonzero probability (counts + 1/2), so codes unseen in calibration still code, at about
log2(2 * calibration tokens) bits.  Encoder and decoder build their models from the same integer counts stored
in the bundle, so they agree bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..bundle_format import FREQUENCIES_FILE, BundleError  # noqa: F401  (FREQUENCIES_FILE re-exported)

MAX_CODED_SIZE = 1 << 20  # larger codebooks are packed: a range coder's model is one table entry per code
PROBABILITY_BITS = 24  # constriction quantizes a categorical model to 24-bit probabilities, each at least 2^-24
SLACK_BITS = 64  # a range coder's output never falls short of its codes' information by more than this
MAX_FILE_HEADER = 1 << 16  # the frequencies file's safetensors header: a few names and shapes


def measure_frequencies(indices: list[torch.Tensor], layout) -> list[np.ndarray]:
    """Per-layer code counts of a list of index tensors (of the bundle's layout)."""
    counts = [np.zeros(size, dtype=np.int64) for size in layout.layer_sizes]
    for tensor in indices:
        layout.check(tensor)
        for layer, codes in enumerate(layout.split_layers(tensor.long().cpu(), layout.layers)):
            codes = codes[codes >= 0]  # a dropped layer (-1) is not a code
            counts[layer] += np.bincount(codes.numpy(), minlength=len(counts[layer]))[:len(counts[layer])]
    return counts


def save_frequencies(counts: list[np.ndarray], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({f"layer.{i}": torch.from_numpy(np.asarray(c, dtype=np.int64)) for i, c in enumerate(counts)},
              str(path))


def load_frequencies(path: Path, layer_sizes: tuple[int, ...]) -> list[np.ndarray]:
    """The counts a bundle stores (safetensors: nothing is unpickled), checked against its layers.  The file is
    untrusted: its size is bounded by what the layers need before it is read, and anything unreadable is a
    ``BundleError``."""
    from safetensors.torch import load

    limit = MAX_FILE_HEADER + 8 * (8 + sum(layer_sizes))
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as error:
        raise BundleError(f"{path} cannot be read: {error.strerror or error}") from None
    if len(data) > limit:
        raise BundleError(f"{path} is larger than counts for layers of {list(layer_sizes)} codes can be")
    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own error types for every malformed file
        raise BundleError(f"{path} is not a readable safetensors file: {error}") from None
    expected = {f"layer.{i}" for i in range(len(layer_sizes))}
    if set(tensors) != expected:
        raise BundleError(f"{path} must hold {sorted(expected)}, holds {sorted(tensors)}")
    counts = []
    for layer, size in enumerate(layer_sizes):
        tensor = tensors[f"layer.{layer}"]
        if tensor.dtype != torch.int64 or tuple(tensor.shape) != (size,) or bool((tensor < 0).any()):
            raise BundleError(f"{path}: layer.{layer} must be {size} non-negative int64 counts, got "
                              f"{tensor.dtype}{tuple(tensor.shape)}")
        counts.append(tensor.numpy())
    return counts


def _constriction():
    try:
        import constriction
    except ImportError:  # pragma: no cover - a dependency of vqdeploy
        raise ImportError("entropy coding needs constriction (pip install constriction)") from None
    return constriction


class RangeCoder:
    """Encode and decode one layer's codes with a static categorical model of that layer's counts."""

    def __init__(self, counts: list[np.ndarray]):
        self.counts = counts
        self._models: dict[int, object] = {}
        self._min_bits: dict[int, float] = {}

    def codes_layer(self, layer: int) -> bool:
        return len(self.counts[layer]) <= MAX_CODED_SIZE and len(self.counts[layer]) > 1

    def probabilities(self, layer: int) -> np.ndarray:
        """The layer's model: counts + 1/2, normalised (every code codable)."""
        p = self.counts[layer].astype(np.float64) + 0.5
        return p / p.sum()

    def model(self, layer: int):
        if layer not in self._models:
            self._models[layer] = _constriction().stream.model.Categorical(self.probabilities(layer), perfect=False)
        return self._models[layer]

    def encode(self, layer: int, codes: np.ndarray) -> bytes:
        encoder = _constriction().stream.queue.RangeEncoder()
        if codes.size:
            encoder.encode(np.ascontiguousarray(codes, dtype=np.int32), self.model(layer))
        return encoder.get_compressed().astype("<u4").tobytes()

    def max_codes(self, layer: int, size: int) -> int:
        """The most codes ``size`` range-coded bytes can hold: every code costs at least ``min_bits`` (the layer's
        most probable code), and the coder's output is never shorter than its codes' information (less
        ``SLACK_BITS``).  An empty segment holds none (the coder writes a word for the first code)."""
        return 0 if size == 0 else int((8 * size + SLACK_BITS) / self.min_bits(layer))

    def min_bits(self, layer: int) -> float:
        """The fewest bits any code of the layer costs: -log2 of the largest probability the quantized model can
        give a code (the float model's, raised by the quantization's rounding, at most 1 - (K - 1) 2^-24)."""
        if layer not in self._min_bits:
            size, quantum = len(self.counts[layer]), 2.0 ** -PROBABILITY_BITS
            largest = min(float(self.probabilities(layer).max()) + (size + 1) * quantum,
                          1 - max(size - 1, 1) * quantum)  # a one-code layer, never range-coded, stays finite
            self._min_bits[layer] = float(-np.log2(largest))
        return self._min_bits[layer]

    def decode(self, layer: int, data: bytes, count: int) -> np.ndarray:
        """``count`` codes of a segment (ValueError for data that is not a segment of this model holding them).
        The decoder produces codes past the end of its data, so ``count`` must first be bounded by ``max_codes``
        of the segment's size, as ``StreamReader`` does before it reads a segment."""
        if len(data) % 4:
            raise ValueError(f"a range-coded segment is whole 32-bit words, got {len(data)} bytes")
        if count == 0:
            return np.zeros(0, dtype=np.int64)
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        try:
            decoded = _constriction().stream.queue.RangeDecoder(words).decode(self.model(layer), count)
        except Exception as error:  # constriction asserts on data no model's encoder could have written
            raise ValueError(f"the range coder refuses the data ({type(error).__name__}: {error})") from None
        return np.asarray(decoded, dtype=np.int64)
