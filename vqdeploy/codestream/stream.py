"""Writing and reading code streams for a bundle: the bundle's index layout, its code frequencies and its
identity (the sha256 of its manifest, which hashes every file) make a ``StreamSpec``; writers and readers take it.

    spec = StreamSpec.from_bundle("bundle/")
    data = spec.dumps(indices, entropy_coding=True)          # bytes
    indices = spec.loads(data, layers=2)                     # the first 2 layers, the others -1 (dropped)
    with open("codes.vqc", "wb") as f, spec.writer(f) as writer:
        for chunk in chunks: writer.write(chunk)             # frames go out as they are produced
    with open("codes.vqc", "rb") as f:
        for frame in spec.reader(f): ...                     # and are read as they arrive
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import records
from .bitpack import pack, packed_size, unpack
from .entropy import FREQUENCIES_FILE, RangeCoder, load_frequencies
from .layout import CodeLayout
from .records import StreamError

FORMAT = "vqdeploy-codes"
DEFAULT_FRAME_TOKENS = 1024


@dataclass
class StreamSpec:
    """What writing and reading a bundle's streams needs.  bundle_id: the sha256 of the bundle's manifest.json;
    frequencies: per-layer code counts for entropy coding (None: packing only); frame_rate, sample_rate,
    channels: an audio bundle's (None otherwise)."""

    layout: CodeLayout
    bundle_id: str
    bundle_class: str = ""
    frequencies: list[np.ndarray] | None = None
    frame_rate: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    _coder: RangeCoder | None = field(default=None, repr=False)

    @classmethod
    def from_bundle(cls, path: str | Path, manifest: dict | None = None) -> StreamSpec:
        from ..export.bundle import manifest_sha256, read_manifest

        path = Path(path)
        manifest = read_manifest(path) if manifest is None else manifest
        layout = CodeLayout.from_manifest(manifest)
        frequencies = None
        if FREQUENCIES_FILE in manifest["files"]:
            frequencies = load_frequencies(path / FREQUENCIES_FILE, layout.layer_sizes)
        audio = manifest.get("audio") or {}
        return cls(layout, manifest_sha256(path), manifest["class"],
                   frequencies, audio.get("frame_rate"), audio.get("sample_rate"), audio.get("channels"))

    @property
    def coder(self) -> RangeCoder:
        if self.frequencies is None:
            raise ValueError("entropy coding needs code frequencies: this bundle was exported without calibration "
                             "data (export(..., calibration=inputs))")
        if self._coder is None:
            self._coder = RangeCoder(self.frequencies)
        return self._coder

    def header(self, layers: int, entropy_coding: bool) -> dict:
        return {"format": FORMAT, "bundle": self.bundle_id, "class": self.bundle_class,
                "layout": self.layout.to_json(), "layers": layers, "layer_bits": list(self.layout.layer_bits[:layers]),
                "coding": "entropy" if entropy_coding else "packed", "frame_rate": self.frame_rate,
                "sample_rate": self.sample_rate, "channels": self.channels}

    def layers_for(self, layers: int | None) -> int:
        if layers is None:
            return self.layout.layers
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= self.layout.layers:
            raise ValueError(f"layers must be an int in [1, {self.layout.layers}], got {layers!r}")
        return layers

    def writer(self, file, layers: int | None = None, entropy_coding: bool = False,
               frame_tokens: int | None = None) -> StreamWriter:
        return StreamWriter(self, file, layers, entropy_coding, frame_tokens)

    def reader(self, file, layers: int | None = None, fill_dropped: bool = True) -> StreamReader:
        return StreamReader(self, file, layers, fill_dropped)

    def dumps(self, indices: torch.Tensor, layers: int | None = None, entropy_coding: bool = False,
              frame_tokens: int | None = None, samples: int | None = None) -> bytes:
        """The stream of one index tensor, as bytes."""
        buffer = io.BytesIO()
        with self.writer(buffer, layers, entropy_coding, frame_tokens) as writer:
            writer.write(indices)
            writer.samples = samples
        return buffer.getvalue()

    def loads(self, data: bytes, layers: int | None = None, fill_dropped: bool = True) -> torch.Tensor:
        """The indices of a whole stream.  On damage, ``StreamError.partial`` holds the frames read before it."""
        reader = self.reader(io.BytesIO(data), layers, fill_dropped)
        return reader.read_all()

    def bits_per_frame_token(self, layers: int | None = None) -> int:
        """Packed bits per step of the frame axis for one item (one batch row)."""
        layers = self.layers_for(layers)
        shape = [1 if s is None else s for s in self.layout.shape]
        per_step = self.layout.codes_per_layer(shape)
        return per_step * sum(self.layout.layer_bits[:layers])


class StreamWriter:
    """Writes the header now, a frame each time ``frame_tokens`` steps have come in through ``write``, and the
    last frame and the end record on ``close`` (or on leaving a ``with`` block without an exception: a stream
    cut short by an error keeps no end record, so readers see it as truncated).  ``samples``: an audio stream's
    sample count, for the end record."""

    def __init__(self, spec: StreamSpec, file, layers: int | None, entropy_coding: bool, frame_tokens: int | None):
        self.spec, self.file = spec, file
        self.layers = spec.layers_for(layers)
        self.coder = spec.coder if entropy_coding else None
        if frame_tokens is not None and (not isinstance(frame_tokens, int) or frame_tokens < 1):
            raise ValueError(f"frame_tokens must be a positive int, got {frame_tokens!r}")
        if frame_tokens is None:
            frame_tokens = round(spec.frame_rate) if spec.frame_rate else DEFAULT_FRAME_TOKENS
        self.frame_tokens = max(frame_tokens, 1)
        self.frames = self.tokens = self.bytes_written = 0
        self.samples: int | None = None
        self.closed = False
        self._pending: torch.Tensor | None = None  # steps not yet a whole frame
        self._put(records.header_bytes(spec.header(self.layers, entropy_coding)))

    def write(self, indices: torch.Tensor) -> None:
        """Indices of the bundle's layout (all layers, or exactly the written ones on the layer axis)."""
        if self.closed:
            raise ValueError("write to a closed stream")
        layout = self.spec.layout
        written = self.layers if layout.layer_axis is not None and indices.ndim == len(layout.shape) and \
            indices.shape[layout.layer_axis] == self.layers else None
        layout.check(indices, written)
        indices = indices.detach().long().cpu()
        if layout.layer_axis is not None:
            indices = indices.narrow(layout.layer_axis, 0, self.layers)
        if self._pending is not None:
            if layout.other_dynamic_sizes(indices) != layout.other_dynamic_sizes(self._pending):
                raise ValueError(f"indices of shape {tuple(indices.shape)} do not continue the stream's "
                                 f"{tuple(self._pending.shape)} (only the frame axis {layout.frame_axis} may differ)")
            indices = torch.cat([self._pending, indices], dim=layout.frame_axis)
        whole = indices.shape[layout.frame_axis] // self.frame_tokens * self.frame_tokens
        for start in range(0, whole, self.frame_tokens):
            self._write_frame(indices.narrow(layout.frame_axis, start, self.frame_tokens))
        self._pending = indices.narrow(layout.frame_axis, whole, indices.shape[layout.frame_axis] - whole)

    def _write_frame(self, frame: torch.Tensor) -> None:
        layout = self.spec.layout
        steps = frame.shape[layout.frame_axis]
        per_step = layout.codes_per_layer(list(frame.shape)) // max(steps, 1)
        if per_step * steps > records.MAX_FRAME_CODES:  # readers refuse larger frames: split this one
            if per_step > records.MAX_FRAME_CODES:
                raise ValueError(f"one step of the frame axis holds {per_step:,} codes a layer, more than a frame "
                                 f"may ({records.MAX_FRAME_CODES:,})")
            for part in frame.split(records.MAX_FRAME_CODES // per_step, dim=layout.frame_axis):
                self._write_frame(part)
            return
        segments = []
        for layer, codes in enumerate(layout.split_layers(frame, self.layers)):
            size = layout.layer_sizes[layer]
            codes = codes.numpy()
            if codes.size and (codes.min() < 0 or codes.max() >= size):
                kind = "a dropped layer (-1) cannot be written: write fewer layers" if codes.min() == -1 else \
                    f"codes must lie in [0, {size - 1}]"
                raise ValueError(f"layer {layer}: {kind}; found [{codes.min()}, {codes.max()}]")
            segments.append(self._segment(layer, codes))
        self._put(records.frame_bytes(list(frame.shape), segments))
        self.frames += 1
        self.tokens += steps

    def _segment(self, layer: int, codes: np.ndarray) -> tuple[int, bytes]:
        packed = pack(codes, self.spec.layout.layer_bits[layer])
        if self.coder is not None and self.coder.codes_layer(layer):
            coded = self.coder.encode(layer, codes)
            if len(coded) < len(packed):  # never worse than packing
                return records.RANGE_CODED, coded
        return records.PACKED, packed

    def _put(self, data: bytes) -> None:
        self.file.write(data)
        self.bytes_written += len(data)

    def close(self) -> None:
        if not self.closed:
            if self._pending is not None and self._pending.shape[self.spec.layout.frame_axis]:
                self._write_frame(self._pending)
            self._pending = None
            self._put(records.end_bytes(self.frames, self.tokens, self.samples))
            self.closed = True

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()


class StreamReader:
    """Reads and checks the header now; iterating yields each frame's indices as it arrives (the first ``layers``
    layers; with ``fill_dropped`` the rest are -1, as a residual decoder takes them).  ``end`` holds the end
    record after a complete read.  Damage raises ``StreamError`` naming the offset and field: the frames before
    it have been yielded already."""

    def __init__(self, spec: StreamSpec, file, layers: int | None = None, fill_dropped: bool = True):
        self.spec = spec
        self.records = records.RecordReader(file)
        self.header = self.records.header()
        self._check_header()
        self.stream_layers = self.header["layers"]
        if layers is not None and spec.layers_for(layers) > self.stream_layers:
            raise ValueError(f"the stream holds {self.stream_layers} layer(s); {layers} were asked for")
        self.layers = self.stream_layers if layers is None else layers
        self.fill_dropped = fill_dropped and spec.layout.layer_axis is not None
        self.end: dict | None = None
        self.frames = 0

    def _check_header(self) -> None:
        header, spec = self.header, self.spec
        if header.get("format") != FORMAT:
            raise StreamError(f"the header names format {header.get('format')!r}, not {FORMAT!r}", 10, "format")
        if header.get("bundle") != spec.bundle_id:
            raise StreamError(f"the stream was written by another bundle (manifest sha256 "
                              f"{str(header.get('bundle'))[:16]}..., this bundle's is {spec.bundle_id[:16]}...)",
                              10, "bundle")
        if header.get("layout") != spec.layout.to_json():
            raise StreamError(f"the stream's index layout {header.get('layout')} is not this bundle's "
                              f"{spec.layout.to_json()}", 10, "layout")
        layers = header.get("layers")
        if not isinstance(layers, int) or not 1 <= layers <= spec.layout.layers:
            raise StreamError(f"the header's layer count {layers!r} is not in [1, {spec.layout.layers}]", 10, "layers")
        if header.get("coding") not in ("packed", "entropy"):
            raise StreamError(f"unknown coding {header.get('coding')!r}", 10, "coding")

    def __iter__(self):
        layout = self.spec.layout
        while True:
            tag = self.records.tag()
            if tag is None:
                raise StreamError(f"the stream ends after frame {self.frames} without its end record (truncated)",
                                  self.records.offset, "end record", frames_read=self.frames)
            if tag == records.END_TAG:
                self._finish()
                return
            if tag != records.FRAME_TAG:
                raise StreamError(f"unexpected record tag {tag!r}", self.records.offset - 1, "record tag")
            shape, segments, start = self.records.frame(len(layout.shape), self.stream_layers)
            yield self._decode_frame(shape, segments, start)
            self.frames += 1

    def _finish(self) -> None:
        end_offset = self.records.offset - 1
        self.end = self.records.end()
        if self.end["frames"] != self.frames:
            raise StreamError(f"the end record counts {self.end['frames']} frames, the stream holds {self.frames}",
                              end_offset, "end record frames")
        if self.records.tag() is not None:
            raise StreamError("unexpected bytes after the end record", self.records.offset - 1, "end of stream")

    def _decode_frame(self, shape: list[int], segments: list[tuple[int, bytes]], start: int) -> torch.Tensor:
        layout = self.spec.layout
        try:
            layout.check_shape(tuple(shape), self.stream_layers)
        except ValueError as error:
            raise StreamError(f"frame shape {shape}: {error}", start + 1, "frame shape") from None
        count = layout.codes_per_layer(shape)
        if count > records.MAX_FRAME_CODES:
            raise StreamError(f"frame shape {shape} holds {count:,} codes a layer, beyond "
                              f"{records.MAX_FRAME_CODES:,}", start + 1, "frame shape")
        codes = []
        for layer, (coding, data) in enumerate(segments[:self.layers]):
            codes.append(torch.from_numpy(self._decode_segment(layer, coding, data, count, start)))
        if self.fill_dropped and self.layers < layout.layers:
            codes += [torch.full((count,), -1, dtype=torch.long)] * (layout.layers - self.layers)
        out_shape = list(shape)
        if layout.layer_axis is not None:
            out_shape[layout.layer_axis] = len(codes)
        return layout.join_layers(codes, out_shape)

    def _decode_segment(self, layer: int, coding: int, data: bytes, count: int, start: int) -> np.ndarray:
        bits, size = self.spec.layout.layer_bits[layer], self.spec.layout.layer_sizes[layer]
        field = f"layer {layer} of the frame at offset {start}"
        if coding == records.PACKED:
            if len(data) != packed_size(count, bits):
                raise StreamError(f"{field} holds {len(data)} bytes, {count} codes of {bits} bits take "
                                  f"{packed_size(count, bits)}", start, "layer size")
            codes = unpack(data, bits, count)
        elif coding == records.RANGE_CODED:
            if self.spec.frequencies is None:
                raise StreamError(f"{field} is entropy-coded but this bundle has no code frequencies", start,
                                  "layer coding")
            try:
                codes = self.spec.coder.decode(layer, data, count)
            except (ValueError, RuntimeError) as error:
                raise StreamError(f"{field} does not decode: {error}", start, "layer data") from None
        else:
            raise StreamError(f"{field} has unknown coding {coding}", start, "layer coding")
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise StreamError(f"{field} decodes to codes outside [0, {size - 1}]", start, "layer data")
        return codes

    def read_all(self) -> torch.Tensor:
        """Every frame, joined along the frame axis (a stream of no frames gives an empty tensor, 0 on every
        dynamic axis); on damage the StreamError carries the frames before it (None if there were none)."""
        frames = []
        try:
            for frame in self:
                frames.append(frame)
        except StreamError as error:
            error.partial = torch.cat(frames, dim=self.spec.layout.frame_axis) if frames else None
            error.frames_read = len(frames)
            raise
        if not frames:
            layout = self.spec.layout
            layers = layout.layers if self.fill_dropped else self.layers
            others = tuple(0 for a, size in enumerate(layout.shape) if size is None and a != layout.frame_axis)
            return torch.empty(layout.frame_shape(0, others, layers), dtype=torch.long)
        return torch.cat(frames, dim=self.spec.layout.frame_axis)
