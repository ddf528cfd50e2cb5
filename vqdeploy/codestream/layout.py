"""Where a bundle's indices keep their layers and their time: the shape a code stream carries.

A bundle's decoder takes one index tensor, e.g. ``(b, n, q)`` for ResidualVQ, ``(g, b, n, q)`` for the grouped
quantizers, ``(b, h, w)`` for an image VectorQuantize.  A stream cuts it into frames along the *frame axis* (the
first token axis after the batch: time for a codec) and, inside each frame, into one segment per *layer* (the last
axis of a residual quantizer's indices; a single layer otherwise), so that a reader can stop after any k layers.
Everything here is read from the manifest, so bundles exported before streams existed get streams too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class CodeLayout:
    """shape: the index shape with ``None`` on the dynamic axes; frame_axis: the axis frames cut;
    layer_axis: the axis of residual layers (None: one layer); layer_sizes: each layer's codebook size."""

    shape: tuple[int | None, ...]
    frame_axis: int
    layer_axis: int | None
    layer_sizes: tuple[int, ...]

    def __post_init__(self):
        if not self.layer_sizes or any(not isinstance(k, int) or k < 1 for k in self.layer_sizes):
            raise ValueError(f"layer_sizes must be positive ints, got {self.layer_sizes}")
        if self.layer_axis is not None and self.shape[self.layer_axis] != len(self.layer_sizes):
            raise ValueError(f"the layer axis {self.layer_axis} of {self.shape} does not hold "
                             f"{len(self.layer_sizes)} layers")

    @property
    def layers(self) -> int:
        return len(self.layer_sizes)

    @cached_property
    def layer_bits(self) -> tuple[int, ...]:
        """ceil(log2 K) bits per code of each layer (0 for a one-code codebook)."""
        return tuple(max(k - 1, 0).bit_length() for k in self.layer_sizes)

    @classmethod
    def from_manifest(cls, manifest: dict) -> CodeLayout:
        """The layout of the indices the decoder takes (the encoder gives, for an encoder-only bundle)."""
        if "decoder" in manifest:
            graph = manifest["decoder"]
            shape, dynamic = graph["input"]["shape"], graph["dynamic_axes"]
        else:
            shape = manifest["encoder"]["output"]["shape"]
            dynamic = [axis for axis, size in enumerate(shape) if not isinstance(size, int)]
        return cls.from_indices(shape, dynamic, manifest.get("codebook_sizes"), manifest["codebook_size"])

    @classmethod
    def from_indices(cls, shape, dynamic_axes, codebook_sizes, codebook_size: int) -> CodeLayout:
        """shape: an index shape; dynamic_axes: its batch and token axes; codebook_sizes: a residual
        quantizer's per-layer sizes (its layers on the last axis), else None and one ``codebook_size``."""
        shape = tuple(None if axis in dynamic_axes or not isinstance(size, int) else int(size)
                      for axis, size in enumerate(shape))
        dynamic = sorted(axis for axis, size in enumerate(shape) if size is None)
        frame_axis = dynamic[1] if len(dynamic) > 1 else dynamic[0]
        if codebook_sizes is not None and shape and shape[-1] is not None:
            return cls(shape, frame_axis, len(shape) - 1, tuple(int(k) for k in codebook_sizes[:shape[-1]]))
        return cls(shape, frame_axis, None, (int(codebook_size),))

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "frame_axis": self.frame_axis, "layer_axis": self.layer_axis,
                "layer_sizes": list(self.layer_sizes)}

    def check(self, indices: torch.Tensor, layers: int | None = None) -> None:
        """Indices of this layout (any sizes on the dynamic axes; ``layers`` or all on the layer axis)."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        self.check_shape(tuple(indices.shape), layers)

    def check_shape(self, shape: tuple[int, ...], layers: int | None = None) -> None:
        """ValueError unless ``shape`` fits the layout (``layers`` on the layer axis, when given)."""
        expected = list(self.shape)
        if self.layer_axis is not None and layers is not None:
            expected[self.layer_axis] = layers
        fits = len(shape) == len(expected) and all(size is None or size == actual
                                                   for size, actual in zip(expected, shape))
        if not fits:
            shown = ["*" if s is None else s for s in expected]
            raise ValueError(f"indices of shape {tuple(shape)} do not fit this bundle's index layout "
                             f"({', '.join(map(str, shown))}; * is any size)")

    def frame_shape(self, frame_tokens: int, rest: tuple[int, ...], layers: int) -> list[int]:
        """The full index shape of a frame: ``rest`` fills the other dynamic axes, ``layers`` the layer axis."""
        shape, rest = list(self.shape), list(rest)
        for axis, size in enumerate(shape):
            if axis == self.frame_axis:
                shape[axis] = frame_tokens
            elif axis == self.layer_axis:
                shape[axis] = layers
            elif size is None:
                shape[axis] = rest.pop(0)
        return shape

    def other_dynamic_sizes(self, indices: torch.Tensor) -> tuple[int, ...]:
        """The sizes of the dynamic axes other than the frame axis (the batch, image width, ...)."""
        return tuple(indices.shape[a] for a, s in enumerate(self.shape) if s is None and a != self.frame_axis)

    def split_layers(self, indices: torch.Tensor, layers: int) -> list[torch.Tensor]:
        """The first ``layers`` layers, each flattened in C order with its layer axis removed."""
        if self.layer_axis is None:
            return [indices.reshape(-1)]
        return [indices.select(self.layer_axis, layer).reshape(-1) for layer in range(layers)]

    def join_layers(self, segments: list[torch.Tensor], shape: list[int]) -> torch.Tensor:
        """The inverse of ``split_layers``: segments -> indices of ``shape`` (its layer axis: len(segments))."""
        if self.layer_axis is None:
            return segments[0].reshape(shape)
        per_layer = shape[:self.layer_axis] + shape[self.layer_axis + 1:]
        return torch.stack([s.reshape(per_layer) for s in segments], dim=self.layer_axis)

    def codes_per_layer(self, shape: list[int]) -> int:
        return math.prod(s for a, s in enumerate(shape) if a != self.layer_axis)

