"""The export/ recipes run end to end (a few compiled training steps, export, onnxruntime check, report)."""

import importlib.util
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "export"


def _recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_codec_recipe(tmp_path, capsys):
    # trained eagerly, like the tokenizers: compiling its training step (ResidualVQ with quantizer dropout, k-means,
    # dead codes) takes 40 s here, and test_compile_residual compiles those options already
    _recipe("codec").main(["--steps", "3", "--batch", "4", "--eager", "--out", str(tmp_path / "codec")])
    out = capsys.readouterr().out
    assert "reconstruction SNR" in out and "kbit/s" in out and "onnxruntime (CPU)" in out
    table = out[out.index("code streams of the held-out audio"):].splitlines()
    rows = [line.split() for line in table[2:6]]
    assert [row[0] for row in rows] == ["1", "2", "3", "4"]  # every bandwidth
    # entropy-coded never above packed: each segment falls back to packing (the header's "entropy" is one byte
    # longer than "packed": 0.001 kbit/s over the 8 s)
    assert all(float(row[2]) <= float(row[1]) + 0.01 for row in rows)
    assert (tmp_path / "codec" / "encoder.onnx").is_file() and (tmp_path / "codec" / "decoder.onnx").is_file()


@pytest.mark.parametrize("quantizer", ["fsq", "lfq"])
def test_tokenizer_recipe(quantizer, tmp_path, capsys):
    # trained eagerly: test_compile_scalar compiles FSQ and LFQ training
    _recipe("tokenizer").main(["--quantizer", quantizer, "--steps", "3", "--batch", "4", "--eager",
                               "--out", str(tmp_path / "tokenizer")])
    out = capsys.readouterr().out
    assert "reconstruction PSNR" in out and "tokens per image" in out
