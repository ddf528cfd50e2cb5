"""Checkpoints of every release load: state dicts written by vector-quantize-pytorch releases that changed the
format (1.20.0; 1.27.0: the merged Codebook, 0-d bool flags; 1.32.0, the newest) load strictly into vqdeploy and
give that release's eval indices, for the VQ classes and the scalar ones (FSQ, LFQ with 1.14.35's spherical codes
over a cosine-similarity projection, their residual forms, LatentQuantize's per-channel ParameterList).
(1.14.17's are test_parity.py's and test_parity_scalar.py's.)

Each release runs in one subprocess (reference_release.py): its modules train two steps on random data (k-means,
dead codes, affine statistics included), save their state, and encode held-out data in eval mode.
"""

import pytest
import torch

from vqdeploy import FSQ, LFQ, GroupedResidualVQ, LatentQuantize, ResidualFSQ, ResidualLFQ, ResidualVQ, VectorQuantize

from reference_release import RELEASES, run_cases, split_state
from tolerances import assert_rounding_close

SHAPE = (2, 24, 16)
BASE = dict(dim=16, codebook_size=32)
CONFIGS = {
    "vq_kmeans_dead_codes": (VectorQuantize, dict(BASE, kmeans_init=True, kmeans_iters=3, threshold_ema_dead_code=2)),
    "vq_cosine_heads": (VectorQuantize, dict(BASE, use_cosine_sim=True, heads=2, separate_codebook_per_head=True)),
    "vq_affine_projection": (VectorQuantize, dict(BASE, affine_param=True, codebook_dim=8)),
    "residual_shared": (ResidualVQ, dict(BASE, num_quantizers=3, shared_codebook=True, kmeans_init=True)),
    "grouped": (GroupedResidualVQ, dict(BASE, groups=2, num_quantizers=2)),
    "fsq_projection": (FSQ, dict(levels=[8, 5, 5, 5], dim=16)),
    "residual_fsq": (ResidualFSQ, dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=3)),
    "lfq_spherical_cosine": (LFQ, dict(dim=16, codebook_size=2**6, spherical=True, cosine_sim_project_in=True)),
    "residual_lfq": (ResidualLFQ, dict(dim=16, codebook_size=2**6, num_quantizers=2)),
    "latent": (LatentQuantize, dict(levels=[5, 5, 8], dim=16)),
}
IMAGE = (2, 16, 4, 6)  # LatentQuantize reads every input channel-first in these releases


def _inputs(name: str) -> dict:
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    shape = IMAGE if name == "latent" else SHAPE
    return {key: torch.randn(shape, generator=generator) for key in ("pre0", "x", "grad", "x_eval")}


def _defaults(release: str, name: str) -> dict:
    """ResidualFSQ of 1.18.5 to 1.25 computes as 1.14.17 (layers scaled (levels - 1)^-i), without its first bound."""
    return dict(defaults="1.14.17", bound_input_once=False) if name == "residual_fsq" and release == "1.20.0" else {}


BROKEN = {("1.20.0", "vq_affine_projection")}  # 1.20.0's affine_param fails in its own forward (UnboundLocalError)
PAIRS = [(release, name) for release in RELEASES for name in CONFIGS if (release, name) not in BROKEN]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    inputs = {name: _inputs(name) for name in CONFIGS}
    results = {}
    for release in RELEASES:
        cases = [dict(name=name, **{"class": cls.__name__}, config=config, seed=0, train=True, pre_steps=[{}])
                 for name, (cls, config) in CONFIGS.items() if (release, name) in PAIRS]
        results[release] = run_cases(cases, inputs, tmp_path_factory.mktemp(f"release_{release}"), release)
    return results


@pytest.mark.parametrize("release, name", PAIRS)
def test_trained_checkpoint_loads_strictly_and_encodes_alike(checkpoints, release, name):
    cls, config = CONFIGS[name]
    results = checkpoints[release][name]
    ours = cls(**config, **_defaults(release, name)).eval()
    ours.load_state_dict(split_state(results, "after"), strict=True)
    saved = split_state(results, "after")
    state = ours.state_dict()
    assert all(torch.equal(state[key].float().reshape(-1), value.float().reshape(-1)) for key, value in saved.items())
    if config.get("affine_param"):
        return  # the reference's eval moves its affine statistics before it encodes; vqdeploy's eval is pure
    x = _inputs(name)["x_eval"]
    quantized, indices = ours(x)[:2]
    assert torch.equal(indices, results["eval_indices"])
    assert_rounding_close(quantized, results["eval_quantized"], n=x.numel(), data=x)


def test_the_command_line_exports_a_1_32_checkpoint(checkpoints, tmp_path):
    """`vqdeploy export --weights` takes a checkpoint of 1.32.0 (0-d bool flags, a shared codebook) as it is."""
    import json

    import numpy as np
    import onnxruntime as ort
    from safetensors.torch import save_file

    from vqdeploy.cli import main

    results = checkpoints["1.32.0"]["residual_shared"]
    save_file({k: v.contiguous() for k, v in split_state(results, "after").items()}, tmp_path / "rvq.safetensors")
    assert main(["export", "--class", "ResidualVQ", "--config", json.dumps(CONFIGS["residual_shared"][1]),
                 "--weights", str(tmp_path / "rvq.safetensors"), "--out", str(tmp_path / "bundle")]) == 0
    session = ort.InferenceSession(str(tmp_path / "bundle" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    indices = session.run(None, {"inputs": _inputs("residual_shared")["x_eval"].numpy()})[0]
    assert np.array_equal(indices, results["eval_indices"].numpy())
