"""Parity with vector-quantize-pytorch 1.14.17: its checkpoints load, and outputs match.

Reference modules are trained for a few steps, saved as safetensors (no pickle), loaded into vqdeploy with a
strict load_state_dict; then eval outputs (indices equal, quantized within rounding) and one EMA training step
(quantized, loss, input gradient and codebook state within the rounding bound of ``tolerances`` for one step,
the state also free of drift) are compared.
"""

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import vector_quantize_pytorch as vqp  # the reference, a test dependency

from vqdeploy import VectorQuantize  # noqa: E402

from tolerances import assert_no_drift, assert_rounding_close

# these suites compare with 1.14.17, so its defaults apply (the switch users of checkpoints trained with it take)
pytestmark = pytest.mark.usefixtures("defaults_1_14_17")

CONFIGS = {
    "euclidean": (dict(dim=16, codebook_size=32), (2, 24, 16)),
    "cosine": (dict(dim=16, codebook_size=32, use_cosine_sim=True), (2, 24, 16)),
    "codebook_dim": (dict(dim=16, codebook_size=32, codebook_dim=8), (2, 24, 16)),
    "cosine_codebook_dim": (dict(dim=16, codebook_size=32, codebook_dim=8, use_cosine_sim=True), (2, 24, 16)),
    "heads_shared": (dict(dim=16, codebook_size=32, heads=4, codebook_dim=4), (2, 24, 16)),
    "heads_separate": (dict(dim=16, codebook_size=32, heads=2, codebook_dim=8, separate_codebook_per_head=True),
                       (2, 24, 16)),
    "cosine_heads_separate": (dict(dim=16, codebook_size=32, heads=2, separate_codebook_per_head=True,
                                   use_cosine_sim=True), (2, 24, 16)),
    "image": (dict(dim=16, codebook_size=32, accept_image_fmap=True), (2, 16, 4, 5)),
    "image_heads": (dict(dim=16, codebook_size=32, accept_image_fmap=True, heads=2, separate_codebook_per_head=True,
                         codebook_dim=4), (2, 16, 4, 5)),
    "channel_first": (dict(dim=16, codebook_size=32, channel_last=False), (2, 16, 24)),
    "single_vectors": (dict(dim=16, codebook_size=32), (6, 16)),
    "decay_eps": (dict(dim=16, codebook_size=32, decay=0.5, eps=1e-3, commitment_weight=0.3), (2, 24, 16)),
    "cross_entropy_commitment": (dict(dim=16, codebook_size=32, commitment_use_cross_entropy_loss=True),
                                 (2, 24, 16)),
}


def _reference(options, shape, warmup_steps=2):
    torch.manual_seed(0)
    ref = vqp.VectorQuantize(**options)
    ref.train()
    for _ in range(warmup_steps):
        ref(torch.randn(shape))
    return ref


def _roundtrip(ref, tmp_path, options):
    path = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = VectorQuantize(**options)
    ours.load_state_dict(load_file(str(path)), strict=True)
    return ours


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_outputs_match_reference(name, tmp_path):
    options, shape = CONFIGS[name]
    ref = _reference(options, shape)
    ours = _roundtrip(ref, tmp_path, options)
    ref.eval()
    ours.eval()
    x = torch.randn(shape)
    q_ref, idx_ref, _ = ref(x)
    q, idx, loss = ours(x)
    assert idx.shape == idx_ref.shape and torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, n=x.numel(), data=x)
    assert loss.shape == (1,)
    assert_rounding_close(ours.decode(idx), q, n=x.numel(), data=x)
    if options.get("heads", 1) == 1:  # the reference leaves heads unmerged here
        assert_rounding_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx), n=x.numel(),
                              data=x)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_training_step_matches_reference(name, tmp_path):
    options, shape = CONFIGS[name]
    ref = _reference(options, shape)
    ours = _roundtrip(ref, tmp_path, options)
    x = torch.randn(shape)
    x_ref, x_ours, x_frozen = (x.clone().requires_grad_() for _ in range(3))
    frozen_ref = copy.deepcopy(ref)
    q_ref, idx_ref, loss_ref = ref(x_ref)
    q, idx, loss = ours(x_ours)
    assert torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, n=x.numel(), data=x)
    assert_rounding_close(loss, loss_ref, n=x.numel(), data=x)
    (q.pow(2).sum() + loss.sum()).backward()
    if options.get("commitment_use_cross_entropy_loss"):
        # the reference's backward reads its codebook after the EMA step has overwritten it (through .data);
        # vqdeploy differentiates the distances it actually used, which a frozen-codebook reference step gives
        q_ref, _, loss_ref = frozen_ref(x_frozen, freeze_codebook=True)
        x_ref = x_frozen
    (q_ref.pow(2).sum() + loss_ref.sum()).backward()
    assert_rounding_close(x_ours.grad, x_ref.grad, n=x.numel(), data=x)
    for key in ("embed", "embed_avg", "cluster_size"):
        assert_rounding_close(getattr(ours._codebook, key), getattr(ref._codebook, key), n=x.numel(), data=x, msg=key)
        assert_no_drift(getattr(ours._codebook, key), getattr(ref._codebook, key), msg=key)


def test_masked_training_step_matches_reference(tmp_path):
    options, shape = CONFIGS["euclidean"]
    ref = _reference(options, shape)
    ours = _roundtrip(ref, tmp_path, options)
    x = torch.randn(shape)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    mask[1, 10:] = False
    q_ref, idx_ref, loss_ref = ref(x, mask=mask)
    q, idx, loss = ours(x, mask=mask)
    assert torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, n=x.numel(), data=x)
    assert_rounding_close(loss, loss_ref, n=x.numel(), data=x)
    assert_rounding_close(ours._codebook.embed, ref._codebook.embed, n=x.numel(), data=x)


def test_cross_entropy_against_given_indices_matches_reference(tmp_path):
    options, shape = CONFIGS["euclidean"]
    ref = _reference(options, shape)
    ours = _roundtrip(ref, tmp_path, options)
    ref.eval()
    ours.eval()
    x = torch.randn(shape)
    target = torch.randint(0, 32, shape[:2])
    _, ce_ref = ref(x, indices=target)
    _, ce = ours(x, indices=target)
    assert_rounding_close(ce, ce_ref, n=x.numel(), data=x)


@pytest.mark.parametrize("options", [
    dict(dim=16, codebook_size=32, kmeans_init=True),
    dict(dim=16, codebook_size=32, kmeans_init=True, use_cosine_sim=True, threshold_ema_dead_code=2),
    dict(dim=16, codebook_size=32, affine_param=True),
    dict(dim=16, codebook_size=32, ema_update=False, learnable_codebook=True),
    dict(dim=16, codebook_size=32, orthogonal_reg_weight=10.0),
], ids=["kmeans", "cosine_kmeans_expiry", "affine", "learnable", "orthogonal"])
@pytest.mark.parametrize("trained", [False, True])
def test_reference_checkpoints_of_every_state_kind_load(options, trained, tmp_path):
    ref = _reference(options, (2, 24, 16), warmup_steps=2 if trained else 0)
    ours = _roundtrip(ref, tmp_path, options)
    for key, value in ref.state_dict().items():
        # the reference leaves some never-trained buffers as torch.empty: NaN must round-trip too
        torch.testing.assert_close(ours.state_dict()[key], value, atol=0, rtol=0, equal_nan=True, msg=key)
    if options.get("kmeans_init"):
        assert float(ours._codebook.initted) == float(trained)


def test_affine_training_step_matches_reference(tmp_path):
    options = dict(dim=16, codebook_size=32, affine_param=True)
    ref = _reference(options, (2, 24, 16))
    ours = _roundtrip(ref, tmp_path, options)
    x = torch.randn(2, 24, 16)
    q_ref, idx_ref, loss_ref = ref(x)
    q, idx, loss = ours(x)
    assert torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, n=x.numel(), data=x)
    assert_rounding_close(loss, loss_ref, n=x.numel(), data=x)
    for key in ("embed", "batch_mean", "batch_variance", "codebook_mean", "codebook_variance"):
        assert_rounding_close(getattr(ours._codebook, key), getattr(ref._codebook, key), n=x.numel(), data=x, msg=key)
        assert_no_drift(getattr(ours._codebook, key), getattr(ref._codebook, key), msg=key)
