"""Parity of the scalar quantizers with vector-quantize-pytorch 1.14.17 (FSQ, LFQ, LatentQuantize, residual forms).

Reference modules are saved as safetensors and loaded strictly; FSQ's codes and indices must be bit-identical,
and so must indices_to_codes and the implicit codebook.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import vector_quantize_pytorch as vqp  # the reference, a test dependency

from vqdeploy import FSQ, LFQ, GroupedResidualFSQ, GroupedResidualLFQ, LatentQuantize, ResidualFSQ, ResidualLFQ

from tolerances import LFQ_ENTROPY_RTOL, assert_rounding_close

# these suites compare with 1.14.17, so its defaults apply (the switch users of checkpoints trained with it take)
pytestmark = pytest.mark.usefixtures("defaults_1_14_17")

# one step of rounding (tolerances.py) with reductions bounded by the largest batch here (2 x 30 x 16 elements)
BOUND = dict(steps=1, n=2 * 30 * 16)

FSQ_CONFIGS = {
    "levels_8555": (dict(levels=[8, 5, 5, 5]), (2, 30, 4)),
    "projection": (dict(levels=[8, 6, 5], dim=16), (2, 30, 16)),
    "projection_no_bias": (dict(levels=[8, 6, 5], dim=16, projection_has_bias=False), (2, 30, 16)),
    "codebooks": (dict(levels=[3, 4], num_codebooks=3), (2, 30, 6)),
    "image": (dict(levels=[7, 5, 5, 5]), (2, 4, 5, 6)),
    "channel_first": (dict(levels=[7, 5, 5, 5], channel_first=True), (2, 4, 30)),
    "video_projection": (dict(levels=[8, 5, 5, 5], dim=8), (2, 8, 3, 4, 5)),
}


@pytest.mark.parametrize("name", list(FSQ_CONFIGS))
def test_fsq_matches_reference_bit_for_bit(name, tmp_path):
    options, shape = FSQ_CONFIGS[name]
    torch.manual_seed(0)
    ref = vqp.FSQ(**options)
    path = str(tmp_path / "fsq.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = FSQ(**options)
    ours.load_state_dict(load_file(path), strict=True)
    x = torch.randn(shape) * 3
    (q_ref, idx_ref), (q, idx) = ref(x), ours(x)
    assert idx.dtype == idx_ref.dtype and idx.shape == idx_ref.shape and torch.equal(idx, idx_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(ours.indices_to_codes(idx), ref.indices_to_codes(idx_ref))
    assert torch.equal(ours.implicit_codebook, ref.implicit_codebook)
    assert ours.codebook_size == ref.codebook_size
    if "dim" not in options and len(shape) == 3:  # the reference runs half precision only without projections
        (q_ref, idx_ref), (q, idx) = ref(x.half()), ours(x.half())
        assert torch.equal(idx, idx_ref) and torch.equal(q, q_ref) and q.dtype == torch.float16


RESIDUAL_FSQ_CONFIGS = {
    "no_projection": (vqp.ResidualFSQ, ResidualFSQ, dict(dim=4, levels=[8, 5, 5, 5], num_quantizers=3), (2, 30, 4)),
    "projection": (vqp.ResidualFSQ, ResidualFSQ, dict(dim=16, levels=[8, 5, 5, 3], num_quantizers=4), (2, 30, 16)),
    "grouped": (vqp.GroupedResidualFSQ, GroupedResidualFSQ,
                dict(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=3), (2, 30, 16)),
}


@pytest.mark.parametrize("name", list(RESIDUAL_FSQ_CONFIGS))
def test_residual_fsq_matches_reference(name, tmp_path):
    ref_cls, our_cls, options, shape = RESIDUAL_FSQ_CONFIGS[name]
    torch.manual_seed(0)
    ref = ref_cls(**options).eval()
    path = str(tmp_path / "rfsq.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = our_cls(**options).eval()
    ours.load_state_dict(load_file(path), strict=True)
    x = torch.randn(shape)
    q_ref, idx_ref, codes_ref = ref(x, return_all_codes=True)
    q, idx, codes = ours(x, return_all_codes=True)
    assert idx.dtype == idx_ref.dtype and torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, **BOUND)
    for a, b in zip(codes if isinstance(codes, tuple) else [codes], codes_ref if isinstance(codes_ref, tuple)
                    else [codes_ref]):
        assert_rounding_close(a, b, **BOUND)
    assert_rounding_close(ours.get_output_from_indices(idx), ref.get_output_from_indices(idx_ref), **BOUND)
    # a training step (no dropout): same outputs and input gradient
    ref.train()
    ours.train()
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    q_ref, idx_ref = ref(x_ref)[:2]
    q, idx = ours(x_ours)[:2]
    assert torch.equal(idx, idx_ref)
    q_ref.pow(2).sum().backward()
    q.pow(2).sum().backward()
    assert_rounding_close(x_ours.grad, x_ref.grad, **BOUND)


def test_residual_fsq_dropped_indices_decode_like_reference():
    options = dict(dim=4, levels=[8, 5, 5, 5], num_quantizers=3, quantize_dropout=True)
    torch.manual_seed(0)
    ref, ours = vqp.ResidualFSQ(**options).eval(), ResidualFSQ(**options).eval()
    idx = ours.encode(torch.randn(2, 30, 4))
    coarse = torch.cat([idx[..., :1], torch.full_like(idx[..., 1:], -1)], dim=-1)
    assert_rounding_close(ours.get_output_from_indices(coarse), ref.get_output_from_indices(coarse), **BOUND)
    assert_rounding_close(ours.get_output_from_indices(idx[..., :2]), ref.get_output_from_indices(idx[..., :2]),
                          **BOUND)


LFQ_CONFIGS = {
    "plain": (vqp.LFQ, LFQ, dict(dim=8, codebook_size=2**8), (2, 30, 8)),
    "projection_masked": (vqp.LFQ, LFQ, dict(dim=16, codebook_size=2**6), (2, 30, 16)),
    "codebooks": (vqp.LFQ, LFQ, dict(codebook_size=2**5, num_codebooks=2), (2, 30, 10)),
    "image": (vqp.LFQ, LFQ, dict(dim=6), (2, 6, 4, 5)),
    "clamp_scale_agnostic_masked": (vqp.LFQ, LFQ, dict(dim=8, codebook_size=2**8, use_code_agnostic_commit_loss=True,
                                                     soft_clamp_input_value=2.0, codebook_scale=0.5), (2, 30, 8)),
    "residual_masked": (vqp.ResidualLFQ, ResidualLFQ, dict(dim=16, num_quantizers=3, codebook_size=2**6), (2, 30, 16)),
    # 1.14.17 clamps every layer's input at the same value (the defaults switch; 1.32.0 halves it per layer)
    "residual_clamped": (vqp.ResidualLFQ, ResidualLFQ, dict(dim=16, num_quantizers=3, codebook_size=2**6,
                                                            soft_clamp_input_value=1.5), (2, 30, 16)),
    "grouped_masked": (vqp.GroupedResidualLFQ, GroupedResidualLFQ,
                       dict(dim=16, groups=2, num_quantizers=2, codebook_size=2**6), (2, 30, 16)),
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(LFQ_CONFIGS))
def test_lfq_family_matches_reference(name, mode, tmp_path):
    """Indices identical; quantized within 1e-6; aux losses within 1e-4 relative (the per-sample entropy is
    exact here, the reference clamps probabilities inside it); residual outputs within 1e-5."""
    ref_cls, our_cls, options, shape = LFQ_CONFIGS[name]
    torch.manual_seed(0)
    ref = ref_cls(**options).train(mode == "train")
    path = str(tmp_path / "lfq.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = our_cls(**options).train(mode == "train")
    ours.load_state_dict(load_file(path), strict=True)
    x = torch.randn(shape)
    kwargs = {}
    if name.endswith("masked"):
        mask = torch.ones(shape[:2], dtype=torch.bool)
        mask[1, 10:] = False
        kwargs["mask"] = mask
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out = ref(x_ref, **kwargs), ours(x_ours, **kwargs)
    assert out.indices.dtype == out_ref[1].dtype and torch.equal(out.indices, out_ref[1])
    assert_rounding_close(out.quantized, out_ref[0], **BOUND)
    torch.testing.assert_close(out[2], out_ref[2], atol=1e-7, rtol=LFQ_ENTROPY_RTOL)
    if mode == "train":
        (out_ref[0].pow(2).sum() + out_ref[2].sum()).backward()
        (out.quantized.pow(2).sum() + out[2].sum()).backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=LFQ_ENTROPY_RTOL)
    if our_cls is LFQ:
        assert torch.equal(ours.indices_to_codes(out.indices), ref.indices_to_codes(out_ref[1]))
    else:
        assert_rounding_close(ours.get_output_from_indices(out.indices), ref.get_output_from_indices(out_ref[1]),
                              **BOUND)


LATENT_CONFIGS = {
    "unequal_image_projection": (dict(levels=[5, 5, 8], dim=16), (2, 16, 4, 5)),
    "equal": (dict(levels=5, dim=4), (2, 30, 4)),
    "codebooks": (dict(levels=4, dim=3, num_codebooks=2), (2, 30, 3)),
    "fixed_unequal_video": (dict(levels=[7, 3, 4], dim=3, optimize_values=False), (2, 3, 2, 3, 4)),
    "fixed_equal": (dict(levels=8, dim=3, optimize_values=False, keep_num_codebooks_dim=True), (2, 30, 3)),
}


def _reference_twin(ours: LatentQuantize, options: dict, path: str):
    """A reference LatentQuantize holding ours' state, through a safetensors file."""
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, path)
    ref = vqp.LatentQuantize(**options)
    ref.load_state_dict(load_file(path), strict=True)
    return ref


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(LATENT_CONFIGS))
def test_latent_quantize_matches_reference(name, mode, tmp_path):
    """Reference checkpoints load; indices identical; outputs, loss and decoded codes within 1e-5; the input
    gradient through the straight-through output equal (the aux loss routes its gradients as the paper does,
    see the README)."""
    options, shape = LATENT_CONFIGS[name]
    torch.manual_seed(0)
    ref = vqp.LatentQuantize(**options).train(mode == "train")
    path = str(tmp_path / "lq.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = LatentQuantize(**options).train(mode == "train")
    ours.load_state_dict(load_file(path), strict=True)
    x = torch.randn(shape)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    (q_ref, idx_ref, loss_ref), (q, idx, loss) = ref(x_ref), ours(x_ours)
    assert idx.dtype == idx_ref.dtype and idx.shape == idx_ref.shape and torch.equal(idx, idx_ref)
    assert_rounding_close(q, q_ref, **BOUND)
    assert_rounding_close(loss, loss_ref, **BOUND)
    assert_rounding_close(ours.indices_to_codes(idx), ref.indices_to_codes(idx_ref), **BOUND)
    if mode == "train":
        q_ref.pow(2).sum().backward()
        q.pow(2).sum().backward()
        assert_rounding_close(x_ours.grad, x_ref.grad, **BOUND)


def test_latent_quantize_learned_values_load_into_the_reference(tmp_path):
    """After the values train, the reference given the same state quantizes to the same outputs."""
    options = dict(levels=[5, 5, 8], dim=16)
    torch.manual_seed(0)
    ours = LatentQuantize(**options)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        ours(torch.randn(2, 16, 4, 5)).loss.backward()
        optimizer.step()
    assert not torch.equal(ours.values_per_latent[2].detach(), torch.arange(8) / 8 - 0.5)
    ref = _reference_twin(ours, options, str(tmp_path / "lq.safetensors"))
    x = torch.randn(2, 16, 4, 5)
    (q_ref, _, loss_ref), (q, idx, loss) = ref(x), ours(x)
    assert_rounding_close(q, q_ref, **BOUND)
    assert_rounding_close(loss, loss_ref, **BOUND)
    assert torch.equal(ours.indices_to_codes(idx), q)  # the reference decodes to its initial grid instead


@pytest.mark.parametrize("levels", [[15], [6, 6, 6]])
def test_latent_quantize_indices_where_the_reference_truncates(levels, tmp_path):
    """The reference turns quantized values back into indices by float arithmetic and truncation, which misses
    grid points (level 15; levels 6 after its straight-through rounding): its indices then decode to other codes.
    Ours are the chosen level indices: same outputs, and indices that decode to them."""
    options = dict(levels=levels, dim=len(levels))
    ours = LatentQuantize(**options)
    ref = _reference_twin(ours, options, str(tmp_path / "lq.safetensors"))
    torch.manual_seed(0)
    x = torch.randn(1, 200, len(levels)) * 0.4
    (q_ref, idx_ref, _), (q, idx, _) = ref(x), ours(x)
    assert_rounding_close(q, q_ref, **BOUND)
    assert not torch.allclose(ref.indices_to_codes(idx_ref), q_ref, atol=1e-3)
    assert torch.equal(ours.indices_to_codes(idx), q)
    assert torch.equal(ours.codes_to_indices(ours.implicit_codebook), torch.arange(ours.codebook_size, dtype=torch.int32))
