"""The audio codec runtime: an audio bundle's measured stride and receptive fields, chunked processing equal to
whole-input processing, audio files compressed and decompressed at every bandwidth, damaged streams."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from torch import nn

from vqdeploy.audio import compress, decode_blocks, decompress, encode_blocks
from vqdeploy.cli import main
from vqdeploy.codestream import FREQUENCIES_FILE, StreamError, StreamSpec
from vqdeploy.export import BundleError, export, read_manifest
from vqdeploy.export.audio_fields import decoder_context, encoder_context
from vqdeploy.export.ties import compare_indices
from vqdeploy.runtime import Session

RATE = 16000


def _recipe():
    path = Path(__file__).resolve().parent.parent / "export" / "codec.py"
    spec = importlib.util.spec_from_file_location("codec_recipe_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    """A small ConvCodec of the recipe (codebooks initialised by one k-means step, no training) exported as an
    audio bundle with calibration frequencies."""
    recipe = _recipe()
    torch.manual_seed(0)
    model = recipe.ConvCodec(channels=8, dim=16, codebook_size=64, num_quantizers=3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    model(recipe.synthetic_audio(4, 2048, generator))
    model.eval()
    path = tmp_path_factory.mktemp("audio") / "bundle"
    export(model.quantizer, path, encoder=model.encoder, decoder=model.decoder,
           example=recipe.synthetic_audio(2, 2048, generator), calibration=recipe.synthetic_audio(4, 8000, generator),
           audio={"sample_rate": RATE, "channels": 1})
    clip = recipe.synthetic_audio(1, RATE + 5, torch.Generator().manual_seed(7))[0, 0].numpy()  # not whole hops
    return model, path, Session(path, provider="cpu"), clip


def _wav(tmp_path, samples, rate=RATE, name="in.wav", subtype="FLOAT"):
    path = tmp_path / name
    soundfile.write(str(path), samples, rate, subtype=subtype)
    return path


def _whole(session, clip):
    """Whole-input encoding of the clip zero-padded to whole hops, as compress pads its last block."""
    padded = torch.nn.functional.pad(torch.from_numpy(clip)[None, None], (0, -len(clip) % 8))
    return session.encode(padded)


def test_the_manifest_records_the_stride_and_measured_receptive_fields(codec):
    _, path, _, _ = codec
    manifest = read_manifest(path)
    assert manifest["format_version"] == 3 and FREQUENCIES_FILE in manifest["files"]  # 3: reference outputs
    audio = manifest["audio"]
    assert (audio["sample_rate"], audio["channels"], audio["hop"], audio["frame_rate"]) == (RATE, 1, 8, 2000.0)
    # the encoder: a 7-tap conv (3 samples each side), then three 4-tap stride-2 convs (padding 1): a token's
    # features see samples [8t - 3 - 7 - 3, 8t + 7 + 3 + 6 + ...]: 13 before its first sample, 2 tokens of 8
    assert audio["encoder_context"] == [2, 2] and audio["decoder_context"] == [2, 2]


def test_receptive_fields_of_known_networks():
    hop4 = nn.Sequential(nn.Conv1d(1, 2, 5, padding=2), nn.Tanh(), nn.Conv1d(2, 3, 4, stride=4))
    assert encoder_context(hop4, 1, 4, 2) == [1, 1]  # 2 samples either side of a token's 4: one token each way
    wide = nn.Sequential(nn.Conv1d(1, 2, 19, padding=9), nn.Conv1d(2, 3, 4, stride=4))
    assert encoder_context(wide, 1, 4, 2) == [3, 3]  # 9 samples: ceil(9 / 4) tokens

    class GlobalMean(nn.Module):  # every token sees the whole input
        def __init__(self):
            super().__init__()
            self.local = hop4

        def forward(self, x):
            y = self.local(x)
            return y + y.mean(dim=-1, keepdim=True)

    assert encoder_context(GlobalMean(), 1, 4, 2) is None

    class Dead(GlobalMean):  # no probe sees a dependency: recorded as unbounded, the safe side
        def forward(self, x):
            return self.local(x) * 0

    assert encoder_context(Dead(), 1, 4, 2) is None
    up = nn.Sequential(nn.Conv1d(3, 3, 3, padding=1), nn.ConvTranspose1d(3, 1, 4, stride=4))
    assert decoder_context(up, torch.zeros(1, 3, 8), 2, 4) == [1, 1]


def test_chunked_processing_equals_whole_input_processing(codec):
    model, _, session, clip = codec
    audio = read_manifest(codec[1])["audio"]
    whole = _whole(session, clip)
    padded = torch.nn.functional.pad(torch.from_numpy(clip)[None, None], (0, -len(clip) % 8))
    blocks = list(padded.split(8 * 37, dim=-1))  # blocks unlike the chunks: 37 tokens
    for encode in (session.encode, lambda x: model.quantizer.encode(model.encoder(x))):
        with torch.no_grad():
            chunked = torch.cat(list(encode_blocks(iter(blocks), encode, audio, chunk_seconds=0.01)), dim=1)
            features = model.encoder(padded)
        assert chunked.shape == whole.shape
        agreement = compare_indices(model.quantizer, features, whole, chunked, wrapped=True)
        assert agreement.real == 0 and agreement.identical + agreement.near_ties == agreement.tokens
    with torch.no_grad():
        decoded_whole = session.decode(whole)
        token_blocks = iter(whole.split(23, dim=1))
        decoded = torch.cat(list(decode_blocks(token_blocks, session.decode, audio, 1, chunk_seconds=0.01)), dim=-1)
    assert decoded.shape == decoded_whole.shape
    # the same float32 ops on the same values, in windows of other lengths: only summation order may differ
    scale = float(decoded_whole.abs().max())
    torch.testing.assert_close(decoded, decoded_whole, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("entropy_coding", [False, True])
def test_audio_files_round_trip_at_every_bandwidth(codec, tmp_path, entropy_coding):
    _, path, session, clip = codec
    source = _wav(tmp_path, clip)
    spec = StreamSpec.from_bundle(path)
    whole = _whole(session, clip)
    sizes = []
    for layers in (1, 2, 3):
        stream = tmp_path / f"{layers}.vqc"
        run = compress(path, source, stream, layers=layers, entropy_coding=entropy_coding, chunk_seconds=0.05,
                       session=session)
        assert run.stream_bytes == stream.stat().st_size and run.layers == layers
        sizes.append(run.stream_bytes)
        indices = spec.loads(stream.read_bytes())
        assert torch.equal(indices[..., :layers], whole[..., :layers]) and (indices[..., layers:] == -1).all()
        for read_layers in range(1, layers + 1):  # any prefix of the written layers
            out = tmp_path / f"{layers}-{read_layers}.wav"
            decompress(path, stream, out, layers=read_layers, chunk_seconds=0.03, session=session, subtype="FLOAT")
            decoded, rate = soundfile.read(str(out), dtype="float32")
            assert rate == RATE and decoded.shape == clip.shape
            expected = whole.clone()
            expected[..., read_layers:] = -1
            reference = session.decode(expected)[0, 0, :len(clip)].clamp(-1, 1).numpy()
            np.testing.assert_allclose(decoded, reference, rtol=0, atol=1e-5 * float(np.abs(reference).max()))
    assert sizes[0] < sizes[1] < sizes[2]


def test_entropy_coding_saves_on_held_out_audio(codec, tmp_path):
    _, path, session, clip = codec
    source = _wav(tmp_path, clip)
    packed = compress(path, source, tmp_path / "p.vqc", session=session)
    coded = compress(path, source, tmp_path / "e.vqc", entropy_coding=True, session=session)
    assert coded.stream_bytes < packed.stream_bytes
    assert torch.equal(StreamSpec.from_bundle(path).loads((tmp_path / "e.vqc").read_bytes()), _whole(session, clip))


def test_a_damaged_stream_decodes_up_to_the_damage(codec, tmp_path):
    _, path, session, clip = codec
    stream = tmp_path / "s.vqc"
    compress(path, _wav(tmp_path, np.concatenate([clip, clip, clip[:RATE // 2]])), stream, session=session)
    data = stream.read_bytes()  # frames of 1 s, 1 s and 0.5 s
    (tmp_path / "cut.vqc").write_bytes(data[:len(data) * 3 // 4])
    # by default a failed run leaves no output (nor a temporary file)
    with pytest.raises(StreamError, match=r"ends inside the frame.*nothing was written to .*keeps the 1\.00 s"):
        decompress(path, tmp_path / "cut.vqc", tmp_path / "cut.wav", session=session, chunk_seconds=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.vqc", "in.wav", "s.vqc"]
    with pytest.raises(StreamError, match=r"ends inside the frame.*the 1\.00 s decoded before it were written"):
        decompress(path, tmp_path / "cut.vqc", tmp_path / "cut.wav", session=session, chunk_seconds=0.1,
                   keep_partial=True)
    assert soundfile.info(str(tmp_path / "cut.wav")).frames == RATE  # the first frame's 2000 tokens


def test_the_command_line_compresses_and_decompresses(codec, tmp_path, capsys):
    _, path, _, clip = codec
    source = _wav(tmp_path, clip, subtype="PCM_16")
    assert main(["compress", str(path), str(source), str(tmp_path / "a.vqc"), "--bandwidth", "30kbps",
                 "--entropy-coding", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 layer(s)" in out and "kbit/s" in out  # 2 layers of 6 bits at 2000 tokens/s: 24 kbit/s packed
    assert main(["decompress", str(path), str(tmp_path / "a.vqc"), str(tmp_path / "a.flac"), "--bandwidth", "1"]) == 0
    captured = capsys.readouterr()
    assert "decompress: 1.00 s of audio, 1 layer(s)" in captured.out and "decompress a.vqc" in captured.err
    assert soundfile.info(str(tmp_path / "a.flac")).frames == len(clip)


def test_the_command_line_explains_what_does_not_fit(codec, tmp_path, capsys):
    _, path, _, clip = codec
    cases = [(["compress", str(path), str(_wav(tmp_path, clip, rate=22050, name="r.wav")), "o.vqc"],
              "1 channel(s) at 22050 Hz; the bundle takes 1 at 16000 Hz"),
             (["compress", str(path), str(_wav(tmp_path, np.stack([clip, clip], 1), name="s.wav")), "o.vqc"],
              "2 channel(s) at 16000 Hz"),
             (["compress", str(path), str(_wav(tmp_path, clip)), "o.vqc", "--bandwidth", "5kbps"],
              "one layer already takes 12 kbit/s"),
             (["compress", str(path), str(_wav(tmp_path, clip)), "o.vqc", "--bandwidth", "fast"],
              "must be a layer count (e.g. 2) or a bitrate"),
             (["decompress", str(path), str(_wav(tmp_path, clip)), str(tmp_path / "o.wav")],
              "not a vqdeploy code stream")]
    for argv, message in cases:
        assert main(argv + ["--quiet"]) == 2
        assert message in capsys.readouterr().err


def test_bundles_without_audio_or_frequencies_say_so(tmp_path):
    import vqdeploy as V

    bare = export(V.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2), tmp_path / "bare").path
    assert read_manifest(bare)["format_version"] == 1
    with pytest.raises(ValueError, match="not an audio bundle"):
        compress(bare, tmp_path / "x.wav", tmp_path / "x.vqc")
    spec = StreamSpec.from_bundle(bare)
    with pytest.raises(ValueError, match="entropy coding needs code frequencies"):
        spec.dumps(torch.zeros(1, 4, 2, dtype=torch.long), entropy_coding=True)
    assert torch.equal(spec.loads(spec.dumps(torch.ones(1, 4, 2, dtype=torch.long))), torch.ones(1, 4, 2).long())
    with pytest.raises(ValueError, match="an audio bundle wraps an encoder network"):
        export(V.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2), tmp_path / "a", audio={"sample_rate": RATE})


def test_frequencies_and_audio_entries_are_checked_like_every_file(codec, tmp_path):
    import shutil

    _, path, _, _ = codec
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    data = bytearray((copy / FREQUENCIES_FILE).read_bytes())
    data[-1] ^= 0xFF  # one count changed
    (copy / FREQUENCIES_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="code_frequencies.safetensors has changed since export"):
        StreamSpec.from_bundle(copy)
    shutil.copyfile(path / FREQUENCIES_FILE, copy / FREQUENCIES_FILE)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["audio"]["hop"] = -8
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="the 'audio' entry must hold positive ints"):
        read_manifest(copy)
    other = StreamSpec.from_bundle(path)
    stream = other.dumps(torch.zeros(1, 4, 3, dtype=torch.long))
    manifest["audio"]["hop"] = 8
    manifest["audio"]["frame_rate"] = 2000
    (copy / "manifest.json").write_text(json.dumps(manifest))  # an edited manifest: another bundle
    with pytest.raises(StreamError, match="written by another bundle"):
        StreamSpec.from_bundle(copy).loads(stream)


def test_silence_of_no_length_round_trips(codec, tmp_path):
    _, path, session, _ = codec
    run = compress(path, _wav(tmp_path, np.zeros(0, dtype=np.float32)), tmp_path / "empty.vqc", session=session)
    assert run.seconds == 0 and StreamSpec.from_bundle(path).loads((tmp_path / "empty.vqc").read_bytes()).numel() == 0
    decompress(path, tmp_path / "empty.vqc", tmp_path / "empty.wav", session=session)
    assert soundfile.info(str(tmp_path / "empty.wav")).frames == 0


# ---------------------------------------------------------------------------------------------- hostile input

def _refused(argv, capsys, message):
    """The command exits 2 with one `error:` line naming the problem (argparse's refusals print their usage
    line before it), and no traceback."""
    try:
        code = main(argv + ["--quiet"])
    except SystemExit as exit:  # argparse refusing an option's value
        code = exit.code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert message in errors[0], errors[0]
    return errors[0]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _edited_stream(spec, stream: bytes, edit) -> bytes:
    """``stream`` taken apart, edited by ``edit(Stream)`` and put back with its checksums recomputed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hostile_streams import Stream

    parsed = Stream.parse(stream, len(spec.layout.shape), spec.layout.layers)
    edit(parsed)
    return parsed.bytes()


def test_the_command_line_never_writes_over_its_inputs(codec, tmp_path, capsys):
    import os

    _, path, _, clip = codec
    wav = _wav(tmp_path, clip, name="same.wav")
    os.link(wav, tmp_path / "hard.vqc")
    (tmp_path / "soft.vqc").symlink_to(wav)
    before, bundle_before = _snapshot(tmp_path), _snapshot(path)
    for output in ("same.wav", "hard.vqc", "soft.vqc"):
        _refused(["compress", str(path), str(wav), str(tmp_path / output)], capsys, "is the input")
    _refused(["compress", str(path), str(wav), str(path / "weights.safetensors")], capsys, "is the input")
    assert main(["compress", str(path), str(wav), str(tmp_path / "x.wav"), "--quiet"]) == 0  # a stream named .wav
    stream = (tmp_path / "x.wav").read_bytes()
    _refused(["decompress", str(path), str(tmp_path / "x.wav"), str(tmp_path / "x.wav")], capsys, "is the input")
    assert (tmp_path / "x.wav").read_bytes() == stream
    (tmp_path / "x.wav").unlink()
    assert _snapshot(tmp_path) == before and _snapshot(path) == bundle_before


def test_forged_streams_fail_in_one_line_and_leave_no_output(codec, tmp_path, capsys):
    _, path, session, clip = codec
    spec = StreamSpec.from_bundle(path)
    compress(path, _wav(tmp_path, np.concatenate([clip, clip])), tmp_path / "good.vqc", session=session,
             entropy_coding=True)
    good = (tmp_path / "good.vqc").read_bytes()
    codes = spec.loads(good)

    def first_frame(stream, **changes):
        for key, value in changes.items():
            setattr(stream.frames[0], key, value)

    def deep_header(stream):
        stream.header = b"[" * 100_000 + b"]" * 100_000

    def other_batch(stream):
        frame = stream.frames[1]
        stream.frames[1] = type(frame)([2] + frame.shape[1:], [(c, d + d) for c, d in frame.segments])

    forged = {
        "segments declared 0xFFFFFFFF bytes": (lambda s: first_frame(s, sizes=[2 ** 32 - 1] * 3), "layer size"),
        "range-coded words the decoder refuses": (lambda s: first_frame(s, segments=[(1, b"\xff" * 1200)] +
                                                                        s.frames[0].segments[1:]), "refuses"),
        "a header 100,000 levels deep": (deep_header, "nested too deeply"),
        "frames of other batch sizes": (other_batch, "does not continue the stream's earlier frames"),
        "a frame of batch 0": (lambda s: first_frame(s, shape=[0] + s.frames[0].shape[1:]), "holds no codes"),
        "an end record of other samples": (lambda s: setattr(s, "end", s.end[:2] + (s.end[2] + 8,)), "samples"),
    }
    (tmp_path / "out.wav").write_bytes(b"an earlier file the user keeps")
    for name, (edit, message) in forged.items():
        (tmp_path / "forged.vqc").write_bytes(_edited_stream(spec, good, edit))
        before = _snapshot(tmp_path)
        _refused(["decompress", str(path), str(tmp_path / "forged.vqc"), str(tmp_path / "out.wav")], capsys, message)
        assert _snapshot(tmp_path) == before, name  # inputs and the earlier output untouched, no temporary left
    batch = spec.dumps(torch.cat([codes, codes]), samples=2 * len(clip))  # a stream of two items
    (tmp_path / "batch.vqc").write_bytes(batch)
    _refused(["decompress", str(path), str(tmp_path / "batch.vqc"), str(tmp_path / "b.wav")], capsys,
             "holds a batch of 2 items")
    assert not (tmp_path / "b.wav").exists()


def test_damaged_bundles_and_bad_options_fail_in_one_line(codec, tmp_path, capsys):
    import hashlib
    import shutil

    _, path, _, clip = codec
    wav = _wav(tmp_path, clip)
    damaged = tmp_path / "damaged"
    shutil.copytree(path, damaged)
    (damaged / FREQUENCIES_FILE).write_bytes(np.random.default_rng(0).bytes(500))
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["files"][FREQUENCIES_FILE] = hashlib.sha256((damaged / FREQUENCIES_FILE).read_bytes()).hexdigest()
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    _refused(["compress", str(damaged), str(wav), str(tmp_path / "e.vqc"), "--entropy-coding"], capsys,
             "code_frequencies.safetensors is not a readable safetensors file")
    assert main(["compress", str(damaged), str(wav), str(tmp_path / "p.vqc"), "--quiet"]) == 0  # packing reads none
    assert main(["decompress", str(damaged), str(tmp_path / "p.vqc"), str(tmp_path / "p.wav"), "--quiet"]) == 0
    for rate in (0, float("inf")):
        manifest["audio"]["frame_rate"] = rate
        (damaged / "manifest.json").write_text(json.dumps(manifest))
        _refused(["compress", str(damaged), str(wav), str(tmp_path / "r.vqc")], capsys, "frame_rate")
    (damaged / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(["compress", str(damaged), str(wav), str(tmp_path / "r.vqc")], capsys, "nested too deeply")
    assert main(["compress", str(path), str(wav), str(tmp_path / "a.vqc"), "--quiet"]) == 0
    stream = str(tmp_path / "a.vqc")
    cases = [(["compress", str(path), str(wav), str(tmp_path / "c.vqc"), "--chunk-seconds", "inf"], "chunk"),
             (["compress", str(path), str(wav), str(tmp_path / "c.vqc"), "--chunk-seconds", "0"], "chunk"),
             (["decompress", str(path), stream, str(tmp_path / "out.xyz")], "cannot tell an audio format"),
             (["decompress", str(path), stream, str(tmp_path / "out")], "cannot tell an audio format"),
             (["decompress", str(path), stream, str(tmp_path / "o.wav"), "--subtype", "VORBIS"], "does not fit"),
             (["compress", str(path), str(tmp_path / "missing.wav"), str(tmp_path / "c.vqc")],
              f"{tmp_path / 'missing.wav'} does not exist"),
             (["decompress", str(path), str(tmp_path / "missing.vqc"), str(tmp_path / "o.wav")],
              f"{tmp_path / 'missing.vqc'} does not exist"),
             (["compress", str(path), str(wav), str(tmp_path / "no" / "c.vqc")], f"{tmp_path / 'no'} does not exist"),
             (["decompress", str(path), stream, str(tmp_path / "no" / "o.wav")], f"{tmp_path / 'no'} does not exist"),
             (["compress", str(path), str(tmp_path), str(tmp_path / "c.vqc")], "is not a file")]
    before = _snapshot(tmp_path)
    for argv, message in cases:
        _refused(argv, capsys, message)
    assert _snapshot(tmp_path) == before


def test_a_command_opens_its_bundle_once(codec, tmp_path, monkeypatch):
    """compress and decompress (command line and Python) read the bundle once: every file hashed once, the
    manifest's identity taken once, one stream spec; and the untrusted bundle's checks do run (once each)."""
    import collections

    import vqdeploy.bundle_format as bundle_format
    import vqdeploy.runtime as runtime

    _, path, _, clip = codec
    files, wav, calls = len(read_manifest(path)["files"]), _wav(tmp_path, clip), collections.Counter()

    def counted(name, function):
        def count(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return count

    for module, name in ((bundle_format, "sha256"), (bundle_format, "manifest_sha256"), (runtime, "check_bundle")):
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    monkeypatch.setattr(StreamSpec, "from_bundle", classmethod(counted("spec", StreamSpec.from_bundle.__func__)))
    runs = [lambda: main(["compress", str(path), str(wav), str(tmp_path / "a.vqc"), "--quiet"]) == 0,
            lambda: main(["decompress", str(path), str(tmp_path / "a.vqc"), str(tmp_path / "a.wav"), "--quiet"]) == 0,
            lambda: compress(path, wav, tmp_path / "b.vqc"),
            lambda: decompress(path, tmp_path / "b.vqc", tmp_path / "b.wav")]
    for run in runs:
        calls.clear()
        assert run()
        assert calls == {"sha256": files, "manifest_sha256": 1, "spec": 1, "check_bundle": 1}
