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

from ..checks import positive_int
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
    frequencies_file: Path | None = None  # read on first use, so a packed stream never depends on it
    _coder: RangeCoder | None = field(default=None, repr=False)

    @classmethod
    def from_bundle(cls, path: str | Path, manifest: dict | None = None) -> StreamSpec:
        from ..bundle_format import manifest_sha256, read_manifest

        path = Path(path)
        manifest = read_manifest(path) if manifest is None else manifest
        layout = CodeLayout.from_manifest(manifest)
        frequencies_file = path / FREQUENCIES_FILE if FREQUENCIES_FILE in manifest["files"] else None
        audio = manifest.get("audio") or {}
        return cls(layout, manifest_sha256(path), manifest["class"], None, audio.get("frame_rate"),
                   audio.get("sample_rate"), audio.get("channels"), frequencies_file)

    @property
    def hop(self) -> int | None:
        """An audio bundle's samples per token (None for other bundles)."""
        return round(self.sample_rate / self.frame_rate) if self.sample_rate and self.frame_rate else None

    @property
    def has_frequencies(self) -> bool:
        return self.frequencies is not None or self.frequencies_file is not None

    @property
    def coder(self) -> RangeCoder:
        """The range coder of the bundle's code frequencies (loaded and checked on first use: BundleError)."""
        if self._coder is None:
            if self.frequencies is None and self.frequencies_file is not None:
                self.frequencies = load_frequencies(self.frequencies_file, self.layout.layer_sizes)
            if self.frequencies is None:
                raise ValueError("entropy coding needs code frequencies: this bundle was exported without "
                                 "calibration data (export(..., calibration=inputs))")
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

    def reader(self, file, layers: int | None = None, fill_dropped: bool = True, *,
               max_frame_codes: int | None = None, max_codes: int | None = None) -> StreamReader:
        """A reader of ``file``; max_frame_codes / max_codes: the reader's limits (``StreamReader``)."""
        return StreamReader(self, file, layers, fill_dropped, max_frame_codes=max_frame_codes, max_codes=max_codes)

    def dumps(self, indices: torch.Tensor, layers: int | None = None, entropy_coding: bool = False,
              frame_tokens: int | None = None, samples: int | None = None) -> bytes:
        """The stream of one index tensor, as bytes."""
        buffer = io.BytesIO()
        with self.writer(buffer, layers, entropy_coding, frame_tokens) as writer:
            writer.write(indices)
            writer.samples = samples
        return buffer.getvalue()

    def loads(self, data: bytes, layers: int | None = None, fill_dropped: bool = True, *,
              max_frame_codes: int | None = None, max_codes: int | None = None) -> torch.Tensor:
        """The indices of a whole stream.  On damage, ``StreamError.partial`` holds the frames read before it."""
        reader = self.reader(io.BytesIO(data), layers, fill_dropped, max_frame_codes=max_frame_codes,
                             max_codes=max_codes)
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
        per_step = layout.codes_per_layer(list(frame.shape)) // max(steps, 1) * layout.layers  # all layers
        if per_step == 0:  # an empty batch: nothing to store, and readers refuse frames without codes
            return
        if per_step * steps > records.MAX_FRAME_CODES:  # readers refuse larger frames: split this one
            if per_step > records.MAX_FRAME_CODES:
                raise ValueError(f"one step of the frame axis holds {per_step:,} codes (all layers), more than a "
                                 f"frame may ({records.MAX_FRAME_CODES:,})")
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
    it have been yielded already.

    Every byte is untrusted: a frame's declared shape and segment sizes are checked before its bytes are read
    or anything is allocated for them.  Packed segments must be exactly their codes' size, a range-coded one
    can hold no more codes than its bytes allow under the layer's model (``RangeCoder.max_codes``), and two
    limits bound what one stream can make a reader allocate: ``max_frame_codes``, the codes one frame decodes
    to (all the layers returned; default ``records.MAX_FRAME_CODES``, 2^24, what writers split frames to), and
    ``max_codes``, the codes ``read_all`` gathers from the whole stream (default ``records.MAX_STREAM_CODES``,
    2^25, 256 MiB as int64; iterating frame by frame keeps one frame at a time and needs no such limit)."""

    def __init__(self, spec: StreamSpec, file, layers: int | None = None, fill_dropped: bool = True, *,
                 max_frame_codes: int | None = None, max_codes: int | None = None):
        self.spec = spec
        self.max_frame_codes = _limit("max_frame_codes", max_frame_codes, records.MAX_FRAME_CODES)
        self.max_codes = _limit("max_codes", max_codes, records.MAX_STREAM_CODES)
        self.records = records.RecordReader(file)
        self.header = self.records.header()
        self._check_header()
        self.stream_layers = self.header["layers"]
        if layers is not None and spec.layers_for(layers) > self.stream_layers:
            raise ValueError(f"the stream holds {self.stream_layers} layer(s); {layers} were asked for")
        self.layers = self.stream_layers if layers is None else layers
        self.fill_dropped = fill_dropped and spec.layout.layer_axis is not None
        self.end: dict | None = None
        self.frames = self.tokens = 0
        self._others: tuple[int, ...] | None = None  # the first frame's sizes on the other dynamic axes
        self._budget: int | None = None  # codes read_all may still gather (None: frame by frame, no total)

    def _check_header(self) -> None:
        header, spec = self.header, self.spec
        if header.get("format") != FORMAT:
            raise StreamError(f"the header names format {header.get('format')!r}, not {FORMAT!r}", 10, "format")
        if header.get("bundle") != spec.bundle_id:
            raise StreamError(f"the stream was written by another bundle (manifest sha256 "
                              f"{str(header.get('bundle'))[:16]}..., this bundle's is {spec.bundle_id[:16]}...)",
                              10, "bundle")
        if header.get("layout") != spec.layout.to_json():
            raise StreamError(f"the stream's index layout {str(header.get('layout'))[:200]} is not this bundle's "
                              f"{spec.layout.to_json()}", 10, "layout")
        layers = header.get("layers")
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= spec.layout.layers:
            raise StreamError(f"the header's layer count {str(layers)[:40]} is not in [1, {spec.layout.layers}]", 10,
                              "layers")
        if header.get("coding") not in ("packed", "entropy"):
            raise StreamError(f"unknown coding {str(header.get('coding'))[:40]!r}", 10, "coding")

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
            frame = self.records.frame_fields(len(layout.shape), self.stream_layers)
            count = self._check_frame(frame)
            yield self._decode_frame(frame, self.records.frame_payload(frame), count)
            self.frames += 1
            self.tokens += frame.shape[layout.frame_axis]

    def _finish(self) -> None:
        end_offset = self.records.offset - 1
        self.end = self.records.end()
        if self.end["frames"] != self.frames:
            raise StreamError(f"the end record counts {self.end['frames']} frames, the stream holds {self.frames}",
                              end_offset, "end record frames")
        if self.end["tokens"] != self.tokens:
            raise StreamError(f"the end record counts {self.end['tokens']} steps of the frame axis, the frames hold "
                              f"{self.tokens}", end_offset, "end record tokens")
        samples, hop = self.end["samples"], self.spec.hop
        if samples is not None and hop and -(-samples // hop) != self.tokens:
            raise StreamError(f"the end record counts {samples} samples, which {self.tokens} tokens of {hop} samples "
                              "cannot hold (the last token pads less than one)", end_offset, "end record samples")
        if self.records.tag() is not None:
            raise StreamError("unexpected bytes after the end record", self.records.offset - 1, "end of stream")

    def _check_frame(self, frame: records.FrameFields) -> int:
        """The frame's codes a layer, once its shape and declared segment sizes are known to be possible (and
        within the limits): nothing of its payload has been read yet."""
        layout, shape, start = self.spec.layout, frame.shape, frame.start
        try:
            layout.check_shape(tuple(shape), self.stream_layers)
        except ValueError as error:
            raise StreamError(f"frame shape {shape}: {error}", start + 1, "frame shape") from None
        count = layout.codes_per_layer(shape)
        if count == 0:
            raise StreamError(f"frame shape {shape} holds no codes (writers never write such a frame)", start + 1,
                              "frame shape")
        others = tuple(size for axis, size in enumerate(shape)
                       if layout.shape[axis] is None and axis != layout.frame_axis)
        if self._others is not None and others != self._others:
            raise StreamError(f"frame shape {shape} does not continue the stream's earlier frames (their sizes "
                              f"{list(self._others)} on the dynamic axes other than the frame axis)", start + 1,
                              "frame shape")
        self._others = others
        decoded = count * (layout.layers if self.fill_dropped else self.layers)
        if decoded > self.max_frame_codes:
            raise StreamError(f"frame shape {shape} decodes to {decoded:,} codes, beyond max_frame_codes="
                              f"{self.max_frame_codes:,} (a reader argument)", start + 1, "frame shape")
        if self._budget is not None:
            if decoded > self._budget:
                raise StreamError(f"the stream holds more than max_codes={self.max_codes:,} codes (a reader "
                                  "argument; or read it frame by frame)", start, "frame shape")
            self._budget -= decoded
        for layer, (coding, size) in enumerate(frame.sizes):
            self._check_segment(layer, coding, size, count, start)
        return count

    def _check_segment(self, layer: int, coding: int, size: int, count: int, start: int) -> None:
        packed = packed_size(count, self.spec.layout.layer_bits[layer])
        if coding == records.PACKED:
            if size != packed:
                raise StreamError(f"{_field(layer, start)} holds {size} bytes, {count} codes of "
                                  f"{self.spec.layout.layer_bits[layer]} bits take {packed}", start, "layer size")
        elif coding == records.RANGE_CODED:
            if size >= packed:  # writers range-code a segment only when that is smaller
                raise StreamError(f"{_field(layer, start)} is range-coded in {size} bytes, no fewer than packing "
                                  f"takes ({packed})", start, "layer size")
            if layer >= self.layers:  # skipped: read for the checksum only
                return
            if not self.spec.has_frequencies:
                raise StreamError(f"{_field(layer, start)} is entropy-coded but this bundle has no code frequencies",
                                  start, "layer coding")
            bound = self.spec.coder.max_codes(layer, size)
            if count > bound:
                raise StreamError(f"{_field(layer, start)} declares {count} codes in {size} range-coded bytes, more "
                                  f"than they can hold under the layer's model ({bound})", start, "layer size")
        else:
            raise StreamError(f"{_field(layer, start)} has unknown coding {coding}", start, "layer coding")

    def _decode_frame(self, frame: records.FrameFields, segments: list[tuple[int, bytes]], count: int) -> torch.Tensor:
        layout = self.spec.layout
        codes = []
        for layer, (coding, data) in enumerate(segments[:self.layers]):
            codes.append(torch.from_numpy(self._decode_segment(layer, coding, data, count, frame.start)))
        if self.fill_dropped and self.layers < layout.layers:
            codes += [torch.full((count,), -1, dtype=torch.long)] * (layout.layers - self.layers)
        out_shape = list(frame.shape)
        if layout.layer_axis is not None:
            out_shape[layout.layer_axis] = len(codes)
        return layout.join_layers(codes, out_shape)

    def _decode_segment(self, layer: int, coding: int, data: bytes, count: int, start: int) -> np.ndarray:
        size = self.spec.layout.layer_sizes[layer]
        if coding == records.PACKED:
            codes = unpack(data, self.spec.layout.layer_bits[layer], count)
        else:
            try:
                codes = self.spec.coder.decode(layer, data, count)
            except ValueError as error:
                raise StreamError(f"{_field(layer, start)} does not decode: {error}", start, "layer data") from None
        if codes.size and (codes.min() < 0 or codes.max() >= size):
            raise StreamError(f"{_field(layer, start)} decodes to codes outside [0, {size - 1}]", start, "layer data")
        return codes

    def read_all(self) -> torch.Tensor:
        """Every frame, joined along the frame axis (a stream of no frames gives an empty tensor, 0 on every
        dynamic axis), at most ``max_codes`` codes; on damage the StreamError carries the frames before it
        (None if there were none)."""
        frames = []
        self._budget = self.max_codes
        try:
            for frame in self:
                frames.append(frame)
        except StreamError as error:
            error.partial = torch.cat(frames, dim=self.spec.layout.frame_axis) if frames else None
            error.frames_read = len(frames)
            raise
        finally:
            self._budget = None
        if not frames:
            layout = self.spec.layout
            layers = layout.layers if self.fill_dropped else self.layers
            others = tuple(0 for a, size in enumerate(layout.shape) if size is None and a != layout.frame_axis)
            return torch.empty(layout.frame_shape(0, others, layers), dtype=torch.long)
        return torch.cat(frames, dim=self.spec.layout.frame_axis)


def _field(layer: int, start: int) -> str:
    return f"layer {layer} of the frame at offset {start}"


def _limit(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    positive_int(name, value)
    return value
