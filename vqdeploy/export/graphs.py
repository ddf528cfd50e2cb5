"""The frozen encoder and decoder graphs, and the input shapes they are exported with.

An encoder graph maps inputs (a quantizer's features, or a user network's raw input)
to integer indices; a decoder graph maps indices back to features (or through the
user's decoder network).  Both run the quantizers' pure eval ``encode``/``decode``,
which use only static-shape ops, so ``torch.onnx.export(dynamo=True)`` traces them
with dynamic batch, sequence and spatial axes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..registry import family_of

INDEX_DTYPES = {"int64": torch.int64, "int32": torch.int32}


def is_residual(quantizer: nn.Module) -> bool:
    """Residual and grouped quantizers: several layers, where -1 marks a dropped one."""
    return family_of(quantizer) in ("residual", "grouped")


def has_decoder(quantizer: nn.Module) -> bool:
    return family_of(quantizer) != "projection"


def _bandwidth_kwargs(quantizer: nn.Module, num_quantizers: int | None) -> dict:
    if num_quantizers is None:
        return {}
    if not is_residual(quantizer):
        raise ValueError(f"num_quantizers applies to residual quantizers, not {type(quantizer).__name__}")
    return {"num_quantizers": num_quantizers}


class EncoderGraph(nn.Module):
    """inputs -> [user encoder] -> quantizer.encode -> indices of ``index_dtype``."""

    def __init__(self, quantizer: nn.Module, encoder: nn.Module | None = None, index_dtype: torch.dtype = torch.int64,
                 num_quantizers: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.index_dtype = index_dtype
        self.kwargs = _bandwidth_kwargs(quantizer, num_quantizers)
        self.eval()

    def features(self, inputs: torch.Tensor) -> torch.Tensor:
        """The quantizer's input: the user encoder's output, or the inputs themselves."""
        return inputs if self.encoder is None else self.encoder(inputs)

    def indices(self, features: torch.Tensor) -> torch.Tensor:
        encode = getattr(self.quantizer, "export_encode", self.quantizer.encode)  # one tensor of indices
        return encode(features, **self.kwargs).to(self.index_dtype)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.indices(self.features(inputs))


class DecoderGraph(nn.Module):
    """indices -> quantizer.decode -> [user decoder] -> outputs.  Indices of -1 (dropped residual layers)
    decode to zero inside the quantizer, never through ONNX Gather's negative-index wrap."""

    def __init__(self, quantizer: nn.Module, decoder: nn.Module | None = None, num_quantizers: int | None = None):
        super().__init__()
        if not has_decoder(quantizer):
            raise ValueError(f"{type(quantizer).__name__} has no decoder (it only produces indices)")
        self.quantizer = quantizer
        self.decoder = decoder
        self.kwargs = _bandwidth_kwargs(quantizer, num_quantizers)
        self.eval()

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        decode = getattr(self.quantizer, "export_decode", self.quantizer.decode)
        features = decode(indices.long(), **self.kwargs)
        return features if self.decoder is None else self.decoder(features)


def index_dims(quantizer: nn.Module, num_quantizers: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The fixed sizes around an encoder's token axes: ``(leading, trailing)``, e.g. ((groups,), (k,)) for
    grouped residual indices (groups, b, *tokens, k), ((), (heads,)) for VectorQuantize with heads."""
    family = family_of(quantizer)
    if family == "grouped":
        return (quantizer.groups,), (num_quantizers or quantizer.num_quantizers,)
    if family == "residual":
        return (), (num_quantizers or quantizer.num_quantizers,)
    if family == "grid":
        return (), (quantizer.num_codebooks,) if quantizer.keep_num_codebooks_dim else ()
    if family == "hierarchical":  # one token sequence, every level's map in order
        return (), ()
    columns = quantizer.num_codebooks if family == "projection" else quantizer.heads
    return (), (columns,) if columns > 1 else ()


def feature_axis(quantizer: nn.Module, ndim: int) -> int:
    """Which axis of a quantizer's input holds the features (the one axis that is not dynamic)."""
    channel_first = (getattr(quantizer, "accept_image_fmap", False) or not getattr(quantizer, "channel_last", True)
                     or getattr(quantizer, "channel_first", False))
    image_like = ndim >= 4 and family_of(quantizer) == "grid" and quantizer.maps_channel_first
    return 1 if channel_first or image_like else ndim - 1


def default_example(quantizer: nn.Module) -> torch.Tensor:
    """A small input in the layout the quantizer expects (batch 2: torch.export specialises sizes 0 and 1)."""
    dim = quantizer.dim
    if family_of(quantizer) == "hierarchical":  # its finest level's size
        spatial = quantizer.level_shapes[-1]
        return torch.randn((2, dim, *spatial) if quantizer.channel_first else (2, *spatial, dim))
    if getattr(quantizer, "accept_3d_fmap", False):
        shape = (2, dim, 2, 3, 4)
    elif getattr(quantizer, "accept_image_fmap", False):
        shape = (2, dim, 3, 4)
    elif feature_axis(quantizer, 3) == 1:
        shape = (2, dim, 6)
    else:
        shape = (2, 6, dim)
    return torch.randn(shape)


def dynamic_input_axes(quantizer: nn.Module, example: torch.Tensor, wrapped: bool,
                       dynamic_axes: list[int] | None) -> list[int]:
    """The encoder input's dynamic axes: given, else every axis but the features (bare quantizers) or
    every axis but axis 1, the channels (wrapped networks, channel-first by convention)."""
    if dynamic_axes is not None:
        if any(not isinstance(a, int) or not -example.ndim <= a < example.ndim for a in dynamic_axes):
            raise ValueError(f"dynamic_axes must be axes of the {example.ndim}-D example, got {dynamic_axes}")
        axes = sorted({a % example.ndim for a in dynamic_axes})
    elif getattr(quantizer, "static_spatial", False):  # fixed-size pooling: only the batch can vary
        axes = [0]
    elif wrapped:
        axes = [a for a in range(example.ndim) if a != 1]
    else:
        axes = [a for a in range(example.ndim) if a != feature_axis(quantizer, example.ndim)]
    if 0 not in axes:
        raise ValueError(f"the batch axis 0 must be dynamic, got dynamic axes {axes}")
    small = [a for a in axes if example.shape[a] < 2]
    if small:  # torch.export fixes axes of size 0 and 1
        raise ValueError(f"dynamic axes need a size of at least 2 in the example; axes {small} of shape "
                         f"{tuple(example.shape)} are smaller")
    return axes


def grown(example: torch.Tensor, axes: list[int], factors: dict[int, int] | int) -> torch.Tensor:
    """A fresh random input with each of ``axes`` multiplied by its factor."""
    shape = list(example.shape)
    for axis in axes:
        shape[axis] *= factors if isinstance(factors, int) else factors[axis]
    return torch.randn(shape, dtype=example.dtype)


def dynamic_output_axes(graph: nn.Module, example: torch.Tensor, axes: list[int]) -> list[int]:
    """The axes of ``graph``'s output that follow the dynamic input axes: the ones whose size changes
    when every dynamic input axis doubles (batch and token axes, not codebooks or quantizers)."""
    with torch.no_grad():
        small, large = graph(example), graph(grown(example, axes, 2))
    return [a for a in range(small.ndim) if small.shape[a] != large.shape[a]]


def value_info(value) -> dict:
    """An ONNX graph input or output as the manifest records it: name, dtype, shape (ints or symbols)."""
    import onnx

    tensor = value.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}
