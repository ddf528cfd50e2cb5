"""vector-quantize-pytorch 1.32.0 beside the test environment's 1.14.17.

The two releases share a package name, so 1.32.0 is installed into its own folder (``.ci/run`` does it; by hand
the line below) and run in a subprocess with that folder first on PYTHONPATH.  A suite hands all its cases to
one subprocess (a start costs seconds) and gets tensors back through safetensors files.
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
REFERENCE_DIR = Path(os.environ.get("VQDEPLOY_REFERENCE_1_32", ROOT / ".reference" / "vqp-1.32.0"))
INSTALL = (f"pip install --no-deps --target {REFERENCE_DIR} vector-quantize-pytorch==1.32.0 loguru "
           "torch-einops-utils")


def run_cases(cases: list[dict], inputs: dict[str, dict[str, torch.Tensor]], directory: Path) -> dict[str, dict]:
    """Run ``cases`` (name, class, config, seed, train, optional forward arguments) on 1.32.0 with
    ``inputs[name]`` (x, grad: the gradient of the output, optional mask or lens); returns each case's tensors
    (see reference_worker.py)."""
    if not (REFERENCE_DIR / "vector_quantize_pytorch").is_dir():
        raise RuntimeError(f"vector-quantize-pytorch 1.32.0 is not installed in {REFERENCE_DIR}: run `{INSTALL}` "
                           "(or set VQDEPLOY_REFERENCE_1_32 to where it is)")
    directory.mkdir(parents=True, exist_ok=True)
    for case in cases:
        save_file({k: v.contiguous() for k, v in inputs[case["name"]].items()},
                  directory / f"{case['name']}.in.safetensors")
    (directory / "spec.json").write_text(json.dumps(cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REFERENCE_DIR), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("reference_worker.py")),
                           str(directory / "spec.json"), str(directory)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vector-quantize-pytorch 1.32.0 failed:\n{done.stderr[-4000:]}")
    assert str(REFERENCE_DIR) in done.stdout, f"the subprocess imported another release: {done.stdout}"
    return {case["name"]: load_file(directory / f"{case['name']}.safetensors") for case in cases}


def split_state(results: dict, which: str) -> dict[str, torch.Tensor]:
    """The module state saved under ``which`` ("state" before the step, "after" after it)."""
    prefix = which + "."
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
