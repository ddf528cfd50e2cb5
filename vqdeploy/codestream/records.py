"""The byte layout of a code stream, little-endian throughout:

    header  b"VQCS" | version u16 | length u32 | JSON (length bytes) | crc32 u32
    frame   b"F" | shape: ndim x u32 | per layer: coding u8, size u32 | crc32 u32 | the layers' bytes, in order
    end     b"E" | frames u64 | tokens u64 | samples i64 (-1: unknown) | crc32 u32

Each crc32 covers its record from its first byte up to the checksum, and for a frame the layer bytes after it.
The end record makes truncation at a frame boundary visible.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"VQCS"
VERSION = 1
FRAME_TAG = b"F"
END_TAG = b"E"
PACKED, RANGE_CODED = 0, 1
MAX_HEADER_BYTES = 1 << 20
MAX_FRAME_CODES = 1 << 24  # codes one frame decodes to, all layers together (128 MiB as int64): writers split
MAX_STREAM_CODES = 1 << 25  # codes a whole-stream read (``loads``, ``read_all``) returns, all layers together
READ_BLOCK = 1 << 20  # reads go in blocks of this size: a forged length allocates only the bytes that exist

_PREFIX = struct.Struct("<4sHI")
_CRC = struct.Struct("<I")
_SEGMENT = struct.Struct("<BI")
_END = struct.Struct("<QQq")


class StreamError(ValueError):
    """A code stream that cannot be read: the offset and the field where reading stopped, and what was decoded
    before it (``partial``: the indices of the frames read, or None)."""

    def __init__(self, message: str, offset: int, field: str, partial=None, frames_read: int = 0):
        super().__init__(f"{message} (offset {offset}, field {field!r})")
        self.message = message
        self.offset, self.field, self.partial, self.frames_read = offset, field, partial, frames_read


@dataclass(frozen=True)
class FrameFields:
    """A frame record's fixed fields: its offset, shape, (coding, size) per layer, and the crc32 so far and
    the one stored."""

    start: int
    shape: list[int]
    sizes: list[tuple[int, int]]
    fields_crc: int
    checksum: int


def header_bytes(header: dict) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    record = _PREFIX.pack(MAGIC, VERSION, len(body)) + body
    return record + _CRC.pack(zlib.crc32(record))


def frame_bytes(shape: list[int], segments: list[tuple[int, bytes]]) -> bytes:
    fields = FRAME_TAG + struct.pack(f"<{len(shape)}I", *shape) + b"".join(
        _SEGMENT.pack(coding, len(data)) for coding, data in segments)
    payload = b"".join(data for _, data in segments)
    return fields + _CRC.pack(zlib.crc32(payload, zlib.crc32(fields))) + payload


def end_bytes(frames: int, tokens: int, samples: int | None) -> bytes:
    record = END_TAG + _END.pack(frames, tokens, -1 if samples is None else samples)
    return record + _CRC.pack(zlib.crc32(record))


class RecordReader:
    """Reads records from a binary file-like object, keeping the offset for errors."""

    def __init__(self, file):
        self.file = file
        self.offset = 0

    def exact(self, size: int, what: str) -> bytes:
        """``size`` bytes, read a block at a time (a pipe or socket may return less than asked before its end,
        and a declared size is only trusted as far as bytes arrive)."""
        first = self.file.read(min(size, READ_BLOCK)) if size else b""
        if len(first) == size:  # the usual case: all of it at once
            self.offset += size
            return first
        blocks, received = [first], len(first)
        while received < size:
            more = self.file.read(min(size - received, READ_BLOCK))
            if not more:
                raise StreamError(f"the stream ends inside the {what}: {received} of {size} bytes",
                                  self.offset + received, what)
            blocks.append(more)
            received += len(more)
        self.offset += size
        return b"".join(blocks)

    def header(self) -> dict:
        prefix = self.exact(_PREFIX.size, "header")
        magic, version, length = _PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise StreamError(f"not a vqdeploy code stream (starts with {magic!r}, expected {MAGIC!r})", 0, "magic")
        if version > VERSION or version < 1:
            raise StreamError(f"code stream format version {version}; this vqdeploy reads version {VERSION} "
                              "(upgrade vqdeploy to read newer streams)", 4, "version")
        if length > MAX_HEADER_BYTES:
            raise StreamError(f"header length {length} is beyond {MAX_HEADER_BYTES} bytes", 6, "header length")
        body = self.exact(length, "header")
        self._check_crc(prefix + body, "header checksum")
        try:
            header = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StreamError(f"the header is not valid JSON: {error}", _PREFIX.size, "header") from None
        except RecursionError:
            raise StreamError("the header's JSON is nested too deeply", _PREFIX.size, "header") from None
        if not isinstance(header, dict):
            raise StreamError("the header is not a JSON object", _PREFIX.size, "header")
        return header

    def tag(self) -> bytes | None:
        """The next record's tag, or None at a clean end of file."""
        tag = self.file.read(1)
        if tag:
            self.offset += 1
        return tag or None

    def frame_fields(self, ndim: int, layers: int) -> FrameFields:
        """After a frame tag: its shape and each layer's (coding, size), not yet trusted: the caller checks the
        sizes against the shape before ``frame_payload`` reads them."""
        start = self.offset - 1
        fields = self.exact(4 * ndim + _SEGMENT.size * layers, f"frame at offset {start}")
        shape = list(struct.unpack_from(f"<{ndim}I", fields))
        sizes = [_SEGMENT.unpack_from(fields, 4 * ndim + _SEGMENT.size * i) for i in range(layers)]
        checksum = _CRC.unpack(self.exact(_CRC.size, f"frame at offset {start}"))[0]
        return FrameFields(start, shape, sizes, zlib.crc32(fields, zlib.crc32(FRAME_TAG)), checksum)

    def frame_payload(self, frame: FrameFields) -> list[tuple[int, bytes]]:
        """The frame's segments, [(coding, bytes)] per layer, once its checksum holds."""
        payload = self.exact(sum(size for _, size in frame.sizes), f"frame at offset {frame.start}")
        if zlib.crc32(payload, frame.fields_crc) != frame.checksum:
            raise StreamError(f"the frame at offset {frame.start} is damaged (checksum mismatch)", frame.start,
                              "frame checksum")
        segments, position = [], 0
        for coding, size in frame.sizes:
            segments.append((coding, payload[position:position + size]))
            position += size
        return segments

    def end(self) -> dict:
        start = self.offset - 1
        body = self.exact(_END.size, "end record")
        self._check_crc(END_TAG + body, "end record checksum", start)
        frames, tokens, samples = _END.unpack(body)
        return {"frames": frames, "tokens": tokens, "samples": None if samples < 0 else samples}

    def _check_crc(self, record: bytes, field: str, start: int = 0) -> None:
        checksum = _CRC.unpack(self.exact(_CRC.size, field))[0]
        if zlib.crc32(record) != checksum:
            raise StreamError(f"the {field.replace(' checksum', '')} is damaged (checksum mismatch)", start, field)
