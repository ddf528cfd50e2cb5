"""Checkpoints of every release load: state dicts written by vector-quantize-pytorch releases that changed the
format (1.20.0; 1.27.0: the merged Codebook, 0-d bool flags; 1.32.0, the newest) load strictly into vqdeploy and
give that release's eval indices, for the VQ classes and the scalar ones (FSQ, LFQ with 1.14.35's spherical codes
over a cosine-similarity projection, their residual forms, LatentQuantize's per-channel ParameterList).
(1.14.17's are test_parity.py's and test_parity_scalar.py's.)

Each release runs in one subprocess (reference_release.py): its modules train two steps on random data (k-means,
dead codes, affine statistics included), save their state, and encode held-out data in eval mode.  vqdeploy
encodes it eagerly and, for the configurations of ``COMPILED``, compiled with fullgraph.

Two places where the releases' eval is not a function of the checkpoint, pinned here: their eval moves the affine
batch statistics toward the batch it encodes (vqdeploy's eval is pure: compared with the statistics the release's
eval used), and LatentQuantize's indices once its values have moved (recomputed from the values by truncation).
"""

import pytest
import torch

from vqdeploy import FSQ, LFQ, GroupedResidualVQ, LatentQuantize, ResidualFSQ, ResidualLFQ, ResidualVQ, VectorQuantize
from vqdeploy.latent_quantize import initial_values

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
    # issue 23's: k-means init with affine statistics; equal levels whose values then moved (1.32.0 only)
    "vq_kmeans_affine": (VectorQuantize, dict(dim=32, codebook_size=64, kmeans_init=True, affine_param=True)),
    "latent_equal_levels_moved": (LatentQuantize, dict(levels=[5, 5, 5], dim=16)),
}
SHAPES = {"latent": (2, 16, 4, 6), "vq_kmeans_affine": (2, 64, 32), "latent_equal_levels_moved": (2, 16, 16)}
MOVED_VALUES = {"latent_equal_levels_moved": [f"values_per_latent.{i}" for i in range(3)]}
COMPILED = ("vq_kmeans_affine", "latent_equal_levels_moved")


def _inputs(name: str) -> dict:
    """Random batches; LatentQuantize reads every input channel-first in these releases.  Moved values: each
    level's initial value shifted by 0.05 to 0.15 (away from the initial grid's truncation points), in order."""
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    inputs = {key: torch.randn(SHAPES.get(name, SHAPE), generator=generator) for key in ("pre0", "x", "grad", "x_eval")}
    for key in MOVED_VALUES.get(name, []):
        values = initial_values(5)
        shift = 0.05 + 0.1 * torch.rand(values.shape, generator=generator)
        inputs[f"set.{key}"] = values + shift * torch.where(torch.rand(values.shape, generator=generator) < 0.5, -1, 1)
    return inputs


def _defaults(release: str, name: str) -> dict:
    """ResidualFSQ of 1.18.5 to 1.25 computes as 1.14.17 (layers scaled (levels - 1)^-i), without its first bound."""
    return dict(defaults="1.14.17", bound_input_once=False) if name == "residual_fsq" and release == "1.20.0" else {}


# 1.20.0's affine_param fails in its own forward (UnboundLocalError); the moved values are set by 1.32.0's names
SKIPPED = {("1.20.0", "vq_affine_projection"), ("1.20.0", "vq_kmeans_affine"), ("1.20.0", "latent_equal_levels_moved"),
           ("1.27.0", "latent_equal_levels_moved")}
PAIRS = [(release, name) for release in RELEASES for name in CONFIGS if (release, name) not in SKIPPED]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    inputs = {name: _inputs(name) for name in CONFIGS}
    results = {}
    for release in RELEASES:
        cases = [dict(name=name, **{"class": cls.__name__}, config=config, seed=0, train=True, pre_steps=[{}],
                      set_after_step=MOVED_VALUES.get(name, []),
                      **({"decode_method": "indices_to_codes"} if name in MOVED_VALUES else {}))
                 for name, (cls, config) in CONFIGS.items() if (release, name) in PAIRS]
        results[release] = run_cases(cases, inputs, tmp_path_factory.mktemp(f"release_{release}"), release)
    return results


@pytest.mark.parametrize("release, name, mode", [(*pair, "eager") for pair in PAIRS]
                         + [("1.32.0", name, "compiled") for name in COMPILED])
def test_trained_checkpoint_loads_strictly_and_encodes_alike(checkpoints, release, name, mode):
    cls, config = CONFIGS[name]
    results = checkpoints[release][name]
    saved = split_state(results, "after")
    ours = cls(**config, **_defaults(release, name)).eval()
    ours.load_state_dict(saved, strict=True)
    state = {key: value.clone() for key, value in ours.state_dict().items()}
    assert all(torch.equal(state[key].float().reshape(-1), value.float().reshape(-1)) for key, value in saved.items())
    x = _inputs(name)["x_eval"]
    encode = torch.compile(ours, fullgraph=True) if mode == "compiled" else ours
    if config.get("affine_param"):
        with torch.no_grad():
            encode(x)
        assert all(torch.equal(value, state[key]) for key, value in ours.state_dict().items())  # eval is pure
        ours.load_state_dict(_eval_statistics(results, ours.project_in(x).detach()), strict=True)
    quantized, indices = encode(x)[:2]
    assert_rounding_close(quantized, results["eval_quantized"], n=x.numel(), data=x)
    if name in MOVED_VALUES:
        _check_moved_values(ours, indices, quantized, results)
    else:
        assert torch.equal(indices, results["eval_indices"])


def _eval_statistics(results: dict, x: torch.Tensor) -> dict:
    """The state the release's eval encoded with: its eval first moves the affine batch statistics toward the
    statistics of the batch ``x`` (after ``project_in``) by the batch decay (0.99), and changes nothing else."""
    saved, used = split_state(results, "after"), split_state(results, "eval_state")
    tokens = x.reshape(-1, x.shape[-1])
    for key, batch in (("_codebook.batch_mean", tokens.mean(0)), ("_codebook.batch_variance", tokens.var(0, unbiased=False))):
        assert_rounding_close(used[key], saved[key].lerp(batch.reshape(saved[key].shape), 0.01), n=tokens.shape[0], data=x)
    assert all(torch.equal(used[key], value) for key, value in saved.items() if ".batch_" not in key)
    return used


def _check_moved_values(ours: LatentQuantize, indices: torch.Tensor, quantized: torch.Tensor, results: dict) -> None:
    """Once the values have moved, 1.32.0's indices are not the levels it chose: it recomputes them from the
    chosen values as if they were on the initial grid, ``sum((value * 2 * half_width + half_width) * basis)``
    truncated to an integer, and its ``indices_to_codes`` decodes them on the initial grid.  vqdeploy's outputs
    equal 1.32.0's (the same values chosen, in the same order: the storage loads as saved), its indices are the
    chosen levels and decode to its output exactly; 1.32.0's are that truncation (for the moved values of
    ``_inputs``, every such sum lies at least 0.002 from an integer, far above the sum's rounding), and do not
    decode to its own output."""
    values = ours.lookup(indices)  # (b, n, codebook_dim): the chosen values, before project_out
    half_width = ours._levels // 2
    basis = torch.cumprod(torch.cat([half_width.new_ones(1), ours._levels[:-1]]), 0)
    truncated = ((values * 2 * half_width + half_width) * basis).sum(-1).to(torch.int32)
    assert torch.equal(truncated, results["eval_indices"])
    assert not torch.equal(indices, results["eval_indices"])
    assert torch.equal(ours.indices_to_codes(indices), quantized)
    assert not torch.allclose(results["eval_decoded"], results["eval_quantized"], atol=1e-3)


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
