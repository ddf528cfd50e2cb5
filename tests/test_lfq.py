"""LFQ and its residual forms: the factorised entropy against a float64 brute force, codes, losses, errors."""

import pytest
import torch

from vqdeploy import LFQ, GroupedResidualLFQ, ResidualLFQ
from vqdeploy.primitives import bit_table, factorized_code_entropies


def _brute_force(x, inv_temperature, weights, clamp):
    """The reference's definition: softmax over the full (N, c, 2^d) table, in float64."""
    d = x.shape[-1]
    codes = bit_table(d).double() * 2 - 1
    prob = (2 * inv_temperature * torch.einsum("ncd,kd->nck", x.double(), codes)).softmax(dim=-1)
    share = (weights / weights.sum()).double()
    per_sample = ((-torch.special.xlogy(prob, prob)).sum(-1) * share[:, None]).sum(0).mean()
    average = (prob * share[:, None, None]).sum(0)
    batch = (-average * average.clamp(min=clamp).log()).sum(-1).mean()
    return per_sample, batch


@pytest.mark.parametrize("d, c, inv_temperature", [(1, 1, 3.0), (6, 1, 1.0), (7, 2, 30.0), (10, 1, 100.0)])
def test_factorised_entropies_are_exact(d, c, inv_temperature):
    x = torch.randn(64, c, d, dtype=torch.float64)
    weights = (torch.rand(64) > 0.3).double()
    per_sample, batch = factorized_code_entropies(4 * inv_temperature * x, weights)
    expected_per_sample, expected_batch = _brute_force(x, inv_temperature, weights, clamp=1e-5)
    torch.testing.assert_close(per_sample, expected_per_sample, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(batch, expected_batch, atol=1e-12, rtol=1e-12)


def test_signs_are_codes_and_indices_their_binary_numbers():
    lfq = LFQ(dim=6).eval()
    x = torch.randn(2, 40, 6)
    quantized, indices, loss = lfq(x)
    assert torch.equal(quantized, torch.where(x > 0, 1.0, -1.0)) and loss == 0
    powers = 2 ** torch.arange(5, -1, -1)
    assert torch.equal(indices, ((x > 0).long() * powers).sum(-1))
    assert torch.equal(lfq.indices_to_codes(indices), quantized)
    assert torch.equal(lfq.decode(lfq.encode(x)), quantized)


def test_training_loss_and_breakdown():
    lfq = LFQ(dim=16, codebook_size=2**8, entropy_loss_weight=0.1, commitment_loss_weight=0.25)
    x = torch.randn(2, 40, 16, requires_grad=True)
    (quantized, indices, loss), breakdown = lfq(x, return_loss_breakdown=True)
    expected = (breakdown.per_sample_entropy - breakdown.batch_entropy) * 0.1 + breakdown.commitment * 0.25
    torch.testing.assert_close(loss, expected)
    assert 0 <= breakdown.per_sample_entropy < breakdown.batch_entropy <= 8 * torch.log(torch.tensor(2.0))
    (quantized.sum() + loss).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_mask_and_random_fraction_change_only_which_tokens_count():
    lfq = LFQ(dim=8)
    x = torch.randn(2, 20, 8)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 5:] = False
    _, breakdown = lfq(x, mask=mask, return_loss_breakdown=True)
    _, kept_only = lfq(torch.cat([x[0:1], x[1:2, :5]], dim=1), return_loss_breakdown=True)
    for a, b in zip(breakdown, kept_only):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    partial = LFQ(dim=8, frac_per_sample_entropy=0.5)
    weights = partial._random_fraction(40, mask.reshape(-1).float(), x.device)
    assert weights.sum() == 12 and torch.all(weights[mask.reshape(-1) == 0] == 0)
    partial(x, mask=mask)


@pytest.mark.parametrize("options, shape, index_shape", [
    (dict(dim=8), (2, 5, 8), (2, 5)),
    (dict(dim=12, codebook_size=2**5), (2, 5, 12), (2, 5)),
    (dict(codebook_size=2**4, num_codebooks=3), (2, 5, 12), (2, 5, 3)),
    (dict(dim=8), (2, 8, 3, 4), (2, 3, 4)),
    (dict(dim=4, codebook_size=2**4), (2, 4, 2, 3, 4), (2, 2, 3, 4)),
])
def test_layouts(options, shape, index_shape):
    lfq = LFQ(**options).eval()
    x = torch.randn(shape)
    quantized, indices, _ = lfq(x)
    assert quantized.shape == x.shape and indices.shape == index_shape
    torch.testing.assert_close(lfq.indices_to_codes(indices), quantized, atol=1e-6, rtol=0)


def test_residual_lfq_halves_the_scale_and_drops_trailing_layers():
    rlfq = ResidualLFQ(dim=8, num_quantizers=3, codebook_size=2**8, quantize_dropout=True)
    assert [layer.codebook_scale for layer in rlfq.layers] == [1.0, 0.5, 0.25]
    depths = set()
    for _ in range(12):
        quantized, indices, losses = rlfq(torch.randn(2, 10, 8))
        depth = int((indices[0, 0] >= 0).sum())
        depths.add(depth)
        assert losses.shape == (3,) and torch.all(losses[depth:] == 0) and torch.all(indices[..., depth:] == -1)
    assert depths == {1, 2, 3}
    rlfq.eval()
    x = torch.randn(2, 10, 8)
    quantized, indices, _ = rlfq(x)
    torch.testing.assert_close(rlfq.get_output_from_indices(indices), quantized)
    assert torch.equal(rlfq(x, num_quantizers=2).indices, indices[..., :2])
    torch.testing.assert_close(rlfq.decode(indices), quantized)


def test_grouped_residual_lfq():
    grouped = GroupedResidualLFQ(dim=16, groups=2, num_quantizers=2, codebook_size=2**8).eval()
    x = torch.randn(2, 10, 16)
    quantized, indices, losses = grouped(x)
    assert indices.shape == (2, 2, 10, 2) and losses.shape == (2, 2)
    torch.testing.assert_close(grouped.get_output_from_indices(indices), quantized)


@pytest.mark.parametrize("build, error, match", [
    (lambda: LFQ(), ValueError, "dim or codebook_size"),
    (lambda: LFQ(codebook_size=100), ValueError, "power of two"),
    (lambda: LFQ(dim=8, frac_per_sample_entropy=0.0), ValueError, "frac_per_sample_entropy"),
    (lambda: LFQ(dim=8, soft_clamp_input_value=0.5), ValueError, "soft_clamp_input_value"),
    (lambda: LFQ(dim=8, num_codebooks=2, keep_num_codebooks_dim=False), ValueError, "keep_num_codebooks_dim"),
    (lambda: ResidualLFQ(dim=8, num_quantizers=2, codebook_size=48), ValueError, "power of two"),
    (lambda: GroupedResidualLFQ(dim=9, groups=2, num_quantizers=2, codebook_size=16), ValueError, "divide"),
    (lambda: LFQ(dim=8, codebook_size=16, has_projections=False), ValueError, "has_projections=False"),
    (lambda: LFQ(dim=8, channel_first="yes"), TypeError, "channel_first"),
    (lambda: LFQ(dim=8, codebook_scale=2.0, soft_clamp_input_value=0.9), ValueError, "soft_clamp_input_value"),
    (lambda: LFQ(dim=8, cosine_sim_project_in=True, cosine_sim_project_in_scale=0.0), ValueError, "project_in_scale"),
    (lambda: ResidualLFQ(dim=8, num_quantizers=2, codebook_size=16, has_projections=True), ValueError, "projects once"),
])
def test_bad_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_calls():
    lfq = LFQ(codebook_size=2**4, num_codebooks=2)
    with pytest.raises(ValueError, match="expected 8 features"):
        lfq(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        lfq.indices_to_codes(torch.full((2, 5, 2), 16))
    with pytest.raises(ValueError, match="codebook axis of size 2"):
        lfq.indices_to_codes(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="inv_temperature"):
        lfq(torch.randn(2, 5, 8), inv_temperature=0.0)


def test_spherical_codes_lie_on_the_sphere_and_decode_as_forward():
    """BSQ: each codebook's d channels of a code have norm ``codebook_scale``; eval output = decoded indices."""
    lfq = LFQ(dim=12, codebook_size=2**6, num_codebooks=2, spherical=True, codebook_scale=0.5,
              orthogonal_rotation=True).eval()
    quantized, indices, _ = lfq(torch.randn(2, 7, 12))
    norms = quantized.reshape(2, 7, 2, 6).norm(dim=-1)  # the rotation keeps norms
    torch.testing.assert_close(norms, torch.full_like(norms, 0.5))
    torch.testing.assert_close(lfq.indices_to_codes(indices), quantized)


def test_channel_first_false_takes_channel_last_feature_maps():
    """``channel_first=False`` (1.32.0: no transpose) reads (b, h, w, dim), which 1.32.0 itself cannot quantize;
    ``channel_first=True`` reads (b, dim, n)."""
    torch.manual_seed(0)
    auto = LFQ(dim=8, codebook_size=2**4).eval()
    last = LFQ(dim=8, codebook_size=2**4, channel_first=False).eval()
    first = LFQ(dim=8, codebook_size=2**4, channel_first=True).eval()
    for other in (last, first):
        other.load_state_dict(auto.state_dict())
    x = torch.randn(2, 8, 3, 5)
    quantized, indices, _ = auto(x)
    quantized_last, indices_last, _ = last(x.movedim(1, -1))
    assert torch.equal(indices_last, indices)
    torch.testing.assert_close(quantized_last, quantized.movedim(1, -1))
    torch.testing.assert_close(last.indices_to_codes(indices), quantized.movedim(1, -1))
    sequence = torch.randn(2, 8, 6)
    assert torch.equal(first(sequence).indices, auto(sequence.transpose(1, 2)).indices)
    assert first.indices_to_codes(first(sequence).indices).shape == (2, 8, 6)


def test_softplus_entropy_loss_is_positive_and_shifted():
    torch.manual_seed(0)
    plain = LFQ(dim=8, codebook_size=2**4)
    shifted = LFQ(dim=8, codebook_size=2**4, experimental_softplus_entropy_loss=True, entropy_loss_offset=1.5)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(2, 10, 8)
    entropy = plain(x).entropy_aux_loss / plain.entropy_loss_weight
    assert entropy < 0  # confident tokens, varied codes
    expected = torch.nn.functional.softplus(entropy + 1.5) * shifted.entropy_loss_weight
    torch.testing.assert_close(shifted(x).entropy_aux_loss, expected)


def test_quantization_stays_float32_under_autocast():
    """``force_quantization_f32``: under bfloat16 autocast the signs come from float32 projections (the
    indices of a float32 run), and the loss is float32."""
    torch.manual_seed(0)
    lfq = LFQ(dim=16, codebook_size=2**8)
    x = torch.randn(4, 32, 16)
    indices = lfq(x).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lfq(x)
    assert torch.equal(out.indices, indices) and out.entropy_aux_loss.dtype == torch.float32


def test_residual_lfq_soft_clamp_per_layer_follows_the_defaults():
    halved = ResidualLFQ(dim=8, num_quantizers=3, codebook_size=16, soft_clamp_input_value=10)
    same = ResidualLFQ(dim=8, num_quantizers=3, codebook_size=16, soft_clamp_input_value=10, defaults="1.14.17")
    assert [layer.soft_clamp_input_value for layer in halved.layers] == [10, 5, 2.5]
    assert [layer.soft_clamp_input_value for layer in same.layers] == [10, 10, 10]
