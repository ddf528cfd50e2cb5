"""Releases of vector-quantize-pytorch other than the test environment's 1.14.17 (1.32.0, the newest, and
releases that changed the checkpoint format).

They share a package name, so each is installed into a folder of its own (``.ci/run`` does it; by hand the line
``INSTALL`` gives) and run in a subprocess with that folder first on PYTHONPATH.  A suite hands all its cases to
one subprocess per release (a start costs seconds) and gets tensors back through safetensors files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_ROOT = Path(os.environ.get("VQDEPLOY_REFERENCE_DIR", ROOT / ".reference"))
RELEASES = ("1.20.0", "1.27.0", "1.32.0")  # 1.32.0's extra dependencies: loguru, torch-einops-utils


def reference_dir(release: str) -> Path:
    return REFERENCE_ROOT / f"vqp-{release}"


def install_line(release: str) -> str:
    extra = " loguru torch-einops-utils" if release == "1.32.0" else ""
    return f"pip install --no-deps --target {reference_dir(release)} vector-quantize-pytorch=={release}{extra}"


def run_cases(cases: list[dict], inputs: dict[str, dict[str, torch.Tensor]], directory: Path,
              release: str = "1.32.0") -> dict[str, dict]:
    """Run ``cases`` (name, class, config, seed, train, optional forward arguments) on ``release`` with
    ``inputs[name]`` (x, grad: the gradient of the output, optional mask or lens, x_eval); returns each case's
    tensors (see reference_worker.py)."""
    folder = reference_dir(release)
    if not (folder / "vector_quantize_pytorch").is_dir():
        raise RuntimeError(f"vector-quantize-pytorch {release} is not installed in {folder}: run "
                           f"`{install_line(release)}` (or set VQDEPLOY_REFERENCE_DIR to the folder holding vqp-*)")
    directory.mkdir(parents=True, exist_ok=True)
    for case in cases:
        save_file({k: v.contiguous() for k, v in inputs[case["name"]].items()},
                  directory / f"{case['name']}.in.safetensors")
    (directory / "spec.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("reference_worker.py")),
                           str(directory / "spec.json"), str(directory)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vector-quantize-pytorch {release} failed:\n{done.stderr[-4000:]}")
    assert str(folder) in done.stdout, f"the subprocess imported another release: {done.stdout}"
    return {case["name"]: load_file(directory / f"{case['name']}.safetensors") for case in cases}


def split_state(results: dict, which: str) -> dict[str, torch.Tensor]:
    """The module state saved under ``which`` ("state" before the step, "after" after it)."""
    prefix = which + "."
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
