"""Code streams: exact round trips for every bundle type at every bandwidth prefix, packed and entropy-coded;
property tests over random layouts; damaged, truncated and foreign streams."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_export import CLASSES
from vqdeploy.codestream import CodeLayout, StreamError, StreamSpec, measure_frequencies
from vqdeploy.codestream.bitpack import pack, packed_size, unpack
from vqdeploy.codestream.records import MAGIC
from vqdeploy.export.graphs import EncoderGraph, default_example, dynamic_input_axes, dynamic_output_axes, has_decoder
from vqdeploy.export.graphs import is_residual


def _random_indices(layout: CodeLayout, sizes: list[int], generator: torch.Generator, layers=None) -> torch.Tensor:
    """Indices of ``layout`` with ``sizes`` on its dynamic axes, each layer's codes skewed (so entropy coding
    has something to gain)."""
    shape = layout.frame_shape(sizes[0], tuple(sizes[1:]), layers or layout.layers)
    if layout.layer_axis is None:
        return _skewed(layout.layer_sizes[0], shape, generator)
    per_layer = shape[:layout.layer_axis] + shape[layout.layer_axis + 1:]
    return torch.stack([_skewed(k, per_layer, generator) for k in layout.layer_sizes[:len(sizes) and shape[
        layout.layer_axis]]], dim=layout.layer_axis)


def _skewed(size: int, shape, generator) -> torch.Tensor:
    """Codes in [0, size) drawn with geometric weights over a permutation fixed by the size (so calibration and
    held-out draws share one distribution)."""
    u = torch.rand(shape, generator=generator)
    codes = (torch.log1p(-u * (1 - 0.9 ** size)) / np.log(0.9)).long().clamp(max=size - 1)
    permutation = torch.randperm(size, generator=torch.Generator().manual_seed(size))
    return permutation[codes]


# ---------------------------------------------------------------------------------------------- bit packing

@given(bits=st.integers(0, 40), count=st.integers(0, 300), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_packing_round_trips_at_every_width(bits, count, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=count) if bits else np.zeros(count, dtype=np.int64)
    data = pack(codes, bits)
    assert len(data) == packed_size(count, bits) == (count * bits + 7) // 8
    assert np.array_equal(unpack(data, bits, count), codes)


def test_packing_refuses_codes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"\[0, 7\] to pack in 3 bits"):
        pack(np.array([0, 8]), 3)
    with pytest.raises(ValueError, match="3 codes of 5 bits take 2 bytes"):
        unpack(b"\x00", 5, 3)


# ---------------------------------------------------------------------------------------------- random layouts

@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 4))
    residual = ndim >= 2 and draw(st.booleans())
    dynamic = sorted(draw(st.sets(st.integers(0, ndim - (2 if residual else 1)), min_size=1, max_size=3)))
    layer_count = draw(st.integers(1, 5)) if residual else 1
    shape = [None if a in dynamic else draw(st.integers(1, 3)) for a in range(ndim)]
    if residual:
        shape[-1] = layer_count
    sizes = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 7, 64, 100, 255, 256, 1000, 2**12, 2**17]),
                                min_size=layer_count, max_size=layer_count)))
    frame_axis = dynamic[1] if len(dynamic) > 1 else dynamic[0]
    return CodeLayout(tuple(shape), frame_axis, ndim - 1 if residual else None, sizes)


@given(layout=layouts(), seed=st.integers(0, 2**16), data=st.data())
@settings(max_examples=40, deadline=None)
def test_round_trips_are_exact_for_random_layouts_at_every_prefix(layout, seed, data):
    generator = torch.Generator().manual_seed(seed)
    dynamic = [a for a, s in enumerate(layout.shape) if s is None]
    sizes = [data.draw(st.integers(0, 40))] + [data.draw(st.integers(1, 3)) for _ in dynamic[1:]]
    spec = StreamSpec(layout, "0" * 64, "Test")
    spec.frequencies = measure_frequencies([_random_indices(layout, [50] + sizes[1:], generator)], layout)
    indices = _random_indices(layout, sizes, generator)
    frame_tokens = data.draw(st.integers(1, 16))
    for entropy_coding in (False, True):
        stream = spec.dumps(indices, entropy_coding=entropy_coding, frame_tokens=frame_tokens)
        for k in range(1, layout.layers + 1):
            decoded = spec.loads(stream, layers=k, fill_dropped=False)
            expected = indices if layout.layer_axis is None else indices.narrow(layout.layer_axis, 0, k)
            if expected.numel():
                assert torch.equal(decoded, expected)
            else:  # no frames: the other dynamic sizes are not in the stream
                assert decoded.numel() == 0 and decoded.ndim == expected.ndim


# ---------------------------------------------------------------------------------------------- every bundle type

def _layout_of(quantizer):
    """The layout export gives a bundle of ``quantizer`` (the manifest's index shape and dynamic axes)."""
    example = default_example(quantizer)
    graph = EncoderGraph(quantizer)
    axes = dynamic_input_axes(quantizer, example, False, None)
    with torch.no_grad():
        indices = graph(example)
    index_axes = dynamic_output_axes(graph, example, axes)
    sizes = list(quantizer.codebook_sizes) if is_residual(quantizer) else None
    return CodeLayout.from_indices(indices.shape, index_axes, sizes, quantizer.codebook_size), graph, example, axes


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "random_projection"])
def test_every_bundle_type_round_trips_and_decodes_at_every_bandwidth(name):
    torch.manual_seed(0)
    quantizer = CLASSES[name][0]().eval()
    assert has_decoder(quantizer)
    layout, graph, example, axes = _layout_of(quantizer)
    from vqdeploy.export.graphs import grown

    with torch.no_grad():
        calibration = graph(grown(example, axes, 3))
        indices = graph(grown(example, axes, 2))
    spec = StreamSpec(layout, "0" * 64, name, measure_frequencies([calibration], layout))
    for entropy_coding in (False, True):
        stream = spec.dumps(indices, entropy_coding=entropy_coding, frame_tokens=3)
        assert torch.equal(spec.loads(stream), indices.long())
        for k in range(1, layout.layers):  # a prefix decodes as the quantizer decodes dropped layers (-1)
            prefix = spec.loads(stream, layers=k)
            dropped = indices.long().clone()
            dropped[..., k:] = -1
            assert torch.equal(prefix, dropped)
            with torch.no_grad():
                assert torch.equal(quantizer.decode(prefix), quantizer.decode(dropped))


# ---------------------------------------------------------------------------------------------- writing and reading

RVQ = CodeLayout((None, None, 3), 1, 2, (256, 100, 2))


def _spec(frequencies=True):
    generator = torch.Generator().manual_seed(0)
    spec = StreamSpec(RVQ, "a" * 64, "ResidualVQ", frame_rate=50.0, sample_rate=16000, channels=1)
    if frequencies:
        spec.frequencies = measure_frequencies([_random_indices(RVQ, [4000, 1], generator)], RVQ)
    return spec


def test_entropy_coding_saves_on_skewed_codes_and_never_loses_on_uniform_ones():
    spec, generator = _spec(), torch.Generator().manual_seed(1)
    held_out = _random_indices(RVQ, [2000, 1], generator)
    packed, coded = spec.dumps(held_out), spec.dumps(held_out, entropy_coding=True)
    # the range coder spends the codes' cross-entropy under the stored model, plus at most two 32-bit words a
    # segment; frames (40 of 50 steps) and the header cost the same in both streams
    ideal_bits = 0.0
    for layer, codes in enumerate(RVQ.split_layers(held_out, 3)):
        p = spec.frequencies[layer] + 0.5
        ideal_bits += float(-np.log2(p[codes.numpy()] / p.sum()).sum())
    payload = sum((n * b + 7) // 8 for n, b in [(50, 8), (50, 7), (50, 1)]) * 40
    assert len(coded) <= len(packed) - payload + ideal_bits / 8 + 8 * 3 * 40
    assert len(coded) < 0.93 * len(packed)
    uniform = torch.stack([torch.randint(0, k, (1, 2000), generator=generator) for k in RVQ.layer_sizes], -1)
    # each segment falls back to packing; only the header's "entropy" is one byte longer than "packed"
    assert len(spec.dumps(uniform, entropy_coding=True)) <= len(spec.dumps(uniform)) + 1
    assert torch.equal(spec.loads(spec.dumps(uniform, entropy_coding=True)), uniform)


def test_streaming_writes_frames_as_they_come_and_reads_them_as_they_arrive():
    spec, generator = _spec(), torch.Generator().manual_seed(2)
    chunks = [_random_indices(RVQ, [n, 2], generator) for n in (7, 50, 0, 93, 1)]
    sink = io.BytesIO()
    with spec.writer(sink, layers=2, entropy_coding=True) as writer:
        sizes = []
        for chunk in chunks:
            writer.write(chunk)
            sizes.append(sink.tell())
    assert sizes[0] < sizes[1] < sizes[3]  # whole frames (50 steps, the frame rate) left before the end
    assert writer.frames == 4 and writer.tokens == 151

    class Trickle(io.RawIOBase):  # a socket: at most 5 bytes per read
        def __init__(self, data):
            self.data, self.position = data, 0

        def readable(self):
            return True

        def read(self, size=-1):
            size = 5 if size < 0 else min(size, 5)
            out = self.data[self.position:self.position + size]
            self.position += len(out)
            return out

    reader = spec.reader(Trickle(sink.getvalue()))
    frames = list(reader)
    assert [f.shape[1] for f in frames] == [50, 50, 50, 1] and reader.end["tokens"] == 151
    joined = torch.cat(frames, 1)
    assert torch.equal(joined[..., :2], torch.cat(chunks, 1)[..., :2]) and (joined[..., 2] == -1).all()


def test_bad_writes_raise_clear_errors():
    spec = _spec(frequencies=False)
    with pytest.raises(ValueError, match=r"\(\*, \*, 3; \* is any size\)"):
        spec.dumps(torch.zeros(2, 5, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        spec.dumps(torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match=r"layer 1: codes must lie in \[0, 99\]"):
        spec.dumps(torch.full((1, 5, 3), 1).index_fill(2, torch.tensor([1]), 100))
    with pytest.raises(ValueError, match=r"dropped layer \(-1\) cannot be written: write fewer layers"):
        spec.dumps(torch.zeros(1, 5, 3, dtype=torch.long).index_fill(2, torch.tensor([2]), -1))
    assert torch.equal(spec.loads(spec.dumps(torch.zeros(1, 5, 3, dtype=torch.long).index_fill(
        2, torch.tensor([2]), -1), layers=2))[..., 2], torch.full((1, 5), -1))
    with pytest.raises(ValueError, match="entropy coding needs code frequencies"):
        spec.dumps(torch.zeros(1, 5, 3, dtype=torch.long), entropy_coding=True)
    with pytest.raises(ValueError, match=r"layers must be an int in \[1, 3\]"):
        spec.dumps(torch.zeros(1, 5, 3, dtype=torch.long), layers=4)
    with pytest.raises(ValueError, match=r"the stream holds 1 layer\(s\); 2 were asked for"):
        spec.loads(spec.dumps(torch.zeros(1, 5, 3, dtype=torch.long), layers=1), layers=2)
    with spec.writer(io.BytesIO()) as writer:
        writer.write(torch.zeros(1, 5, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="do not continue the stream"):
            writer.write(torch.zeros(2, 5, 3, dtype=torch.long))


def test_frames_larger_than_readers_accept_are_split_on_writing(monkeypatch):
    from vqdeploy.codestream import records

    monkeypatch.setattr(records, "MAX_FRAME_CODES", 100)
    spec = _spec(frequencies=False)
    indices = torch.randint(0, 2, (3, 500, 3))
    data = spec.dumps(indices, frame_tokens=200)
    shapes = [tuple(frame.shape) for frame in spec.reader(io.BytesIO(data))]
    # 11 steps x 3 rows x 3 layers <= 100
    assert max(s[1] for s in shapes) == 11 and sum(s[1] for s in shapes) == 500
    assert torch.equal(spec.loads(data), indices)
    monkeypatch.setattr(records, "MAX_FRAME_CODES", 2)
    with pytest.raises(ValueError, match=r"one step of the frame axis holds 9 codes \(all layers\)"):
        spec.dumps(indices)
    with pytest.raises(StreamError, match="decodes to 99 codes, beyond max_frame_codes=2"):
        spec.loads(data)
    assert torch.equal(spec.loads(data, max_frame_codes=99), indices)  # a caller may raise the limit


# ---------------------------------------------------------------------------------------------- damage

@pytest.fixture(scope="module")
def stream():
    spec, generator = _spec(), torch.Generator().manual_seed(3)
    indices = _random_indices(RVQ, [200, 1], generator)
    return spec, indices, spec.dumps(indices, entropy_coding=True)


def _frame_offsets(spec, data):
    reader = spec.reader(io.BytesIO(data))
    offsets = [reader.records.offset]
    for _ in reader:
        offsets.append(reader.records.offset)
    return offsets  # header end, then each frame's end; the end record follows the last


def _fail(spec, data, match, field):
    with pytest.raises(StreamError, match=match) as caught:
        spec.loads(data)
    assert caught.value.field == field
    return caught.value


def test_truncation_anywhere_is_reported_and_frames_before_it_decode(stream):
    spec, indices, data = stream
    offsets = _frame_offsets(spec, data)
    error = _fail(spec, data[:offsets[2] + 10], r"ends inside the frame at offset \d+", f"frame at offset {offsets[2]}")
    assert torch.equal(error.partial, indices[:, :100]) and error.frames_read == 2
    error = _fail(spec, data[:offsets[3]], "after frame 3 without its end record", "end record")
    assert torch.equal(error.partial, indices[:, :150])
    _fail(spec, data[:-6], "ends inside the end record", "end record")
    _fail(spec, data[:-3], "ends inside the end record checksum", "end record checksum")
    _fail(spec, data[:20], "ends inside the header", "header")


def test_damage_is_caught_by_the_checksums(stream):
    spec, indices, data = stream
    offsets = _frame_offsets(spec, data)
    damaged = bytearray(data)
    damaged[offsets[1] + 40] ^= 0x10  # a bit of frame 1's payload
    error = _fail(spec, bytes(damaged), rf"frame at offset {offsets[1]} is damaged \(checksum mismatch\)",
                  "frame checksum")
    assert torch.equal(error.partial, indices[:, :50]) and error.offset == offsets[1]
    damaged = bytearray(data)
    damaged[30] ^= 1  # inside the header's JSON
    _fail(spec, bytes(damaged), "header is damaged", "header checksum")
    damaged = bytearray(data)
    damaged[offsets[4] + 2] ^= 1  # the end record's frame count
    _fail(spec, bytes(damaged), "end record is damaged", "end record checksum")
    _fail(spec, data + b"\x00", "unexpected bytes after the end record", "end of stream")
    _fail(spec, data[:offsets[1]] + b"X" + data[offsets[1] + 1:], r"unexpected record tag b'X'", "record tag")


def _with_header(data: bytes, edit) -> bytes:
    """The stream with its header rewritten by ``edit(prefix fields, header dict)`` and a valid checksum."""
    import json

    magic, version, length = struct.unpack_from("<4sHI", data)
    header = json.loads(data[10:10 + length])
    magic, version = edit(header) or (magic, version)
    body = json.dumps(header).encode()
    record = struct.pack("<4sHI", magic, version, len(body)) + body
    return record + struct.pack("<I", zlib.crc32(record)) + data[10 + length + 4:]


def test_foreign_streams_and_unknown_versions_are_refused(stream):
    spec, _, data = stream
    _fail(spec, b"RIFF" + data[4:], "not a vqdeploy code stream", "magic")
    _fail(spec, _with_header(data, lambda h: (MAGIC, 2)), "format version 2; this vqdeploy reads version 1",
          "version")
    _fail(spec, _with_header(data, lambda h: h.update(bundle="b" * 64)), "written by another bundle", "bundle")
    _fail(spec, _with_header(data, lambda h: h.update(layers=9)), "layer count 9", "layers")
    _fail(spec, _with_header(data, lambda h: h.update(coding="zstd")), "unknown coding", "coding")
    packed_only = _spec(frequencies=False)
    with pytest.raises(StreamError, match="entropy-coded but this bundle has no code frequencies"):
        packed_only.loads(data)


@given(size=st.sampled_from([2, 3, 64, 1024]), skew=st.sampled_from([0.0, 0.5, 0.99, 1.0]),
       count=st.integers(1, 20_000), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None)
def test_a_range_coded_segment_never_holds_more_codes_than_its_bound(size, skew, count, seed):
    """The reader refuses a range-coded segment that declares more codes than ``max_codes`` of its bytes: a real
    segment must always fit, even of the layer's most probable code alone under a degenerate model."""
    from vqdeploy.codestream.entropy import RangeCoder

    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 100, size=size)
    counts[0] += int(skew * 10**9)  # 1.0: one code holds all but a billionth of the calibration
    coder = RangeCoder([counts])
    for codes in (np.zeros(count, dtype=np.int64), rng.choice(size, count, p=coder.probabilities(0))):
        data = coder.encode(0, codes)
        assert count <= coder.max_codes(0, len(data))
        assert np.array_equal(coder.decode(0, data, count), codes)
