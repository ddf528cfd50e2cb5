"""FSP: bins of the CDF activations, the perturbation in training, the moment loss, layouts, decoding, errors."""

import math

import pytest
import torch

import vqdeploy.fsp as fsp_module
from vqdeploy import FSP


@pytest.mark.parametrize("act_name", sorted(fsp_module.CDF_ACTIVATIONS))
def test_bins_decode_to_their_centres_through_each_cdf(act_name):
    """Eval: each value is its bin's centre, mapped back by the inverse CDF (or linearly), and decoding the
    indices gives the same output."""
    fsp = FSP(levels=[8, 5, 3], act_name=act_name, need_inv_act=True).eval()
    x = torch.randn(2, 50, 3)
    quantized, indices, loss, info = fsp(x)
    act, inverse = fsp_module.CDF_ACTIVATIONS[act_name]
    levels = torch.tensor([8, 5, 3])
    bins = (act(x).clamp_max(1 - torch.finfo(x.dtype).eps) * levels).floor()
    assert torch.equal(info["level_indices"], bins) and indices.dtype == torch.int32
    torch.testing.assert_close(quantized, inverse((bins + 0.5) / levels))
    # (forward's straight-through z + (code - z) rounds within an ulp of the code, as 1.32.0's does)
    torch.testing.assert_close(fsp.indices_to_codes(indices), quantized)
    assert torch.equal(fsp.encode(x), indices)
    torch.testing.assert_close(torch.stack([act(c) for c in quantized.unbind()]), (bins + 0.5) / levels)


def test_linear_decoding_has_unit_variance_and_the_grid_round_trips():
    fsp = FSP(levels=[6, 4]).eval()
    grid = fsp.lookup(torch.arange(fsp.codebook_size))
    assert grid.shape == (24, 2)
    torch.testing.assert_close(grid[:, 0].unique(), (torch.arange(6) + 0.5) / 6 * (1 / fsp_module.UNIT_VARIANCE)
                               - 0.5 / fsp_module.UNIT_VARIANCE)
    inverse = FSP(levels=[6, 4], need_inv_act=True).eval()
    codes = inverse.lookup(torch.arange(24))
    assert torch.equal(inverse.encode(codes.unsqueeze(0))[0], torch.arange(24, dtype=torch.int32))


def test_perturbation_replaces_bin_centres_with_noisy_activations(monkeypatch):
    """Training: where the second uniform exceeds quantize_rate the output is the activation moved by up to half
    a bin (first uniform), kept when that would leave (0, 1); elsewhere the bin centre."""
    draws = {}

    def recorded(shapes, device=None):
        out = {name: torch.rand(shape) for name, shape in shapes.items()}
        draws.update(out)
        return out

    monkeypatch.setattr(fsp_module, "draw_uniform", recorded)
    fsp = FSP(levels=[5, 5], quantize_rate=0.5, vector_norm="none")
    x = torch.randn(4, 64, 2) * 3
    quantized, indices, loss, info = fsp(x)
    uniform, levels = draws["fsp"], torch.tensor([5, 5])
    act = (x.reshape(-1, 2).tanh() + 1) / 2
    proposal = act + (uniform[0] * 2 - 1) / (levels * 2)
    accepted = (proposal > 0) & (proposal < 1)
    centre = ((act.clamp_max(1 - 1.1920929e-07) * levels).floor() + 0.5) / levels
    expected = torch.where(uniform[1] > 0.5, torch.where(accepted, proposal, act), centre)
    torch.testing.assert_close(quantized.reshape(-1, 2), (expected - 0.5) / fsp_module.UNIT_VARIANCE)
    torch.testing.assert_close(info["p_accept_prob"], accepted.float().mean())
    assert loss == 0 and 0 < info["p_accept_prob"] < 1  # inputs of 3 sigma: some proposals leave (0, 1)
    fsp.eval()
    assert "p_accept_prob" not in fsp(x).info and torch.equal(fsp(x).indices, indices)


def test_moment_loss_pulls_the_batch_towards_the_cdf():
    fsp = FSP(levels=[5], dim=1, vector_norm="kurt")
    x = torch.randn(1, 4096, 1) * 2 + 1
    _, _, loss, info = fsp(x)
    moments = info["norm_info"]
    expected = 0.1 * moments["mean"] ** 2 + 0.07 * (moments["variance"] - 1) ** 2 \
        + 0.06 * moments["skewness"] ** 2 + 0.05 * moments["kurtosis"] ** 2
    torch.testing.assert_close(loss, expected.mean())
    assert abs(moments["mean"].item() - 1) < 0.1 and abs(moments["variance"].item() - 4) < 0.4


@pytest.mark.parametrize("channel_first, shape, index_shape", [
    (False, (2, 7, 16), (2, 7)), (False, (5, 16), (5,)), (False, (2, 3, 4, 16), (2, 3, 4)),
    (True, (2, 16, 7), (2, 7)), (True, (2, 16, 3, 4), (2, 3, 4)),
])
def test_layouts(channel_first, shape, index_shape):
    fsp = FSP(levels=[8, 5, 5, 5], dim=16, channel_first=channel_first).eval()
    x = torch.randn(shape)
    quantized, indices, _, info = fsp(x)
    assert quantized.shape == x.shape and indices.shape == index_shape
    assert info["level_indices"].shape == (*index_shape, 4)
    torch.testing.assert_close(fsp.indices_to_codes(indices), quantized)


@pytest.mark.parametrize("build, error, match", [
    (lambda: FSP(levels=[5, 1]), ValueError, "levels"),
    (lambda: FSP(levels=[5, 5], act_name="relu"), ValueError, "act_name"),
    (lambda: FSP(levels=[5, 5], vector_norm="l2"), ValueError, "vector_norm"),
    (lambda: FSP(levels=[5, 5], quantize_rate=1.5), ValueError, "quantize_rate"),
])
def test_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_calls():
    fsp = FSP(levels=[5, 5], dim=4)
    with pytest.raises(ValueError, match="expected 4 features"):
        fsp(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        fsp(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 24\]"):
        fsp.indices_to_codes(torch.full((2, 3), 25))
    with pytest.raises(TypeError, match="integer"):
        fsp.decode(torch.zeros(2, 3))
    assert math.prod(fsp.levels) == fsp.codebook_size
