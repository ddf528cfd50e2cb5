"""Parity with vector-quantize-pytorch 1.32.0 (the newest release), with its defaults: the rotation trick, zeros
for masked padding, code counts starting at one, its 0-d bool flags in checkpoints.

1.32.0 runs in one subprocess for the whole module (reference_release.py): each case builds a fresh 1.32.0 module,
saves its state, and runs one training step on the same inputs.  vqdeploy loads that state strictly and runs the
same step, eager and (the cases of ``COMPILED``) compiled with fullgraph; indices must be identical, outputs, the
input's and the parameters' gradients (through the rotation trick) and the codebook state after the step within
the rounding bound of one step (tolerances.py).  1.32.0's codebook writes go to new storage there
(``out_of_place_codebook``, reference_worker.py): in place, they reach the tensors its backward reads
(``test_1_32_gradient_reads_the_updated_codebook``).

Masks are compared on a single Euclidean head without projections: 1.32.0's masked commitment loss compares the
codes with the raw input, so it fails with heads or projections and is off with cosine similarity.
"""

import operator

import pytest
import torch

from vqdeploy import (FSP, FSQ, LFQ, BinaryMapper, EvoLFQ, GroupedResidualFSQ, GroupedResidualVQ, HierarchicalVQ, LatentQuantize, ResidualFSQ,
                      ResidualLFQ, ResidualSimVQ, ResidualVQ, SimVQ, VectorQuantize)

import vqdeploy.residual_vq as residual_vq
from reference_release import run_cases, split_state
from reference_worker import Autoencoder, module_from_spec
from tolerances import LFQ_ENTROPY_RTOL, assert_no_drift, assert_rounding_close

SHAPE = (2, 24, 16)
BASE = dict(dim=16, codebook_size=32)
# name: (class, constructor arguments, input shape, forward arguments); names ending in "masked" get a mask,
# in "lens" sequence lengths
CASES = {
    "vq": (VectorQuantize, BASE, SHAPE, {}),
    "vq_cosine": (VectorQuantize, dict(BASE, use_cosine_sim=True), SHAPE, {}),
    "vq_heads_separate": (VectorQuantize, dict(BASE, heads=2, codebook_dim=8, separate_codebook_per_head=True),
                          SHAPE, {}),
    "vq_heads_shared_projection": (VectorQuantize, dict(BASE, heads=2, codebook_dim=4), SHAPE, {}),
    "vq_affine": (VectorQuantize, dict(BASE, affine_param=True), SHAPE, {}),
    "vq_masked": (VectorQuantize, BASE, SHAPE, {}),
    "vq_lens": (VectorQuantize, BASE, SHAPE, {}),
    "vq_straight_through_off": (VectorQuantize, dict(BASE, rotation_trick=False), SHAPE, {}),
    "vq_gradients_not_routed_to_input": (VectorQuantize, dict(BASE, route_gradients_to_input=False,
                                                              commitment_weight=0.5), SHAPE, {}),
    "vq_diversity_breakdown": (VectorQuantize, dict(BASE, codebook_diversity_loss_weight=0.5,
                                                    codebook_diversity_temperature=10.0, heads=2, codebook_dim=8),
                               SHAPE, dict(return_loss_breakdown=True)),
    "vq_cosine_diversity_breakdown": (VectorQuantize, dict(BASE, use_cosine_sim=True,
                                                           codebook_diversity_loss_weight=1.0),
                                      SHAPE, dict(return_loss_breakdown=True)),
    "vq_diversity_projection": (VectorQuantize, dict(dim=32, codebook_size=64, codebook_dim=16,
                                                     codebook_diversity_loss_weight=0.1), (2, 64, 32), {}),
    "vq_layernorm_projection": (VectorQuantize, dict(BASE, codebook_dim=8, layernorm_after_project_in=True), SHAPE,
                                {}),
    "vq_3d_fmap": (VectorQuantize, dict(BASE, accept_3d_fmap=True), (2, 16, 2, 3, 4), {}),
    # EMA control: two micro-batches accumulated, then the step; a per-code EMA weight; a manual update
    "vq_accumulated_ema": (VectorQuantize, dict(BASE, threshold_ema_dead_code=0.5), SHAPE, {}),
    "vq_ema_update_weight": (VectorQuantize, dict(BASE, heads=2, codebook_dim=8, separate_codebook_per_head=True),
                             SHAPE, {}),
    "vq_manual_ema_update": (VectorQuantize, dict(BASE, manual_ema_update=True), SHAPE, {}),
    "vq_call_without_ema": (VectorQuantize, dict(BASE, threshold_ema_dead_code=0.5), SHAPE, dict(ema_update=False)),
    "vq_bridge": (VectorQuantize, dict(BASE, vq_bridge={"module": "Linear", "args": [16, 16]}), SHAPE, {}),
    "residual": (ResidualVQ, dict(BASE, num_quantizers=3), SHAPE, {}),
    "residual_masked": (ResidualVQ, dict(BASE, num_quantizers=2), SHAPE, {}),
    "residual_shared_codebook": (ResidualVQ, dict(BASE, num_quantizers=3, shared_codebook=True), SHAPE, {}),
    "residual_shared_codebook_cosine": (ResidualVQ, dict(BASE, num_quantizers=2, shared_codebook=True,
                                                                 use_cosine_sim=True), SHAPE, {}),
    "grouped": (GroupedResidualVQ, dict(BASE, groups=2, num_quantizers=2), SHAPE, {}),
    "residual_layer_sizes": (ResidualVQ, dict(dim=16, codebook_size=(32, 16, 8)), SHAPE, {}),
    "grouped_layer_sizes": (GroupedResidualVQ, dict(dim=16, groups=2, codebook_size=(16, 8)), SHAPE, {}),
    "residual_quant_grad_frac": (ResidualVQ, dict(BASE, num_quantizers=3, quant_grad_frac=0.5), SHAPE, {}),
    "residual_implicit_codebook_masked": (ResidualVQ, dict(BASE, num_quantizers=3, implicit_neural_codebook=True,
                                                           mlp_kwargs={"depth": 2, "dim_hidden": 24}), SHAPE, {}),
    "residual_beam": (ResidualVQ, dict(BASE, num_quantizers=3, beam_size=3), SHAPE, {}),
    "residual_beam_weights_frac_masked": (ResidualVQ, dict(BASE, num_quantizers=3, beam_size=2, eval_beam_size=4,
                                                           beam_score_quantizer_weights=[1.0, 0.5, 2.0],
                                                           quant_grad_frac=0.5), SHAPE, {}),
    "residual_beam_shared_cosine": (ResidualVQ, dict(BASE, num_quantizers=2, beam_size=2, shared_codebook=True,
                                                     use_cosine_sim=True), SHAPE, {}),
    "simvq": (SimVQ, BASE, SHAPE, {}),
    "simvq_channel_first_image_frozen_dim": (SimVQ, dict(BASE, channel_first=True, frozen_codebook_dim=8,
                                                        rotation_trick=False, commitment_weight=0.5),
                                             (2, 16, 4, 6), {}),
    "residual_simvq": (ResidualSimVQ, dict(BASE, num_quantizers=3), SHAPE, {}),
    # DiVeQ's noise is drawn differently (one uniform draw per step): compared without it
    "vq_diveq": (VectorQuantize, dict(BASE, directional_reparam=True, directional_reparam_variance=0.0,
                                      threshold_ema_dead_code=0.5), SHAPE, {}),
    "residual_diveq_masked": (ResidualVQ, dict(BASE, num_quantizers=2, diveq=True), SHAPE, {}),
    # FSQ's 1.32.0 options (noise dropout draws other random numbers: test_fsq.py checks it)
    "fsq_symmetric_levels_of_2": (FSQ, dict(levels=[2, 4, 5], dim=16, preserve_symmetry=True), SHAPE, {}),
    "fsq_hard_clamp_rotation": (FSQ, dict(levels=[5, 5, 5], dim=16, bound_hard_clamp=True, orthogonal_rotation=True),
                                SHAPE, {}),
    "fsq_symmetric_hard_clamp_no_indices": (FSQ, dict(levels=[8, 5, 5], dim=16, preserve_symmetry=True,
                                                      bound_hard_clamp=True, return_indices=False), SHAPE, {}),
    # ResidualFSQ's 1.32.0 scheme: symmetric layers scaled levels^-i, a tanh clamp before hard clamps (default)
    "residual_fsq": (ResidualFSQ, dict(dim=16, levels=[8, 5, 5, 5], num_quantizers=3), SHAPE, {}),
    "residual_fsq_soft_clamp_channel_first": (ResidualFSQ, dict(dim=16, levels=[5, 4, 5], num_quantizers=2,
                                                                bound_hard_clamp=False, soft_clamp_input_value=2.0,
                                                                is_channel_first=True), (2, 16, 24), {}),
    "grouped_residual_fsq": (GroupedResidualFSQ, dict(dim=16, groups=2, levels=[5, 5, 5], num_quantizers=2), SHAPE,
                             {}),
    # LatentQuantize: channel-first sequences, values always a ParameterList, codebook_dim, num_codebooks > 1
    "latent": (LatentQuantize, dict(levels=[5, 5, 8], dim=16), (2, 16, 24), {}),
    "latent_int_levels_codebooks": (LatentQuantize, dict(levels=4, codebook_dim=3, dim=6, num_codebooks=2),
                                    (2, 6, 24), {}),
    "latent_equal_levels_no_loss": (LatentQuantize, dict(levels=[5, 5, 5], dim=16, commitment_loss_weight=0.0,
                                                         quantization_loss_weight=0.0), (2, 16, 4, 6), {}),
    # FSP (its training perturbation draws other random numbers: test_fsp.py checks it) and BinaryMapper (bits
    # thresholded; sampling draws other random numbers: test_binary_mapper.py)
    "fsp": (FSP, dict(levels=[8, 5, 5, 5], dim=16, quantize_rate=1.0), SHAPE, {}),
    "fsp_inverse_normal_channel_first_image": (FSP, dict(levels=[8, 5, 5], dim=16, channel_first=True,
                                                         act_name="normal", need_inv_act=True, quantize_rate=1.0,
                                                         vector_norm="kurt"), (2, 16, 4, 6), {}),
    "binary_mapper": (BinaryMapper, dict(bits=6, kl_loss_threshold=0.3), (2, 24, 6),
                      dict(deterministic=True, return_indices=True)),
    "evo_lfq": (EvoLFQ, dict(encoder={"module": "Linear", "args": [16, 8]}, decoder={"module": "Linear", "args": [8, 16]},
                             dim=8, codebook_size=16, num_codebooks=2, spherical=True), SHAPE, {}),
    # LFQ's 1.32.0 options, and meshgpt-pytorch's ResidualLFQ (softplus entropy loss, a clamp halved per layer)
    "lfq_spherical": (LFQ, dict(dim=16, codebook_size=256, spherical=True), SHAPE, {}),
    # masked LFQ: 1.32.0's batch entropy is wrong there (see test_lfq_mask_batch_entropy_1_32): entropy weight 0
    "lfq_spherical_commitment_breakdown_masked": (
        LFQ, dict(dim=16, codebook_size=2 ** 16, spherical=True, commitment_loss_weight=0.25, entropy_loss_weight=0.0),
        SHAPE, dict(return_loss_breakdown=True)),
    "lfq_cosine_project_in_rotation_softplus": (
        LFQ, dict(dim=16, codebook_size=64, cosine_sim_project_in=True, orthogonal_rotation=True,
                  experimental_softplus_entropy_loss=True, entropy_loss_offset=2.0), SHAPE, {}),
    "lfq_channel_first_codebooks_forced_projections": (
        LFQ, dict(dim=16, codebook_size=16, num_codebooks=4, has_projections=True, channel_first=True,
                  soft_clamp_input_value=1.5, cosine_sim_project_in=True, cosine_sim_project_in_scale=2.0),
        (2, 16, 24), dict(inv_temperature=10.0)),
    "lfq_video": (LFQ, dict(dim=16, codebook_size=256, spherical=True), (2, 16, 2, 3, 4), {}),
    "residual_lfq_meshgpt": (ResidualLFQ, dict(dim=16, codebook_size=256, num_quantizers=3,
                                               experimental_softplus_entropy_loss=True, soft_clamp_input_value=10),
                             SHAPE, {}),
    "residual_lfq_spherical_masked": (ResidualLFQ, dict(dim=16, codebook_size=64, num_quantizers=2, spherical=True,
                                                        commitment_loss_weight=0.1, entropy_loss_weight=0.0),
                                      SHAPE, {}),
    # k-means and dead codes draw random rows (other random numbers than 1.32.0's): off in parity
    "hierarchical": (HierarchicalVQ, dict(BASE, scales=[1, 2, 4, 8], kmeans_init=False, threshold_ema_dead_code=0),
                     (2, 16, 8), {}),
    "hierarchical_image_levels_channel_last_masked": (
        HierarchicalVQ, dict(dim=16, codebook_size=[32, 16, 8], scales=[1, 2, [2, 4]], shared_codebook=False,
                             accept_image_fmap=True, channel_first=False, share_quant_resi=2, rotation_trick=True,
                             commitment_weight=0.5, kmeans_init=False, threshold_ema_dead_code=0),
        (2, 4, 4, 16), {}),
}


def _inputs(name: str) -> dict:
    shape = CASES[name][2]
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    out_shape = (*shape[:-1], 2 ** CASES[name][1]["bits"]) if CASES[name][0] is BinaryMapper else shape
    inputs = {"x": torch.randn(shape, generator=generator), "grad": torch.randn(out_shape, generator=generator)}
    if name.endswith("masked"):
        mask = torch.ones(shape[:-1] if CASES[name][0] is HierarchicalVQ else shape[:2], dtype=torch.bool)
        mask[1, 15 % mask.shape[1]:] = False
        inputs["mask"] = mask
    if name.endswith("lens"):
        inputs["lens"] = torch.tensor([shape[1], 9])
    if name == "vq_accumulated_ema":
        inputs.update(pre0=torch.randn(shape, generator=generator), pre1=torch.randn(shape, generator=generator))
    if "beam" in name or "implicit" in name:  # the trained module then encodes held-out data
        inputs["x_eval"] = torch.randn(shape, generator=generator)
    if name == "vq_ema_update_weight":
        inputs["kw.ema_update_weight"] = torch.rand(2, CASES[name][1]["codebook_size"], generator=generator)
    return inputs


PRE_STEPS = {"vq_accumulated_ema": [dict(accum_ema_update=True)] * 2}
POST_METHODS = {"vq_manual_ema_update": ["_codebook.update_ema"]}
# also compiled (fullgraph): the configurations of issue 23, and the defaults' rotation trick
COMPILED = ("vq", "vq_diversity_projection", "hierarchical")
IN_PLACE = "vq_diversity_projection"  # also run with 1.32.0's codebook writes in place, as it ships


def _case(name: str, /, **changes) -> dict:
    cls, config, _, forward = CASES[name]
    return dict(name=name, **{"class": cls.__name__}, config=config, seed=0, train=True, forward=forward,
                **({"diveq_variance": 0.0} if config.get("diveq") else {}), out_of_place_codebook=True,
                pre_steps=PRE_STEPS.get(name, []), post_methods=POST_METHODS.get(name, [])) | changes


# training with the defaults (rotation trick, EMA, commitment) inside an autoencoder, as 1.32.0 ships
TRAJECTORY = dict(name="trajectory", **{"class": "VectorQuantize"}, config=dict(dim=16, codebook_size=64), seed=0,
                  train=True, trajectory=dict(lr=0.01))
TRAJECTORY_STEPS, TRAJECTORY_BATCH = 50, (4, 16, 24)


def _trajectory_batches() -> torch.Tensor:
    """Clustered features (10 centres and noise), so the codes have structure to learn: (steps, *batch)."""
    generator = torch.Generator().manual_seed(23)
    centres = 1.5 * torch.randn(10, TRAJECTORY_BATCH[-1], generator=generator)
    which = torch.randint(0, 10, (TRAJECTORY_STEPS, *TRAJECTORY_BATCH[:-1]), generator=generator)
    return centres[which] + 0.3 * torch.randn(TRAJECTORY_STEPS, *TRAJECTORY_BATCH, generator=generator)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cases = [_case(name) for name in CASES] + [_case(IN_PLACE, name="in_place", out_of_place_codebook=False),
                                               TRAJECTORY]
    inputs = ({name: _inputs(name) for name in CASES} | {"in_place": _inputs(IN_PLACE)}
              | {"trajectory": {"x": _trajectory_batches()}})
    return run_cases(cases, inputs, tmp_path_factory.mktemp("reference_1_32"))


@pytest.mark.parametrize("name, mode", [(name, "eager") for name in CASES] + [(name, "compiled") for name in COMPILED])
def test_training_step_matches_1_32(reference, name, mode, monkeypatch):
    cls, config, _, forward = CASES[name]
    config = {key: module_from_spec(value) if isinstance(value, dict) and "module" in value else value
              for key, value in config.items()}
    monkeypatch.setattr(residual_vq, "DIVEQ_VARIANCE", 0.0)  # as the reference's run (see reference_worker.py)
    results, inputs = reference[name], _inputs(name)
    module = cls(**config)
    module.load_state_dict(split_state(results, "state"), strict=True)
    ours = torch.compile(module, fullgraph=True) if mode == "compiled" else module
    x = inputs["x"].clone().requires_grad_()
    kwargs = {key: inputs[key] for key in ("mask", "lens") if key in inputs}
    kwargs.update({key[3:]: value for key, value in inputs.items() if key.startswith("kw.")})
    for i, pre in enumerate(PRE_STEPS.get(name, [])):
        ours(inputs[f"pre{i}"], **pre)
    out = ours(x, **kwargs, **forward)
    out, breakdown = out if len(out) == 2 and isinstance(out[0], tuple) else (out, getattr(out, "breakdown", None))
    quantized, indices = out[:2]
    loss = out[2] if len(out) > 2 else torch.zeros(())  # FSQ returns no loss
    bound = dict(n=x.numel() * (1 + len(PRE_STEPS.get(name, []))), data=x.detach())  # accumulated batches sum too
    # LFQ: the reference clamps probabilities inside its per-sample entropy, vqdeploy's is exact (tolerances.py)
    loss_rtol = LFQ_ENTROPY_RTOL if cls in (LFQ, ResidualLFQ, EvoLFQ) else 0.0
    if forward.get("return_loss_breakdown"):
        for i, term in enumerate(breakdown):
            if cls is LFQ and "masked" in name and breakdown._fields[i] == "batch_entropy":
                continue  # 1.32.0's is wrong under a mask (test_lfq_mask_batch_entropy_1_32)
            assert_rounding_close(term.reshape(-1), results[f"breakdown.{i}"], **bound, msg=breakdown._fields[i],
                                  rtol=loss_rtol)

    if cls is FSP:
        assert torch.equal(out.info["level_indices"], results["info.level_indices"])
    if isinstance(indices, tuple):  # one index map per level
        assert all(torch.equal(level, results[f"indices.{i}"]) for i, level in enumerate(indices))
    elif indices is None:
        assert "indices" not in results
    else:
        assert torch.equal(indices, results["indices"])
    assert_rounding_close(quantized, results["quantized"], **bound, msg="quantized")
    assert_rounding_close(loss.reshape(-1), results["loss"], **bound, msg="loss", rtol=loss_rtol)
    if cls is LatentQuantize and loss.detach().abs().sum() > 0:
        return  # its loss trains the values, as the paper does (README): gradients compared without a loss
    ((quantized * inputs["grad"]).sum() + loss.sum()).backward()
    assert_rounding_close(x.grad, results["x_grad"], **bound, msg="input gradient", rtol=loss_rtol)
    for key, value in module.named_parameters():
        if f"grad.{key}" in results or value.grad is not None:
            assert_rounding_close(value.grad, results[f"grad.{key}"], **bound, msg=f"{key} gradient", rtol=loss_rtol)
    for method in POST_METHODS.get(name, []):
        operator.attrgetter(method)(module)()
    after = split_state(results, "after")
    for key, value in module.state_dict().items():
        if key.endswith(("embed", "embed_avg", "cluster_size")) and _state_comparable(name, config, key):
            assert_rounding_close(value, after[key], **bound, msg=key)
            assert_no_drift(value, after[key], msg=key)
    if "x_eval" in inputs:  # eval (beam search, implicit codebooks) from the state 1.32.0 trained
        trained = cls(**config).eval()
        trained.load_state_dict(after, strict=True)
        with torch.no_grad():
            quantized, indices = trained(inputs["x_eval"])[:2]
        assert torch.equal(indices, results["eval_indices"])
        assert torch.equal(trained.encode(inputs["x_eval"]), indices)
        assert_rounding_close(quantized, results["eval_quantized"], **bound, msg="eval quantized")
        assert_rounding_close(trained.get_output_from_indices(indices), quantized, **bound, msg="decoded")


def _state_comparable(name: str, config: dict, key: str) -> bool:
    """1.32.0's beam search in training updates only the first layer's codebook (it takes the chosen beam's
    layer inputs with ``all_residuals[..., 0, :]``, which picks layer 0 rather than beam 0, so the later
    layers' EMA never runs; with a shared codebook only layer 0's rows reach it).  vqdeploy updates every layer
    from the chosen path (README, differences): the outputs, losses and gradients of the step are compared,
    and the codebook state only where 1.32.0 updates it as intended."""
    if "beam" not in name:
        return True
    return key.startswith("layers.0.") and not config.get("shared_codebook")


def test_fifty_training_steps_match_1_32(reference):
    """Every step of 50 that 1.32.0 trains (a linear autoencoder around ``VectorQuantize`` with the defaults:
    the rotation trick, EMA, the commitment loss; Adam on the reconstruction), taken from 1.32.0's state before
    that step: the same indices, outputs, losses, gradients and codebook update.  Later steps start from
    codebooks, cluster sizes and encoders that training has moved, which one step from a fresh module does not
    reach; each starts from 1.32.0's own state, so rounding does not accumulate over the trajectory."""
    results = reference["trajectory"]
    batches = _trajectory_batches()
    for step, x in enumerate(batches):
        prefix = f"step{step}."
        model = Autoencoder(VectorQuantize(**TRAJECTORY["config"]), x.shape[-1], TRAJECTORY["config"]["dim"]).train()
        model.load_state_dict(split_state(results, prefix + "state"), strict=True)
        quantized, indices, loss, total = model(x)
        total.backward()
        bound = dict(n=x.numel(), data=torch.cat([x.flatten(), quantized.detach().flatten()]))
        assert torch.equal(indices, results[prefix + "indices"]), f"step {step}"
        for key, value in (("quantized", quantized), ("loss", loss.reshape(-1)), ("total", total.reshape(-1))):
            assert_rounding_close(value, results[prefix + key], **bound, msg=f"{key} at step {step}")
        for key, value in model.named_parameters():
            assert_rounding_close(value.grad, results[f"{prefix}grad.{key}"], **bound, msg=f"{key} gradient at {step}")
        after = split_state(results, prefix + "after")
        for key, value in model.state_dict().items():
            if key.endswith(("embed", "embed_avg", "cluster_size")):
                assert_rounding_close(value, after[key], **bound, msg=f"{key} at step {step}")
    final = split_state(results, f"step{TRAJECTORY_STEPS - 1}.after")
    assert (final["quantizer._codebook.cluster_size"] > 0.5).sum() >= 8  # the codes did train (10 clusters)


def test_1_32_gradient_reads_the_updated_codebook(reference):
    """Why 1.32.0's codebook writes go to new storage in this suite: as it ships, its EMA step overwrites the
    codebook through ``.data`` after the forward, and the distances' backward (the diversity loss's path to the
    input and ``project_in``) reads the overwritten codes.  The same step with the writes out of place has the
    same forward, loss, indices and codebook state, bit for bit, and another gradient: so 1.32.0's gradient is
    not the derivative of what its forward computed.  vqdeploy's is (``test_training_step_matches_1_32`` compares
    it with the out-of-place step; README, differences)."""
    shipped, out_of_place = reference["in_place"], reference[IN_PLACE]
    for key in ("quantized", "indices", "loss", *(k for k in out_of_place if k.startswith("after."))):
        assert torch.equal(shipped[key], out_of_place[key]), key
    for key in ("x_grad", "grad.project_in.weight", "grad.project_in.bias"):
        assert not torch.allclose(shipped[key], out_of_place[key], rtol=0.01, atol=1e-3), key
    assert torch.equal(shipped["grad.project_out.weight"], out_of_place["grad.project_out.weight"])


def test_lfq_mask_batch_entropy_1_32(reference):
    """Why masked LFQ cases run with entropy weight 0: 1.32.0 masks the (b, n, c, d) input before flattening it
    with ``'b n ... -> (b n) ...'``, so the kept rows' codebook axis is folded into the tokens and its "average"
    code distribution is each token's own: the batch entropy equals the per-sample entropy and the entropy loss is
    0 at diversity_gamma=1.  vqdeploy averages over the kept tokens, as 1.14.17 does (test_parity_scalar.py)."""
    breakdown = [reference["lfq_spherical_commitment_breakdown_masked"][f"breakdown.{i}"] for i in range(2)]
    torch.testing.assert_close(breakdown[1], breakdown[0])


SIGNATURES = """
import inspect, json, vector_quantize_pytorch as reference
names = {names!r}
print(json.dumps({{name: [p.name for p in inspect.signature(getattr(reference, name).__init__).parameters.values()
                         if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
                  for name in names}}))
"""


def test_every_1_32_constructor_argument_is_taken():
    """Every named constructor argument of 1.32.0's classes is one vqdeploy's class takes (directly, or through
    the **kwargs it passes to its layers)."""
    import json
    import os
    import subprocess
    import sys

    from reference_release import reference_dir
    from vqdeploy.export.bundle import quantizer_classes
    from vqdeploy.export.consistency import constructor_arguments

    import inspect

    import vqdeploy

    def ours(name: str) -> set[str]:
        if name in quantizer_classes():
            return constructor_arguments(name)
        taken = set(inspect.signature(getattr(vqdeploy, name).__init__).parameters)
        return taken | (constructor_arguments("LFQ") if name == "EvoLFQ" else set())  # its **lfq_kwargs

    names = sorted(quantizer_classes()) + ["BinaryMapper", "EvoLFQ"]
    env = dict(os.environ, PYTHONPATH=str(reference_dir("1.32.0")))
    done = subprocess.run([sys.executable, "-c", SIGNATURES.format(names=names)], env=env, capture_output=True,
                          text=True, check=True)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    missing = {name: sorted(set(arguments) - ours(name)) for name, arguments in theirs.items()}
    assert not any(missing.values()), missing
