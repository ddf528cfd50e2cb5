"""Models of packages built on vector-quantize-pytorch, unedited, on vqdeploy: audiolm-pytorch 2.4.0's SoundStream
(GroupedResidualVQ), meshgpt-pytorch 1.7.2's MeshAutoencoder (ResidualVQ, and its default ResidualLFQ) and
magvit2-pytorch 0.5.1's VideoTokenizer (spherical LFQ, and FSQ).

Each package's small model is trained two steps with vector-quantize-pytorch 1.32.0 (a subprocess with it first
on PYTHONPATH); a second subprocess substitutes vqdeploy (``vqdeploy.substitute``), loads that checkpoint
strictly, must tokenize and decode held-out data exactly as the reference did, trains on, and exports the
model's quantizer with onnxruntime parity on the features the model feeds it.  tests/install-downstream.sh
installs the packages (.ci/run runs it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reference_release import ROOT, install_line, reference_dir

WORKER = Path(__file__).with_name("downstream_worker.py")


PACKAGES = ("soundstream", "meshgpt", "meshgpt_lfq", "magvit2_bsq", "magvit2_fsq")


def start_worker(package: str, backend: str, out: Path, *arguments: str) -> subprocess.Popen:
    """One thread per worker: the two packages run side by side, and reference and vqdeploy with the same
    kernels (the bitwise comparison below assumes it)."""
    first = reference_dir("1.32.0") if backend == "reference" else ROOT
    if backend == "reference" and not (first / "vector_quantize_pytorch").is_dir():
        raise RuntimeError(f"vector-quantize-pytorch 1.32.0 is not installed: run `{install_line('1.32.0')}`")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(first), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), package, backend, str(out), *arguments], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(worker: subprocess.Popen, out: Path) -> dict:
    stdout, stderr = worker.communicate()
    assert worker.returncode == 0, f"{' '.join(worker.args[2:5])} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict, dict, Path]]:
    """Per package: the reference's run, vqdeploy's run from the reference's checkpoint, and their folder."""
    folders = {package: tmp_path_factory.mktemp(package) for package in PACKAGES}
    workers = {package: start_worker(package, "reference", folders[package] / "reference") for package in PACKAGES}
    references = {package: finish(worker, folders[package] / "reference") for package, worker in workers.items()}
    workers = {package: start_worker(package, "vqdeploy", folders[package] / "vqdeploy", "--load",
                                     str(folders[package] / "reference" / "state.safetensors"), "--export")
               for package in PACKAGES}
    return {package: (references[package], finish(worker, folders[package] / "vqdeploy"), folders[package])
            for package, worker in workers.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_runs_unchanged_on_vqdeploy(package, runs):
    reference, ours, folder = runs[package]
    assert reference["quantizer"].startswith("vector_quantize_pytorch.")
    assert ours["quantizer"].startswith("vqdeploy.")

    # The reference's checkpoint gives the same tokens, hence bitwise the same decoding: both sum a token's
    # codes over the layers with one reduction in the same order, and the rest of the model is the package's.
    expected = load_file(folder / "reference" / "trained.safetensors")
    got = load_file(folder / "vqdeploy" / "loaded.safetensors")
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), f"{package}: held-out {name} differ from the reference's"
    assert ours["loaded"] == reference["trained"]

    # vqdeploy trains the model on, and its quantizer exports with onnxruntime agreeing on every token
    assert len(ours["losses"]) == 2 and all(math.isfinite(loss) for loss in ours["losses"])
    assert all(math.isfinite(value) for value in ours["trained"].values())
    export = ours["export"]
    assert export["passed"] and export["real"] == 0 and export["tokens"] > 0
