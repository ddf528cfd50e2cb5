"""The vqdeploy command: export from a (reference) safetensors state_dict, verify, info, bench."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import torch
from safetensors.torch import save_file

from vqdeploy.cli import main


def test_reference_checkpoint_exports_verifies_and_benches_from_the_command_line(tmp_path, capsys):
    import vector_quantize_pytorch as vqp

    torch.manual_seed(0)
    config = dict(dim=16, codebook_size=32, num_quantizers=2)
    ref = vqp.ResidualVQ(**config)
    for _ in range(2):
        ref(torch.randn(4, 20, 16))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "rvq.safetensors"))
    bundle = str(tmp_path / "bundle")
    assert main(["export", "--class", "ResidualVQ", "--config", json.dumps(config),
                 "--weights", str(tmp_path / "rvq.safetensors"), "--out", bundle, "--index-dtype", "int32"]) == 0
    assert "encoder" in capsys.readouterr().out
    session = ort.InferenceSession(f"{bundle}/encoder.onnx", providers=["CPUExecutionProvider"])
    x = torch.randn(2, 30, 16)
    assert np.array_equal(session.run(None, {"inputs": x.numpy()})[0], ref.eval()(x)[1].numpy())

    assert main(["verify", bundle]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["bench", bundle, "--provider", "cpu", "--batch", "2", "--tokens", "64", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert "encode" in out and "decode" in out
    info = subprocess.run([sys.executable, "-m", "vqdeploy.cli", "info", bundle], capture_output=True, text=True,
                          check=True).stdout
    assert "ResidualVQ" in info and "int32" in info


def test_cli_errors_are_clear(tmp_path, capsys):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    cases = [(["export", "--class", "Nope", "--out", str(tmp_path / "a")], "unknown class 'Nope'"),
             (["export", "--class", "FSQ", "--config", "{levels", "--out", str(tmp_path / "b")], "not valid JSON"),
             (["export", "--class", "FSQ", "--config", '{"levels": [5, 5], "dim": 4}', "--weights",
               str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "c")], "does not fit FSQ")]
    for argv, message in cases:
        assert main(argv) == 2
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0].startswith("vqdeploy export: error: ") and message in errors[0]
        assert "Traceback" not in captured.err
    assert not any((tmp_path / name).exists() for name in "abc")
