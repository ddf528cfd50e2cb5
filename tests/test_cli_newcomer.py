"""The command line as a new user meets it (issue 22): every mistake is one ``error:`` line with exit status 2,
bundles with networks inside verify from their recorded reference outputs, exports are atomic and never touch
what they must not, files get the umask's modes, and ``--help`` and ``info`` import no torch."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vqdeploy as V
from vqdeploy.cli import codec_summary, layers_encoded, main, parse_bandwidth
from vqdeploy.codestream import StreamSpec
from vqdeploy.export import BundleError, ExportParityError, export, read_manifest, verify
from vqdeploy.export.bundle import REFERENCE_FILE, write_manifest

RATE = 8000


def _error_line(capsys, *names) -> str:
    """The one ``error:`` line a failed command printed (no traceback anywhere); it names every one of names."""
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    for name in names:
        assert str(name) in errors[0], errors[0]
    return errors[0]


def _contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _rehashed(bundle: Path, tmp_path: Path, change) -> Path:
    """A copy of ``bundle`` changed by ``change(copy)``, its manifest's hashes rewritten to match."""
    copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(bundle, copy)
    change(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = [name for name in manifest["files"] if (copy / name).exists()]
    write_manifest(copy, manifest)
    return copy


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bare") / "rvq"
    export(V.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2), path)
    return path


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    """A tiny audio codec: conv networks (stride 2) around a 2-layer residual VQ, 8 kHz mono."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv1d(1, 8, 4, stride=2, padding=1), nn.ELU(), nn.Conv1d(8, 8, 3, padding=1))
    quantizer = V.ResidualVQ(dim=8, codebook_size=16, num_quantizers=2, channel_last=False)
    decoder = nn.Sequential(nn.ConvTranspose1d(8, 4, 4, stride=2, padding=1), nn.ELU(), nn.Conv1d(4, 1, 3, padding=1))
    path = tmp_path_factory.mktemp("codec") / "bundle"
    export(quantizer, path, encoder=encoder, decoder=decoder, example=torch.randn(2, 1, 32),
           audio={"sample_rate": RATE, "channels": 1})
    return path, encoder, decoder


# ------------------------------------------------------------------------------------------------ verify


def test_a_bundle_with_networks_inside_verifies_from_its_recorded_outputs(codec, capsys):
    path, encoder, decoder = codec
    manifest = read_manifest(path)
    assert manifest["format_version"] == 3 and REFERENCE_FILE in manifest["files"]
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "recorded in the bundle" in out and "decoder, -1" in out and "real" in out
    report = verify(path)
    assert report.recorded and report.passed and report.checks[0].input_shape == (1, 1, 32)
    assert not verify(path, encoder=encoder, decoder=decoder).recorded  # networks given: checked live, as before


def test_changed_reference_outputs_fail_rather_than_pass(codec, tmp_path, capsys):
    path = codec[0]

    def shift_outputs(copy):
        record = load_file(str(copy / REFERENCE_FILE))
        record["outputs"][0, 0, :4] += 1e-3
        save_file(record, str(copy / REFERENCE_FILE))

    changed = _rehashed(path, tmp_path, shift_outputs)
    with pytest.raises(ExportParityError, match="decoder"):
        verify(changed)
    assert main(["verify", str(changed)]) == 2
    _error_line(capsys, "disagrees with PyTorch", "outputs differ")

    def change_an_index(copy):
        record = load_file(str(copy / REFERENCE_FILE))
        record["indices"][0, 0, 0] = (record["indices"][0, 0, 0] + 1) % 16  # the features still say otherwise
        save_file(record, str(copy / REFERENCE_FILE))

    with pytest.raises(BundleError, match="recorded tokens' indices are not what this ResidualVQ gives"):
        verify(_rehashed(path, tmp_path, change_an_index))


@pytest.mark.parametrize("change, match", [
    (lambda r: r.update(indices=r["indices"].float()), "'indices' is torch.float32"),
    (lambda r: r.update(extra=torch.zeros(1)), "must hold exactly"),
    (lambda r: r.update(inputs=torch.zeros(2, 3, 32)), "'inputs' is torch.float32\\[2, 3, 32\\]"),
    (lambda r: r.update(features=torch.full_like(r["features"], float("nan"))), "must be finite"),
    (lambda r: r.update(features=torch.zeros(2, 5)), "are not an input of this ResidualVQ"),
])
def test_reference_outputs_are_checked_before_use(codec, tmp_path, change, match):
    def rewrite(copy):
        record = load_file(str(copy / REFERENCE_FILE))
        change(record)
        save_file(record, str(copy / REFERENCE_FILE))

    with pytest.raises(BundleError, match=match):
        verify(_rehashed(codec[0], tmp_path, rewrite))


def test_an_older_bundle_with_networks_says_what_verify_needs(codec, tmp_path, capsys):
    older = _rehashed(codec[0], tmp_path, lambda copy: (copy / REFERENCE_FILE).unlink())
    with pytest.raises(ValueError, match="records no reference outputs"):
        verify(older)
    assert main(["verify", str(older)]) == 2
    _error_line(capsys, "verify(bundle, encoder=..., decoder=...)", "export it again")


def test_bench_times_onnxruntime_alone_with_networks_inside(codec, capsys):
    assert main(["bench", str(codec[0]), "--provider", "cpu", "--batch", "2", "--tokens", "16", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "encode" in out and "decode" in out and "torch eager: not timed" in out


@pytest.mark.parametrize("command", ["info", "verify", "bench"])
def test_missing_bundles_are_named(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "nowhere")]) == 2
    _error_line(capsys, f"no bundle at {tmp_path / 'nowhere'}: the directory does not exist")
    (tmp_path / "empty").mkdir()
    assert main([command, str(tmp_path / "empty")]) == 2
    _error_line(capsys, f"{tmp_path / 'empty'} is not a vqdeploy bundle: manifest.json is missing")


# ------------------------------------------------------------------------------------------------ export


def test_export_into_a_taken_directory_says_overwrite_and_touches_nothing(bare, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    config = '{"dim": 8, "codebook_size": 16, "num_quantizers": 2}'
    assert main(["export", "--class", "ResidualVQ", "--config", config, "--out", str(mine)]) == 2
    assert _error_line(capsys, "--overwrite", mine).count("error:") == 1
    assert main(["export", "--class", "ResidualVQ", "--config", config, "--out", str(mine), "--overwrite"]) == 2
    _error_line(capsys, "not a vqdeploy bundle", "refusing to overwrite")
    assert _contents(mine) == {"notes.txt": b"mine"}
    old = shutil.copytree(bare, tmp_path / "old")
    before = _contents(old)
    assert main(["export", "--class", "ResidualVQ", "--config", config, "--out", str(old)]) == 2
    _error_line(capsys, "--overwrite")
    assert _contents(old) == before


@pytest.mark.parametrize("arguments, names", [
    (["--class", "VectorQuantize", "--config", '{"dim": 256}'], ["--config does not build a VectorQuantize",
                                                                  "codebook_size"]),
    (["--class", "VectorQuantize", "--config", "[256]"], ["--config must be a JSON object"]),
    (["--class", "FSQ", "--config", '{"levels": [5, 5]}', "--example-shape", "2,x"], ["--example-shape 2,x"]),
    (["--class", "FSQ", "--config", '{"levels": [5, 5]}', "--weights", "missing.safetensors"],
     ["--weights missing.safetensors: no such file"]),
    (["--class", "FSQ", "--config", '{"levels": [5, 5]}', "--weights", "{garbage}"], ["not a readable safetensors"]),
    (["--class", "FSQ", "--config", '{"levels": [5, 5]}', "--num-quantizers", "2"], ["num_quantizers applies to"]),
])
def test_export_mistakes_are_one_line_and_leave_no_files(arguments, names, bare, tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    old = shutil.copytree(bare, tmp_path / "old")
    before = _contents(old)
    arguments = [str(garbage) if a == "{garbage}" else a for a in arguments]
    assert main(["export", *arguments, "--out", str(old), "--overwrite"]) == 2
    _error_line(capsys, *names)
    assert _contents(old) == before and sorted(p.name for p in tmp_path.iterdir()) == ["garbage.safetensors", "old"]


def test_a_failed_export_keeps_the_old_bundle_and_leaves_nothing_behind(bare, tmp_path, monkeypatch):
    import vqdeploy.export.exporter as exporter

    old = shutil.copytree(bare, tmp_path / "old")
    before = _contents(old)

    def broken(path):
        raise ExportParityError(f"{path.name} fails onnx.checker: made up")

    monkeypatch.setattr(exporter, "check_onnx_file", broken)
    with pytest.raises(ExportParityError, match="made up"):
        export(V.FSQ(levels=[5, 5], dim=4), old, overwrite=True)
    assert _contents(old) == before and [p.name for p in tmp_path.iterdir()] == ["old"]
    with pytest.raises(ExportParityError):
        export(V.FSQ(levels=[5, 5], dim=4), tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_a_bundle_failing_parity_is_left_for_inspection_without_replacing_one(bare, tmp_path, monkeypatch):
    import vqdeploy.export.exporter as exporter
    from vqdeploy.export.checks import GraphCheck, VerifyReport

    def failing(*args, **kwargs):
        return VerifyReport("cpu", checks=[GraphCheck("encoder", (2, 3, 4), problem="made to fail")])

    monkeypatch.setattr(exporter, "verify_graphs", failing)
    with pytest.raises(ExportParityError, match=f"left for inspection in {tmp_path / 'new'}"):
        export(V.FSQ(levels=[5, 5], dim=4), tmp_path / "new")
    assert read_manifest(tmp_path / "new")["class"] == "FSQ"  # a fresh path gets the bundle, as documented
    old = shutil.copytree(bare, tmp_path / "old")
    before = _contents(old)
    with pytest.raises(ExportParityError, match="was kept") as raised:
        export(V.FSQ(levels=[5, 5], dim=4), old, overwrite=True)
    assert _contents(old) == before
    inspection = Path(str(raised.value).split("left for inspection in ")[1].split(";")[0])
    assert inspection.parent == tmp_path and read_manifest(inspection)["class"] == "FSQ"


def test_overwrite_replaces_a_bundle_whole_and_files_get_the_umask_modes(bare, tmp_path):
    old = shutil.copytree(bare, tmp_path / "old")
    previous = os.umask(0o027)
    try:
        result = export(V.ResidualVQ(dim=8, codebook_size=16, num_quantizers=3), old, overwrite=True,
                        calibration=torch.randn(4, 12, 8))
    finally:
        os.umask(previous)
    names = sorted(p.name for p in old.iterdir())
    assert names == ["code_frequencies.safetensors", "decoder.onnx", "encoder.onnx", "manifest.json",
                     "weights.safetensors"]
    assert {name: oct(os.stat(old / name).st_mode & 0o777) for name in names} == {name: "0o640" for name in names}
    assert result.manifest["config"]["num_quantizers"] == 3 and [p.name for p in tmp_path.iterdir()] == ["old"]


# ------------------------------------------------------------------------------------------------ info


def test_info_prints_the_layers_the_graphs_encode(bare, capsys):
    assert main(["info", str(bare)]) == 0
    out = capsys.readouterr().out
    assert "layers encoded" in out and "2 (all)" in out and "None" not in out.split("config")[0]
    residual = {"class": "ResidualVQ", "config": {"num_quantizers": 4}, "codebook_sizes": [16] * 4}
    assert layers_encoded(dict(residual, num_quantizers=None)) == "4 (all)"
    assert layers_encoded(dict(residual, num_quantizers=2)) == "2 of 4 (bandwidth set at export)"
    grouped = {"class": "GroupedResidualVQ", "config": {"groups": 2}, "codebook_sizes": [16] * 4}
    assert layers_encoded(dict(grouped, num_quantizers=None)) == "8 (all: 2 groups x 4)"
    assert layers_encoded(dict(grouped, num_quantizers=1)) == "2 of 8 (2 groups x 1 of 4: bandwidth set at export)"
    assert layers_encoded({"class": "FSQ", "config": {}, "codebook_sizes": None}) == "1 (not a residual quantizer)"


def test_help_and_info_import_neither_torch_nor_onnxruntime(bare):
    code = ("import sys\nfrom vqdeploy.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "rc = main(['info', sys.argv[1]])\n"
            "print(rc, sorted(m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(bare)], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "0 []"


def test_every_public_name_still_imports():
    from vqdeploy import ResidualVQ, __version__, load

    assert ResidualVQ is V.ResidualVQ and load is V.load and __version__ == "0.1.0"
    assert all(getattr(V, name) is not None for name in V.__all__) and set(V.__all__) <= set(dir(V))
    assert V.primitives.__name__ == "vqdeploy.primitives"  # submodules stay attributes of the package
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        V.Nope


# ------------------------------------------------------------------------------------------------ audio


def _spec(bundle, frame_rate=None):
    return dataclasses.replace(StreamSpec.from_bundle(bundle), frame_rate=frame_rate)


def test_bandwidth_is_parsed_in_the_options_terms(bare):
    spec, timed = _spec(bare), _spec(bare, 1000.0)  # 2 layers of 4 bits: 4 kbit/s a layer at 1000 tokens/s
    assert parse_bandwidth(None, spec) is None and parse_bandwidth("2", spec) == 2
    assert parse_bandwidth("5kbps", timed) == 1 and parse_bandwidth("8KBPS", timed) == 2
    cases = {"5": "--bandwidth 5: this bundle has 2 layer(s); give a layer count in 1..2 or a bitrate such as 8kbps",
             "0": "give a layer count in 1..2", "-1": "give a layer count in 1..2",
             "1.5": "must be a layer count (e.g. 2) or a bitrate", "abc": "must be a layer count (e.g. 2)",
             "nankbps": "a bitrate must be a positive number", "infkbps": "a bitrate must be a positive number",
             "0kbps": "a bitrate must be a positive number", "3kbps": "one layer already takes 4 kbit/s"}
    for value, message in cases.items():
        with pytest.raises(ValueError, match=f"^--bandwidth {value}: "):
            parse_bandwidth(value, timed)
        with pytest.raises(ValueError) as raised:
            parse_bandwidth(value, timed)
        assert message in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ValueError, match="records no frame rate"):
        parse_bandwidth("12kbps", spec)


def test_codec_mistakes_are_one_line(codec, bare, tmp_path, capsys):
    path = str(codec[0])
    wav = tmp_path / "in.wav"
    soundfile.write(str(wav), np.zeros(800, dtype=np.float32), RATE)
    assert main(["compress", path, str(wav), str(tmp_path / "o.vqc"), "--bandwidth", "5", "--quiet"]) == 2
    _error_line(capsys, "--bandwidth 5: this bundle has 2 layer(s)")
    assert main(["compress", path, str(tmp_path / "missing.wav"), str(tmp_path / "o.vqc"), "--quiet"]) == 2
    _error_line(capsys, "missing.wav")
    assert main(["compress", str(bare), str(wav), str(tmp_path / "o.vqc"), "--quiet"]) == 2
    _error_line(capsys, "not an audio bundle")
    assert main(["decompress", path, str(tmp_path / "missing.vqc"), str(tmp_path / "o.wav"), "--quiet"]) == 2
    _error_line(capsys, "missing.vqc")
    assert not (tmp_path / "o.vqc").exists() and not (tmp_path / "o.wav").exists()


def test_short_audio_has_no_bitrate_and_the_speed_is_said_once(codec, tmp_path, capsys):
    wav = tmp_path / "tiny.wav"
    soundfile.write(str(wav), np.full(3, 0.1, dtype=np.float32), RATE)
    assert main(["compress", str(codec[0]), str(wav), str(tmp_path / "t.vqc"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(too short for a bitrate)" in out and "kbit/s" not in out and out.count("x real time") == 1
    soundfile.write(str(wav), np.zeros(0, dtype=np.float32), RATE)  # empty: an empty stream, no rate or speed
    assert main(["compress", str(codec[0]), str(wav), str(tmp_path / "e.vqc"), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("compress: no audio (0 samples), 2 layer(s), ")
    run = SimpleNamespace(seconds=2.0, stream_bytes=3000, layers=2, kbps=12.0, real_time_factor=16.54)
    assert codec_summary("compress", run) == ("compress: 2.00 s of audio, 2 layer(s), 3,000 stream bytes, 12.00 "
                                              "kbit/s, 16.5x real time (audio seconds per wall-clock second, "
                                              "loading included)")


def test_keep_partial_keeps_the_audio_before_the_damage(codec, tmp_path, capsys):
    path = str(codec[0])
    wav = tmp_path / "in.wav"
    soundfile.write(str(wav), np.random.default_rng(0).uniform(-0.5, 0.5, int(2.5 * RATE)).astype(np.float32), RATE)
    assert main(["compress", path, str(wav), str(tmp_path / "s.vqc"), "--quiet"]) == 0
    data = (tmp_path / "s.vqc").read_bytes()  # frames of 1 s, 1 s and 0.5 s
    (tmp_path / "cut.vqc").write_bytes(data[:len(data) * 3 // 4])
    capsys.readouterr()
    assert main(["decompress", path, str(tmp_path / "cut.vqc"), str(tmp_path / "lost.wav"), "--quiet"]) == 2
    _error_line(capsys, "lost.wav", "--keep-partial")
    assert not (tmp_path / "lost.wav").exists()
    assert main(["decompress", path, str(tmp_path / "cut.vqc"), str(tmp_path / "kept.wav"), "--quiet",
                 "--keep-partial"]) == 2
    _error_line(capsys, "kept.wav")
    assert soundfile.info(str(tmp_path / "kept.wav")).frames >= RATE


# ------------------------------------------------------------------------------------------------ main


def test_the_last_line_of_defence(monkeypatch, capsys, tmp_path):
    import vqdeploy.cli as cli

    def crash(args):
        raise KeyError("surprise")

    monkeypatch.setattr(cli, "_info", crash)
    monkeypatch.delenv("VQDEPLOY_DEBUG", raising=False)
    assert main(["info", str(tmp_path)]) == 2
    _error_line(capsys, "vqdeploy info: error: unexpected KeyError: 'surprise' (set VQDEPLOY_DEBUG=1")
    monkeypatch.setenv("VQDEPLOY_DEBUG", "1")
    with pytest.raises(KeyError, match="surprise"):
        main(["info", str(tmp_path)])

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_info", interrupted)
    assert main(["info", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "vqdeploy info: interrupted"
    with pytest.raises(SystemExit) as usage:
        main(["info"])
    assert usage.value.code == 2
