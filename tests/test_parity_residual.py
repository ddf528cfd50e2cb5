"""Parity of ResidualVQ, GroupedResidualVQ and RandomProjectionQuantizer with vector-quantize-pytorch 1.14.17.

Reference modules train a few steps, are saved as safetensors and loaded strictly; in eval the indices must
be equal and quantized outputs, all codes, get_output_from_indices and the cross-entropy loss within 1e-5;
one training step of ResidualVQ (quantized, losses, input gradient and every codebook) matches as well.
"""

import pytest
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

import vector_quantize_pytorch as vqp  # the reference, a test dependency

from vqdeploy import GroupedResidualVQ, RandomProjectionQuantizer, ResidualVQ

from tolerances import assert_no_drift, assert_rounding_close

# these suites compare with 1.14.17, so its defaults apply (the switch users of checkpoints trained with it take)
pytestmark = pytest.mark.usefixtures("defaults_1_14_17")

# one step of rounding (tolerances.py) with reductions bounded by the largest batch here (2 x 24 x 16 elements)
BOUND = dict(steps=1, n=2 * 24 * 16)

RESIDUAL = {
    "euclidean": (dict(dim=16, num_quantizers=3, codebook_size=32), (2, 24, 16)),
    "cosine": (dict(dim=16, num_quantizers=3, codebook_size=32, use_cosine_sim=True), (2, 24, 16)),
    "codebook_dim": (dict(dim=16, num_quantizers=3, codebook_size=32, codebook_dim=8), (2, 24, 16)),
    "shared_codebook": (dict(dim=16, num_quantizers=3, codebook_size=32, shared_codebook=True), (2, 24, 16)),
    "kmeans_dead_codes": (dict(dim=16, num_quantizers=3, codebook_size=16, kmeans_init=True, kmeans_iters=4,
                               threshold_ema_dead_code=1), (2, 24, 16)),
    "quantize_dropout": (dict(dim=16, num_quantizers=4, codebook_size=32, quantize_dropout=True,
                              quantize_dropout_cutoff_index=1), (2, 24, 16)),
    "image": (dict(dim=16, num_quantizers=3, codebook_size=32, accept_image_fmap=True), (2, 16, 4, 5)),
    "channel_first": (dict(dim=16, num_quantizers=3, codebook_size=32, channel_last=False), (2, 16, 24)),
    "single_vectors": (dict(dim=16, num_quantizers=3, codebook_size=32), (6, 16)),
    "decay_commitment": (dict(dim=16, num_quantizers=2, codebook_size=32, decay=0.5, commitment_weight=0.3),
                         (2, 24, 16)),
}

# the reference's cross-entropy path refuses feature maps and fails on channel-first input and single vectors
CROSS_ENTROPY_FAILS_IN_REFERENCE = ("image", "channel_first", "single_vectors")

# the reference draws k-means samples and dead-code replacements from its own generator stream
TRAIN_STEP = [name for name in RESIDUAL if name not in ("kmeans_dead_codes", "quantize_dropout")]


def _trained(cls, options, shape, steps=2):
    torch.manual_seed(0)
    ref = cls(**options)
    for _ in range(steps):
        ref(torch.randn(shape))
    return ref


def _load(ref, ours, tmp_path):
    path = str(tmp_path / "reference.safetensors")
    if any(layer._codebook is ref.layers[0]._codebook for layer in getattr(ref, "layers", [])[1:]):
        save_model(ref, path)  # shared tensors: safetensors stores them once
        load_model(ours, path, strict=True)
        return ours
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours.load_state_dict(load_file(path), strict=True)
    return ours


def _compare_eval(ref, ours, x):
    """Eval outputs with all codes: equal indices, close quantized, same loss shape; returns (indices, codes)."""
    q_ref, idx_ref, losses_ref, codes_ref = ref(x, return_all_codes=True)
    q, idx, losses, codes = ours(x, return_all_codes=True)
    assert idx.shape == idx_ref.shape and torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, **BOUND)
    assert losses.shape == losses_ref.shape
    return (idx, codes), (idx_ref, codes_ref)


@pytest.mark.parametrize("name", list(RESIDUAL))
def test_residual_eval_matches_reference(name, tmp_path):
    options, shape = RESIDUAL[name]
    ref = _trained(vqp.ResidualVQ, options, shape).eval()
    ours = _load(ref, ResidualVQ(**options), tmp_path).eval()
    x = torch.randn(shape)
    (idx, codes), (idx_ref, codes_ref) = _compare_eval(ref, ours, x)
    assert_rounding_close(codes, codes_ref, **BOUND)
    assert_rounding_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx_ref), **BOUND)
    if name not in CROSS_ENTROPY_FAILS_IN_REFERENCE:
        q_ce_ref, ce_ref = ref(x, indices=idx_ref)
        q_ce, ce = ours(x, indices=idx)
        assert_rounding_close(q_ce, q_ce_ref, **BOUND)
        assert_rounding_close(ce, ce_ref, **BOUND)


def test_residual_dropped_indices_decode_like_reference(tmp_path):
    options, shape = RESIDUAL["quantize_dropout"]
    ref = _trained(vqp.ResidualVQ, options, shape).eval()
    ours = _load(ref, ResidualVQ(**options), tmp_path).eval()
    idx = ours.encode(torch.randn(shape))
    for kept in range(1, 4):
        coarse = idx[..., :kept]
        assert_rounding_close(ours.get_output_from_indices(coarse), ref.get_output_from_indices(coarse), **BOUND)
        padded = torch.cat([coarse, torch.full_like(idx[..., kept:], -1)], dim=-1)
        assert_rounding_close(ours.get_codes_from_indices(padded), ref.get_codes_from_indices(padded), **BOUND)


@pytest.mark.parametrize("name", TRAIN_STEP)
def test_residual_training_step_matches_reference(name, tmp_path):
    options, shape = RESIDUAL[name]
    ref = _trained(vqp.ResidualVQ, options, shape)
    ours = _load(ref, ResidualVQ(**options), tmp_path)
    x = torch.randn(shape)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_ref, idx_ref, losses_ref = ref(x_ref)
    q, idx, losses = ours(x_ours)
    assert torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, **BOUND)
    assert_rounding_close(losses, losses_ref, **BOUND)
    (q_ref.pow(2).sum() + losses_ref.sum()).backward()
    (q.pow(2).sum() + losses.sum()).backward()
    assert_rounding_close(x_ours.grad, x_ref.grad, **BOUND)
    for i, (layer, ref_layer) in enumerate(zip(ours.layers, ref.layers)):
        for key in ("embed", "embed_avg", "cluster_size"):
            assert_rounding_close(getattr(layer._codebook, key), getattr(ref_layer._codebook, key), **BOUND,
                                  msg=f"layer {i} {key}")
            assert_no_drift(getattr(layer._codebook, key), getattr(ref_layer._codebook, key), msg=f"layer {i} {key}")


def test_residual_masked_training_step_matches_reference(tmp_path):
    options, shape = RESIDUAL["euclidean"]
    ref = _trained(vqp.ResidualVQ, options, shape)
    ours = _load(ref, ResidualVQ(**options), tmp_path)
    x = torch.randn(shape)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[1, 10:] = False
    q_ref, idx_ref, losses_ref = ref(x, mask=mask)
    q, idx, losses = ours(x, mask=mask)
    assert torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, **BOUND)
    assert_rounding_close(losses, losses_ref, **BOUND)
    for layer, ref_layer in zip(ours.layers, ref.layers):
        assert_rounding_close(layer._codebook.embed, ref_layer._codebook.embed, **BOUND)


GROUPED = {
    "sequence": (dict(dim=16, groups=2, num_quantizers=3, codebook_size=32), (2, 24, 16)),
    "codebook_dim": (dict(dim=16, groups=4, num_quantizers=2, codebook_size=32, codebook_dim=8), (2, 24, 16)),
    "image": (dict(dim=16, groups=2, num_quantizers=2, codebook_size=32, accept_image_fmap=True), (2, 16, 4, 5)),
}


@pytest.mark.parametrize("name", list(GROUPED))
def test_grouped_eval_matches_reference(name, tmp_path):
    options, shape = GROUPED[name]
    ref = _trained(vqp.GroupedResidualVQ, options, shape).eval()
    ours = _load(ref, GroupedResidualVQ(**options), tmp_path).eval()
    x = torch.randn(shape)
    (idx, codes), (idx_ref, codes_ref) = _compare_eval(ref, ours, x)
    for group_codes, group_codes_ref in zip(codes, codes_ref):
        assert_rounding_close(group_codes, group_codes_ref, **BOUND)
    assert_rounding_close(ours.get_codes_from_indices(idx), ref.get_codes_from_indices(idx_ref), **BOUND)
    # the reference joins feature-map groups along the height axis (a bug); both agree group by group
    expected = torch.cat([rvq.get_output_from_indices(group) for rvq, group in zip(ref.rvqs, idx_ref)], dim=-1)
    assert_rounding_close(ours.get_output_from_indices(idx), expected, **BOUND)
    if not options.get("accept_image_fmap"):
        assert_rounding_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx_ref), **BOUND)
        _, ce_ref = ref(x, indices=idx_ref)
        _, ce = ours(x, indices=idx)
        assert_rounding_close(ce, ce_ref, **BOUND)


def test_grouped_training_step_matches_reference(tmp_path):
    options, shape = GROUPED["sequence"]
    ref = _trained(vqp.GroupedResidualVQ, options, shape)
    ours = _load(ref, GroupedResidualVQ(**options), tmp_path)
    x = torch.randn(shape)
    q_ref, idx_ref, losses_ref = ref(x)
    q, idx, losses = ours(x)
    assert torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, **BOUND)
    assert_rounding_close(losses, losses_ref, **BOUND)
    assert_rounding_close(ours.codebooks, ref.codebooks, **BOUND)


@pytest.mark.parametrize("num_codebooks", [1, 4])
@pytest.mark.parametrize("norm", [True, False])
def test_random_projection_matches_reference(num_codebooks, norm, tmp_path):
    options = dict(dim=16, codebook_size=32, codebook_dim=8, num_codebooks=num_codebooks, norm=norm)
    torch.manual_seed(0)
    ref = vqp.RandomProjectionQuantizer(**options)
    ours = _load(ref, RandomProjectionQuantizer(**options), tmp_path)
    # the reference's extra projection exists when num_codebooks > 1; loading it rebuilds ours in its shape
    assert ours.has_reference_projection == (num_codebooks > 1)
    x = torch.randn(2, 24, 16)
    idx_ref, idx = ref(x), ours(x)
    assert idx.shape == idx_ref.shape and torch.equal(idx, idx_ref)
    assert_rounding_close(ours(x, indices=idx), ref(x, indices=idx_ref), **BOUND)
