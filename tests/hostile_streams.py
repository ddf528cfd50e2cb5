"""Hostile code streams, and a worker that decodes them under an address-space limit.

``python tests/hostile_streams.py GROUP`` imports what decoding needs, then caps its own address space at what
the imports took plus ``HEADROOM`` (1 GiB) with ``resource.RLIMIT_AS``, decodes every case of GROUP from a file
(the path ``vqdeploy decompress`` takes) and from bytes, and prints one JSON line per case: the outcome
(``ok``, ``StreamError``, ``BundleError`` or another exception's type), the message, and for ``ok`` whether
the indices equal the case's expected ones.  A case whose decode asks for more memory than the cap gets a
``MemoryError`` outcome, and a crash ends the worker: either fails tests/test_codestream_hostile.py.

Every stream is rebuilt here with its checksums recomputed after the edit, so that only the reader's own checks
stand between a forged field and an allocation.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from vqdeploy.codestream import CodeLayout, StreamError, StreamSpec, measure_frequencies  # noqa: E402
from vqdeploy.codestream import records  # noqa: E402
from vqdeploy.export.bundle import BundleError  # noqa: E402

HEADROOM = 1 << 30
# a residual layout with a 10-bit, a 7-bit and a 1-bit layer; an audio stream (hop 8), so samples are checked
LAYOUT = CodeLayout((None, None, 3), 1, 2, (1024, 100, 2))
ZERO_BITS = CodeLayout((None, None, 2), 1, 2, (1, 1))  # every code costs nothing packed: only limits bound it


def skewed(size: int, shape, generator) -> torch.Tensor:
    """Codes in [0, size) with geometric weights (so entropy coding has something to gain)."""
    u = torch.rand(shape, generator=generator)
    return (torch.log1p(-u * (1 - 0.9 ** size)) / np.log(0.9)).long().clamp(max=size - 1)


def indices(layout: CodeLayout, batch: int, steps: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([skewed(k, (batch, steps), generator) for k in layout.layer_sizes], dim=-1)


def spec(layout: CodeLayout = LAYOUT, frequencies_file: Path | None = None) -> StreamSpec:
    made = StreamSpec(layout, "c" * 64, "ResidualVQ", frame_rate=2000.0, sample_rate=16000, channels=1,
                      frequencies_file=frequencies_file)
    if frequencies_file is None:
        made.frequencies = measure_frequencies([indices(layout, 1, 4000, 0)], layout)
    return made


# ---------------------------------------------------------------------------------------------- stream surgery

@dataclass
class Frame:
    shape: list[int]
    segments: list[tuple[int, bytes]]
    sizes: list[int] | None = None  # declared sizes, when forged (default: the segments' lengths)


@dataclass
class Stream:
    """A stream taken apart into fields that can be edited and put back with valid checksums."""

    header: bytes  # the JSON body
    frames: list[Frame]
    end: tuple[int, int, int] | None
    version: int = records.VERSION
    header_length: int | None = None  # declared, when forged
    tail: bytes = b""
    extra: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, ndim: int, layers: int) -> Stream:
        _, version, length = struct.unpack_from("<4sHI", data)
        position = 10 + length + 4
        stream = cls(data[10:10 + length], [], None, version)
        while position < len(data):
            tag = data[position:position + 1]
            position += 1
            if tag == b"E":
                stream.end = struct.unpack_from("<QQq", data, position)
                position += 24 + 4
                continue
            shape = list(struct.unpack_from(f"<{ndim}I", data, position))
            position += 4 * ndim
            sizes = [struct.unpack_from("<BI", data, position + 5 * i) for i in range(layers)]
            position += 5 * layers + 4
            segments = []
            for coding, size in sizes:
                segments.append((coding, data[position:position + size]))
                position += size
            stream.frames.append(Frame(shape, segments))
        return stream

    def bytes(self) -> bytes:
        body = self.header
        prefix = struct.pack("<4sHI", records.MAGIC, self.version,
                             len(body) if self.header_length is None else self.header_length)
        out = prefix + body + struct.pack("<I", zlib.crc32(prefix + body))
        for frame in self.frames:
            sizes = frame.sizes or [len(data) for _, data in frame.segments]
            fields = b"F" + struct.pack(f"<{len(frame.shape)}I", *frame.shape) + b"".join(
                struct.pack("<BI", coding, size) for (coding, _), size in zip(frame.segments, sizes))
            payload = b"".join(data for _, data in frame.segments)
            out += fields + struct.pack("<I", zlib.crc32(payload, zlib.crc32(fields))) + payload
        if self.end is not None:
            record = b"E" + struct.pack("<QQq", *self.end)
            out += record + struct.pack("<I", zlib.crc32(record))
        return out + self.tail

    def with_header(self, **changes) -> Stream:
        header = json.loads(self.header)
        header.update(changes)
        return Stream(json.dumps(header).encode(), self.frames, self.end, self.version)


# ---------------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    data: bytes
    expected: torch.Tensor | None = None  # the exact result a decode may give instead of an error
    spec: str = "layout"  # which spec decodes it: "layout", "zero_bits", or a frequencies file's variant
    garbage: bool = False  # well-formed records around forged codes: decoding them to codes in range is right


def base_streams() -> dict[str, tuple[bytes, torch.Tensor]]:
    """Small valid streams: packed and range-coded, 3 frames of 50 steps and one of 20."""
    made, codes = spec(), indices(LAYOUT, 1, 170, 1)
    return {coding: (made.dumps(codes, entropy_coding=coding == "entropy", frame_tokens=50, samples=170 * 8 - 3),
                     codes) for coding in ("packed", "entropy")}


def damage_cases() -> list[Case]:
    """Every truncation point and a flipped bit at every byte of both base streams."""
    cases = []
    for coding, (data, _) in base_streams().items():
        cases += [Case(f"{coding} cut at {n}", data[:n]) for n in range(len(data))]
        cases += [Case(f"{coding} bit {i % 8} of byte {i}", data[:i] + bytes([data[i] ^ (1 << i % 8)]) + data[i + 1:])
                  for i in range(len(data))]
    return cases


def field_cases() -> list[Case]:
    """Header, frame and end fields edited to huge, zero, negative, nested and mismatched values."""
    cases = []
    for coding, (data, codes) in base_streams().items():
        base = Stream.parse(data, 3, 3)

        def edited(name, stream, expected=None, garbage=False):
            cases.append(Case(f"{coding}: {name}", stream.bytes(), expected, garbage=garbage))

        edited("unchanged", base, codes)
        for layers in (0, -1, 4, 2 ** 40, "3", True, None, [3], 2.5):
            edited(f"header layers {layers!r}", base.with_header(layers=layers))
        edited("header layout of another bundle", base.with_header(layout={"shape": [None, None, 9]}))
        edited("header coding 'zstd'", base.with_header(coding="zstd"))
        edited("header bundle a number", base.with_header(bundle=7))
        deep = Stream(b"[" * 100_000 + b"]" * 100_000, base.frames, base.end)
        edited("header JSON 100,000 levels deep", deep)
        nested = Stream(b'{"layers": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", base.frames, base.end)
        edited("header field nested 50,000 levels", nested)
        edited("header a JSON list", Stream(b"[1, 2]", base.frames, base.end))
        for length in (0, 2 ** 20 + 1, 2 ** 32 - 1):
            forged = Stream(base.header, base.frames, base.end, header_length=length)
            edited(f"header length {length}", forged)
        for version in (0, 2, 65535):
            edited(f"format version {version}", Stream(base.header, base.frames, base.end, version))

        first = base.frames[0]
        segments = first.segments

        def frame_edit(name, frame, where=0, garbage=False):
            frames = list(base.frames)
            frames[where] = frame
            edited(name, Stream(base.header, frames, base.end), garbage=garbage)

        frame_edit("segments declared 0xFFFFFFFF bytes", Frame(first.shape, segments, [2 ** 32 - 1] * 3))
        frame_edit("segment sizes swapped", Frame(first.shape, segments, [len(d) for _, d in segments][::-1]))
        frame_edit("a segment declared one byte short", Frame(first.shape, segments,
                                                              [len(segments[0][1]) - 1] + [len(d) for _, d in
                                                                                           segments[1:]]))
        for shape in ([2 ** 32 - 1, 50, 3], [1, 2 ** 32 - 1, 3], [1, 2 ** 24, 3], [1, 0, 3], [0, 50, 3],
                      [2, 50, 3], [1, 50, 2], [1, 50, 4], [1, 49, 3]):
            frame_edit(f"frame shape {shape}", Frame(shape, segments))
        frame_edit("second frame of another batch size", Frame([2, 50, 3], [(c, d + d) for c, d in
                                                                            base.frames[1].segments]), 1)
        frame_edit("unknown coding 7", Frame(first.shape, [(7, segments[0][1])] + segments[1:]))
        frame_edit("packed bytes flagged range-coded", Frame(first.shape, [(1, d) for _, d in segments]))
        garbage = np.random.default_rng(5).integers(0, 2 ** 32, size=8, dtype=np.uint32).astype("<u4").tobytes()
        frame_edit("random words range-coded", Frame(first.shape, [(1, garbage)] + segments[1:]), garbage=True)
        # constriction asserts on these words under the layer's model (AssertionError without the reader's catch)
        frame_edit("words the range decoder refuses", Frame(first.shape, [(1, b"\xff" * 16)] + segments[1:]))
        frame_edit("range-coded, not whole words", Frame(first.shape, [(1, b"\x01\x02\x03")] + segments[1:]))
        bomb = Frame([1, 2 ** 24, 3], [(records.RANGE_CODED, b"")] * 3)
        edited("two frames of (1, 2^24, 3) codes in empty range-coded segments",
               Stream(base.header, [bomb, bomb], (2, 2 ** 25, -1)))
        quiet = Frame([1, 2 ** 22, 3], [(records.RANGE_CODED, b"")] * 3)  # within the frame limit
        edited("(1, 2^22, 3) codes in empty range-coded segments", Stream(base.header, [quiet], (1, 2 ** 22, -1)))
        edited("a million frames' worth of nothing: no frames, end record says 10^6",
               Stream(base.header, [], (10 ** 6, 10 ** 9, -1)))

        frames, tokens, samples = base.end
        for end, name in (((frames + 1, tokens, samples), "frames + 1"), ((frames, tokens + 1, samples), "tokens + 1"),
                          ((frames, tokens, tokens * 8 + 1), "samples beyond the tokens"),
                          ((frames, tokens, (tokens - 1) * 8), "samples short of the tokens"),
                          ((2 ** 64 - 1, 2 ** 64 - 1, 2 ** 63 - 1), "every count at its maximum")):
            edited(f"end record {name}", Stream(base.header, base.frames, end))
        edited("end record samples -5 (unknown)", Stream(base.header, base.frames, (frames, tokens, -5)), codes)
        tail = Stream(base.header, base.frames, base.end)
        tail.tail = b"E" + b"\x00" * 28
        edited("a second end record", tail)
    return cases


def limit_cases() -> list[Case]:
    """Frames whose bytes legitimately hold many codes: a large packed frame decodes exactly; one-code layers
    (0 bits a code) fill the whole-stream limit and are refused past it."""
    made, codes = spec(), indices(LAYOUT, 1, (records.MAX_FRAME_CODES // 3) - 7, 2)
    large = made.dumps(codes, frame_tokens=codes.shape[1])
    zero = spec(ZERO_BITS)
    full = torch.zeros(1, records.MAX_FRAME_CODES // 2, 2, dtype=torch.long)
    within = zero.dumps(full, frame_tokens=full.shape[1])  # one frame of 2^24 codes: allowed
    beyond = zero.dumps(torch.zeros(1, 3 * full.shape[1], 2, dtype=torch.long), frame_tokens=full.shape[1])
    return [Case("a packed frame of 3 x 5.6 million codes (10, 7 and 1 bits)", large, codes),
            Case("one-code layers: 2^24 codes in one frame", within, full, "zero_bits"),
            Case("one-code layers: 3 x 2^24 codes, beyond max_codes", beyond, None, "zero_bits")]


def frequency_cases(directory: Path) -> list[Case]:
    """The bundle's code frequencies replaced by random, cut and empty bytes (a manifest whose hash was
    rewritten to match): entropy-coded streams must fail with BundleError, packed ones still decode."""
    from vqdeploy.codestream.entropy import save_frequencies

    streams = base_streams()
    good = directory / "good.safetensors"
    save_frequencies(spec().frequencies, good)
    variants = {"random": np.random.default_rng(0).bytes(700), "cut": good.read_bytes()[:100], "empty": b"",
                "huge header": struct.pack("<Q", 2 ** 62) + b"{}",
                "wrong shape": _frequencies_of_shape(directory)}
    cases = []
    for name, content in variants.items():
        (directory / f"{name}.safetensors").write_bytes(content)
        for coding, (data, codes) in streams.items():
            cases.append(Case(f"frequencies {name}, {coding} stream", data, codes if coding == "packed" else None,
                              f"frequencies:{name}"))
    return cases


def _frequencies_of_shape(directory: Path) -> bytes:
    from safetensors.torch import save

    return save({f"layer.{i}": torch.ones(7, dtype=torch.int64) for i in range(3)})


def random_cases(count: int = 300) -> list[Case]:
    """Random bytes, alone and after a valid header (hypothesis draws them, with a fixed seed)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    header_end = 10 + struct.unpack_from("<4sHI", base_streams()["packed"][0])[2] + 4
    header = base_streams()["packed"][0][:header_end]
    drawn: list[bytes] = []

    @settings(max_examples=count, derandomize=True, database=None, deadline=None)
    @given(st.binary(max_size=600), st.booleans())
    def draw(data, after_header):
        drawn.append(header + data if after_header else data)

    draw()
    return [Case(f"random bytes #{i} ({len(data)} bytes)", data) for i, data in enumerate(drawn)]


GROUPS = {"damage": damage_cases, "fields": field_cases, "limits": limit_cases, "random": random_cases}


# ---------------------------------------------------------------------------------------------- the worker

def _outcome(decode, expected) -> dict:
    try:
        result = decode()
    except (StreamError, BundleError) as error:
        return {"outcome": type(error).__name__, "message": str(error)[:300]}
    except MemoryError:
        return {"outcome": "MemoryError", "message": "the decode asked for more memory than the cap"}
    except Exception as error:  # noqa: BLE001 - any other exception type is what the test looks for
        return {"outcome": type(error).__name__, "message": str(error)[:300]}
    sizes = torch.tensor(LAYOUT.layer_sizes if result.shape[-1] == 3 else ZERO_BITS.layer_sizes)
    in_range = bool(((result >= 0) & (result < sizes)).all()) if result.ndim == 3 else False
    return {"outcome": "ok", "exact": expected is not None and torch.equal(result, expected), "in_range": in_range}


def _spec_for(case: Case, directory: Path) -> StreamSpec:
    if case.spec == "zero_bits":
        return spec(ZERO_BITS)
    if case.spec.startswith("frequencies:"):
        return spec(frequencies_file=directory / f"{case.spec.split(':', 1)[1]}.safetensors")
    return spec()


def _cap_address_space() -> int:
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM, size + HEADROOM))
    return size + HEADROOM


def main(group: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="hostile_streams_"))
    cases = frequency_cases(directory) if group == "frequencies" else GROUPS[group]()
    print(json.dumps({"cap_bytes": _cap_address_space(), "cases": len(cases)}), flush=True)
    path = directory / "case.vqc"
    for case in cases:
        path.write_bytes(case.data)

        def from_file():
            with open(path, "rb") as file:
                return _spec_for(case, directory).reader(file).read_all()

        for source, decode in (("file", from_file), ("bytes", lambda: _spec_for(case, directory).loads(case.data))):
            print(json.dumps({"case": case.name, "source": source, "garbage": case.garbage,
                              **_outcome(decode, case.expected)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
