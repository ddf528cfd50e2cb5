"""ResidualVQ and GroupedResidualVQ: shapes, the residual loop, bandwidth, quantize dropout, errors."""

import pytest
import torch
from safetensors.torch import load_model, save_model

from vqdeploy import GroupedResidualVQ, ResidualVQ
from vqdeploy import ResidualFSQ as V_ResidualFSQ
from vqdeploy.residual import dropout_active_count
from vqdeploy.primitives import uniform_from_seed

from helpers import CODEBOOK_SIZE, DIM, twin

Q = 3


def _rvq(**options):
    return ResidualVQ(dim=DIM, num_quantizers=options.pop("num_quantizers", Q), codebook_size=CODEBOOK_SIZE, **options)


# ---------------------------------------------------------------------------------------------- shapes and layouts

@pytest.mark.parametrize("options, shape, index_shape", [
    (dict(), (2, 12, DIM), (2, 12, Q)),
    (dict(), (5, DIM), (5, Q)),
    (dict(channel_last=False), (2, DIM, 12), (2, 12, Q)),
    (dict(accept_image_fmap=True), (2, DIM, 3, 4), (2, 3, 4, Q)),
    (dict(accept_image_fmap=True, codebook_dim=8), (2, DIM, 2, 3, 4), (2, 2, 3, 4, Q)),
    (dict(codebook_dim=8), (2, 12, DIM), (2, 12, Q)),
])
@pytest.mark.parametrize("training", [True, False])
def test_shapes(options, shape, index_shape, training):
    rvq = _rvq(**options).train(training)
    x = torch.randn(shape)
    quantized, indices, losses, all_codes = rvq(x, return_all_codes=True)
    assert quantized.shape == x.shape
    assert indices.shape == index_shape and indices.dtype == torch.long
    assert losses.shape == (Q,)
    layer_dim = options.get("codebook_dim", DIM)
    assert all_codes.shape == (Q, *index_shape[:-1], layer_dim)
    assert rvq.codebooks.shape == (Q, CODEBOOK_SIZE, layer_dim)
    if not training:
        torch.testing.assert_close(rvq.decode(rvq.encode(x)), quantized, atol=1e-5, rtol=0)


def test_each_layer_quantizes_what_the_previous_left():
    rvq = _rvq().eval()
    x = torch.randn(2, 12, DIM)
    quantized, indices, _, all_codes = rvq(x, return_all_codes=True)
    residual = x
    for i, layer in enumerate(rvq.layers):
        layer_quantized, layer_indices, _ = layer(residual)
        assert torch.equal(layer_indices, indices[..., i])
        torch.testing.assert_close(all_codes[i], layer_quantized, atol=1e-6, rtol=0)
        residual = residual - layer_quantized
    torch.testing.assert_close(all_codes.sum(0), quantized, atol=1e-5, rtol=0)
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized, atol=1e-5, rtol=0)
    assert (x - quantized).norm() < x.norm()


def test_straight_through_gradient_counts_every_layer():
    rvq = _rvq(rotation_trick=False)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, _, losses = rvq(x)
    quantized.sum().backward()
    # each layer's output is its input plus a constant, and each input is x minus constants
    torch.testing.assert_close(x.grad, torch.full_like(x, float(Q)))
    assert losses.requires_grad


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_quant_grad_frac_passes_that_fraction_back_through_the_residual(fraction):
    """Layer i's input is x minus the earlier outputs with ``fraction`` of their straight-through gradient, so
    its output's gradient with respect to x is (1 - fraction)^i."""
    rvq = _rvq(rotation_trick=False, quant_grad_frac=fraction)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    rvq(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, sum((1 - fraction) ** i for i in range(Q))))


def test_per_layer_codebook_sizes():
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=DIM, codebook_size=(CODEBOOK_SIZE, 4))
    assert rvq.num_quantizers == 2 and rvq.codebook_sizes == (CODEBOOK_SIZE, 4)
    assert [tuple(c.shape) for c in rvq.codebooks] == [(CODEBOOK_SIZE, DIM), (4, DIM)]
    x = torch.randn(2, 40, DIM)
    quantized, indices, losses = rvq(x)
    assert indices[..., 1].max() < 4 and indices[..., 0].max() >= 4 and losses.shape == (2,)
    rvq.eval()
    torch.testing.assert_close(rvq.get_output_from_indices(rvq(x).indices), rvq(x).quantized)
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        rvq.get_output_from_indices(torch.tensor([[[0, 4]]]))
    grouped = GroupedResidualVQ(dim=DIM, groups=2, codebook_size=(8, 4))
    assert grouped.codebook_sizes == (8, 4) and grouped(x).indices.shape == (2, 2, 40, 2)
    with pytest.raises(ValueError, match="one size per quantizer"):
        ResidualVQ(dim=DIM, codebook_size=(8, 4), num_quantizers=3)
    with pytest.raises(ValueError, match="shared_codebook"):
        ResidualVQ(dim=DIM, codebook_size=(8, 4), shared_codebook=True)
    with pytest.raises(TypeError, match="num_quantizers"):
        ResidualVQ(dim=DIM, codebook_size=8)


def _path_errors(rvq, x, paths):
    """Minus the beam score of each path (b, n, q): the summed commitment errors of its codes."""
    residual, total = x, 0
    for i, layer in enumerate(rvq.layers):
        code = layer.codebook[paths[..., i]]
        total = total + layer.commitment_weight * (code - residual).pow(2).mean(dim=-1)
        residual = residual - code
    return total


def test_diveq_learns_every_codebook_through_the_reparameterised_sum():
    torch.manual_seed(0)
    rvq = _rvq(diveq=True)
    assert rvq.quant_grad_frac == 1.0 and all(layer.learnable_codebook and not layer._codebook.config.ema_update
                                              and not layer.route_gradients_to_input for layer in rvq.layers)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, indices, losses = rvq(x)
    codes = sum(layer.codebook[indices[..., i]] for i, layer in enumerate(rvq.layers))
    torch.testing.assert_close((quantized - x).norm(dim=-1), (codes - x).norm(dim=-1))
    quantized.sum().backward()
    assert all(layer._codebook.embed.grad.abs().sum() > 0 for layer in rvq.layers) and x.grad is not None
    rvq.eval()  # eval gives the codes (1.32.0 would add the noisy reparameterisation there too)
    out, indices, _ = rvq(x)
    torch.testing.assert_close(out, rvq.get_output_from_indices(indices))


def test_implicit_neural_codebook_adapts_each_layers_codes_to_the_token():
    """QINCo: layer i > 0 matches each token against its codes through an MLP of the codes chosen so far."""
    torch.manual_seed(0)
    rvq = _rvq(implicit_neural_codebook=True, mlp_kwargs=dict(depth=1)).eval()
    assert len(rvq.mlps) == Q - 1 and all(layer.learnable_codebook for layer in rvq.layers)
    x = torch.randn(2, 12, DIM)
    quantized, indices, _ = rvq(x)
    first = rvq.layers[0].codebook[indices[..., 0]]
    own = rvq.mlps[0](rvq.layers[1].codebook, condition=first)  # (b, n, codes, d): every token's own codes
    distances = (x - first).unsqueeze(-2).sub(own).norm(dim=-1)
    assert torch.equal(indices[..., 1], distances.argmin(dim=-1))
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized)
    assert torch.equal(rvq.encode(x), indices)
    with pytest.raises(ValueError, match="beam search with implicit_neural_codebook"):
        _rvq(implicit_neural_codebook=True, beam_size=2)


def test_a_wide_beam_finds_the_best_of_all_paths():
    """With 4 codes and 3 layers, a beam of 16 keeps every prefix: the search is exhaustive."""
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=4, codebook_size=4, num_quantizers=3, beam_size=16).eval()
    x = torch.randn(2, 6, 4)
    _, indices, losses = rvq(x)
    every = torch.cartesian_prod(*[torch.arange(4)] * 3)  # (64, 3)
    errors = _path_errors(rvq, x.unsqueeze(2), every.expand(2, 6, 64, 3))
    assert torch.equal(indices, every[errors.argmin(dim=-1)])
    assert torch.equal(rvq.encode(x), indices) and losses.shape == (3,)
    greedy = ResidualVQ(dim=4, codebook_size=4, num_quantizers=3).eval()
    greedy.load_state_dict(rvq.state_dict())
    assert (_path_errors(rvq, x, indices) <= _path_errors(rvq, x, greedy(x).indices) + 1e-6).all()
    assert torch.equal(rvq(x, beam_size=1).indices, greedy(x).indices)  # a beam of one is greedy


def test_beam_search_trains_every_layer_from_the_chosen_path():
    torch.manual_seed(0)
    rvq = _rvq(beam_size=3, threshold_ema_dead_code=0)
    ema = twin(rvq)
    x = torch.randn(2, 24, DIM, requires_grad=True)
    _, indices, losses = rvq(x)
    assert losses.requires_grad
    residual = ema.project_in(x.detach())
    for i, layer in enumerate(ema.layers):  # each layer's EMA step with the chosen path's inputs and codes
        code = layer.codebook[indices[..., i]]
        layer.update_from_token_indices_(residual, indices[..., i])
        residual = residual - code
    for key, value in rvq.state_dict().items():
        if key.endswith(("embed", "cluster_size")):
            torch.testing.assert_close(value, ema.state_dict()[key])


def test_beam_search_with_quantize_dropout_and_masks():
    torch.manual_seed(0)
    rvq = _rvq(beam_size=2, quantize_dropout=True, beam_score_quantizer_weights=[1.0, 0.5, 2.0])
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    quantized, indices, losses = rvq(torch.randn(2, 12, DIM), mask=mask, rand_quantize_dropout_fixed_seed=7)
    kept = int((indices[0, 0] >= 0).sum())
    assert (indices[0, :, kept:] == -1).all() and (losses[kept:] == 0).all()
    assert (indices[1, 8:] == -1).all() and (quantized[1, 8:] == 0).all()
    with pytest.raises(ValueError, match="eval_beam_size needs beam_size"):
        _rvq(eval_beam_size=2)
    with pytest.raises(ValueError, match="one weight per quantizer"):
        _rvq(beam_size=2, beam_score_quantizer_weights=[1.0])
    with pytest.raises(TypeError, match="beam_size"):
        V_ResidualFSQ(dim=DIM, levels=[5, 5], num_quantizers=2)(torch.randn(2, 4, DIM), beam_size=2)


def test_a_shared_codebook_moves_once_per_step_after_every_layer():
    """1.32.0's defaults: the layers match against the step's starting codes and only track counts and sums;
    the codes are recomputed once, after the last layer (1.14.17's: every layer moves them in turn)."""
    rvq = _rvq(shared_codebook=True)
    start = twin(rvq).eval()
    x = torch.randn(2, 12, DIM)
    _, indices, _ = rvq(x)
    assert torch.equal(indices, start.encode(x))
    codebook = rvq.layers[0]._codebook
    assert codebook is rvq.layers[-1]._codebook and codebook.config.manual_ema_update
    torch.testing.assert_close(codebook.embed, codebook.codes_from(codebook.cluster_size, codebook.embed_avg))
    assert not _rvq(shared_codebook=True, defaults="1.14.17").layers[0]._codebook.config.manual_ema_update


@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "input"])
def test_mask_fills_padding_and_keeps_it_out_of_the_codebooks(zeros):
    """Padding comes back as zeros (1.32.0's default) or as the input (1.14.17's)."""
    rvq = _rvq(return_zeros_for_masked_padding=zeros)
    twin_rvq = twin(rvq)
    x = torch.randn(2, 12, DIM)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False
    garbage = x.clone()
    garbage[1, 6:] = 1e3
    quantized, _, _ = rvq(garbage, mask=mask)
    twin_rvq(x, mask=mask)
    torch.testing.assert_close(quantized[1, 6:], torch.zeros_like(x[1, 6:]) if zeros else garbage[1, 6:])
    for a, b in zip(rvq.layers, twin_rvq.layers):
        torch.testing.assert_close(a._codebook.embed, b._codebook.embed)


def test_nan_batch_leaves_every_codebook_untouched():
    rvq = _rvq(threshold_ema_dead_code=2)
    rvq(torch.randn(2, 12, DIM))
    before = twin(rvq)
    bad = torch.randn(2, 12, DIM)
    bad[0, 3, 1] = float("nan")
    rvq(bad)
    for layer, old in zip(rvq.layers, before.layers):
        assert int(layer._codebook.skipped_updates) >= 1
        torch.testing.assert_close(layer._codebook.embed, old._codebook.embed, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- shared codebook

def test_shared_codebook_is_one_module_and_saves_as_safetensors(tmp_path):
    rvq = _rvq(shared_codebook=True)
    assert all(layer._codebook is rvq.layers[0]._codebook for layer in rvq.layers)
    before = rvq.layers[0]._codebook.embed.clone()
    rvq(torch.randn(2, 12, DIM))
    assert not torch.equal(rvq.layers[0]._codebook.embed, before)
    assert all(f"layers.{i}._codebook.embed" in rvq.state_dict() for i in range(Q))
    save_model(rvq, str(tmp_path / "shared.safetensors"))
    loaded = _rvq(shared_codebook=True)
    load_model(loaded, str(tmp_path / "shared.safetensors"))
    torch.testing.assert_close(loaded.codebooks, rvq.codebooks, atol=0, rtol=0)
    assert loaded.layers[2]._codebook is loaded.layers[0]._codebook


def test_shared_codebook_with_in_place_optimizer_steps_the_shared_codes():
    rvq = _rvq(shared_codebook=True, ema_update=False, learnable_codebook=True,
               in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    shared_embed = rvq.layers[0]._codebook.embed
    for layer in rvq.layers:
        assert any(p is shared_embed for group in layer.in_place_codebook_optimizer.param_groups
                   for p in group["params"])
    before = shared_embed.detach().clone()
    rvq(torch.randn(2, 12, DIM))
    assert not torch.equal(shared_embed.detach(), before)


# ---------------------------------------------------------------------------------------------- bandwidth

def _first_k(rvq, k, **options):
    """A ResidualVQ with k quantizers holding the first k layers of ``rvq``."""
    small = _rvq(num_quantizers=k, **options)
    state = {key: value for key, value in rvq.state_dict().items()
             if not key.startswith("layers.") or int(key.split(".")[1]) < k}
    small.load_state_dict(state, strict=True)
    return small


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(codebook_dim=8), dict(accept_image_fmap=True)])
def test_bandwidth_equals_a_model_with_k_quantizers(options, training):
    rvq = _rvq(num_quantizers=4, **options)
    rvq(torch.randn(2, DIM, 3, 4) if options.get("accept_image_fmap") else torch.randn(2, 12, DIM))
    small = _first_k(rvq, 2, **options).train(training)
    rvq.train(training)
    x = torch.randn(2, DIM, 3, 4) if options.get("accept_image_fmap") else torch.randn(2, 12, DIM)
    torch.manual_seed(1)
    quantized, indices, losses = rvq(x, num_quantizers=2)
    torch.manual_seed(1)
    expected = small(x)
    assert indices.shape[-1] == 2 and losses.shape == (2,)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(quantized, expected.quantized, atol=1e-6, rtol=0)
    torch.testing.assert_close(losses, expected.losses, atol=1e-6, rtol=0)
    for i in range(2):  # the same codebook updates
        torch.testing.assert_close(rvq.layers[i]._codebook.embed, small.layers[i]._codebook.embed)
    torch.testing.assert_close(rvq.get_output_from_indices(indices, num_quantizers=2),
                               small.get_output_from_indices(indices), atol=1e-6, rtol=0)
    assert torch.equal(rvq.encode(x, num_quantizers=2), small.encode(x))
    torch.testing.assert_close(rvq.decode(indices, num_quantizers=2), small.decode(indices), atol=1e-6, rtol=0)


def test_bandwidth_keeps_coarse_codes():
    """The first k codes of a full encoding are the k-quantizer encoding."""
    rvq = _rvq(num_quantizers=4).eval()
    x = torch.randn(2, 12, DIM)
    full = rvq.encode(x)
    assert torch.equal(rvq.encode(x, num_quantizers=2), full[..., :2])
    errors = [(x - rvq.decode(full[..., :k], num_quantizers=k)).pow(2).mean() for k in range(1, 5)]
    assert errors == sorted(errors, reverse=True)


# ---------------------------------------------------------------------------------------------- quantize dropout

def test_dropout_count_covers_the_range_uniformly():
    uniform = (torch.arange(1000) + 0.5) / 1000
    counts = dropout_active_count(uniform, cutoff_index=1, num_quantizers=5)
    assert torch.equal(torch.bincount(counts, minlength=6), torch.tensor([0, 0, 250, 250, 250, 250]))
    structured = dropout_active_count(uniform, cutoff_index=0, num_quantizers=8, multiple_of=4)
    assert set(structured.tolist()) == {4, 8}
    assert dropout_active_count(torch.tensor(0.9999999), 0, 3).item() == 3


def test_seeded_uniform_is_fixed_and_spread():
    values = torch.stack([uniform_from_seed(seed) for seed in range(2000)])
    assert torch.equal(values, torch.stack([uniform_from_seed(torch.tensor(seed)) for seed in range(2000)]))
    assert values.min() >= 0 and values.max() < 1
    assert torch.histc(values, bins=10, min=0, max=1).min() > 150


def test_dropout_drops_trailing_layers_without_training_them():
    rvq = _rvq(num_quantizers=4, quantize_dropout=True, rotation_trick=False)
    seen = set()
    for step in range(12):
        before = twin(rvq)
        x = torch.randn(2, 12, DIM, requires_grad=True)
        quantized, indices, losses = rvq(x)
        active = int((indices[0, 0] >= 0).sum())
        seen.add(active)
        assert torch.all((indices[..., :active] >= 0)) and torch.all(indices[..., active:] == -1)
        assert torch.all(losses[active:] == 0) and torch.all(losses[:active] > 0)
        quantized.sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, float(active)))
        for i, (layer, old) in enumerate(zip(rvq.layers, before.layers)):
            changed = not torch.equal(layer._codebook.embed, old._codebook.embed)
            assert changed == (i < active), f"layer {i} with {active} active"
        assert int(rvq.layers[-1]._codebook.skipped_updates) == 0
    assert seen == {1, 2, 3, 4}
    rvq.eval()
    assert torch.all(rvq(torch.randn(2, 12, DIM)).indices >= 0)


def test_dropout_cutoff_and_multiple_of():
    rvq = _rvq(num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1,
               quantize_dropout_multiple_of=2)
    seen = {int((rvq(torch.randn(2, 12, DIM)).indices[0, 0] >= 0).sum()) for _ in range(16)}
    assert seen == {2, 4}


def test_fixed_seed_fixes_the_dropout():
    rvq = _rvq(num_quantizers=4, quantize_dropout=True)
    pattern = {int((rvq(torch.randn(2, 12, DIM), rand_quantize_dropout_fixed_seed=7).indices[0, 0] >= 0).sum())
               for _ in range(5)}
    assert len(pattern) == 1
    seeded = {int((rvq(torch.randn(2, 12, DIM), rand_quantize_dropout_fixed_seed=s).indices[0, 0] >= 0).sum())
              for s in range(20)}
    assert len(seeded) > 1


def test_no_dropout_with_given_indices_or_one_quantizer():
    rvq = _rvq(quantize_dropout=True)
    indices = rvq.eval()(torch.randn(2, 12, DIM)).indices
    rvq.train()
    _, ce_loss = rvq(torch.randn(2, 12, DIM), indices=indices)
    assert ce_loss.ndim == 0 and torch.isfinite(ce_loss)
    assert not _rvq(num_quantizers=1, quantize_dropout=True).quantize_dropout


def test_dropped_indices_decode_as_coarser_models():
    rvq = _rvq(num_quantizers=4, quantize_dropout=True).eval()
    x = torch.randn(2, 12, DIM)
    indices = rvq.encode(x)
    coarse = indices.clone()
    coarse[..., 2:] = -1
    torch.testing.assert_close(rvq.get_output_from_indices(coarse), rvq.decode(indices[..., :2], num_quantizers=2))
    # with quantize dropout, fewer columns mean the finer quantizers were dropped (as in the reference)
    torch.testing.assert_close(rvq.get_output_from_indices(indices[..., :2]), rvq.get_output_from_indices(coarse))
    assert torch.all(rvq.get_codes_from_indices(coarse)[2:] == 0)


# ---------------------------------------------------------------------------------------------- cross-entropy

def test_cross_entropy_with_indices_sums_the_layers():
    rvq = _rvq().eval()
    x = torch.randn(2, 12, DIM)
    indices = rvq.encode(x)
    quantized, ce_loss = rvq(x, indices=indices)
    torch.testing.assert_close(quantized, rvq(x).quantized)
    residual, expected = x, 0.0
    for i, layer in enumerate(rvq.layers):
        layer_quantized, layer_ce = layer(residual, indices=indices[..., i])
        expected = expected + layer_ce
        residual = residual - layer_quantized
    torch.testing.assert_close(ce_loss, expected)


# ---------------------------------------------------------------------------------------------- grouped

def _grouped(**options):
    return GroupedResidualVQ(dim=DIM, groups=options.pop("groups", 2), num_quantizers=Q, codebook_size=CODEBOOK_SIZE,
                             **options)


@pytest.mark.parametrize("options, shape", [
    (dict(), (2, 12, DIM)),
    (dict(accept_image_fmap=True), (2, DIM, 3, 4)),
    (dict(channel_last=False), (2, DIM, 12)),
    (dict(codebook_dim=4), (2, 12, DIM)),
])
def test_grouped_splits_features_over_residual_quantizers(options, shape):
    grouped = _grouped(**options).eval()
    x = torch.randn(shape)
    quantized, indices, losses, all_codes = grouped(x, return_all_codes=True)
    tokens = shape[2:] if options.get("accept_image_fmap") or options.get("channel_last") is False else shape[1:2]
    assert quantized.shape == x.shape
    assert indices.shape == (2, shape[0], *tokens, Q) and losses.shape == (2, Q)
    assert isinstance(all_codes, tuple) and all_codes[0].shape == (Q, shape[0], *tokens, options.get("codebook_dim", 8))
    split = 1 if len(shape) != 3 or options.get("channel_last") is False else -1
    for rvq, chunk, group_quantized, group_indices in zip(grouped.rvqs, x.chunk(2, dim=split),
                                                          quantized.chunk(2, dim=split), indices):
        expected = rvq(chunk)
        assert torch.equal(expected.indices, group_indices)
        torch.testing.assert_close(expected.quantized, group_quantized, atol=1e-6, rtol=0)
    assert torch.equal(grouped.encode(x), indices)
    torch.testing.assert_close(grouped.decode(indices), quantized, atol=1e-5, rtol=0)
    output = grouped.get_output_from_indices(indices)
    torch.testing.assert_close(output, quantized.movedim(1, -1) if split == 1 else quantized, atol=1e-5, rtol=0)
    assert grouped.get_codes_from_indices(indices).shape == (2, Q, shape[0], *tokens, options.get("codebook_dim", 8))
    assert grouped.codebooks.shape == (2, Q, CODEBOOK_SIZE, options.get("codebook_dim", 8))


def test_grouped_dropout_is_shared_by_the_groups():
    grouped = _grouped(quantize_dropout=True)
    for _ in range(6):
        indices = grouped(torch.randn(2, 12, DIM)).indices
        assert torch.equal(indices[0] == -1, indices[1] == -1)


def test_grouped_cross_entropy_and_bandwidth():
    grouped = _grouped().eval()
    x = torch.randn(2, 12, DIM)
    indices = grouped.encode(x)
    _, ce_loss = grouped(x, indices=indices)
    expected = sum(rvq(chunk, indices=group)[1] for rvq, chunk, group in zip(grouped.rvqs, x.chunk(2, -1), indices))
    torch.testing.assert_close(ce_loss, expected)
    _, ce_tuple = grouped(x, indices=tuple(indices))
    torch.testing.assert_close(ce_tuple, ce_loss)
    assert torch.equal(grouped(x, num_quantizers=2).indices, indices[..., :2])


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("build, match", [
    (lambda: _rvq(heads=2), "heads"),
    (lambda: _rvq(num_quantizers=0), "num_quantizers"),
    (lambda: _rvq(quantize_dropout=True, quantize_dropout_cutoff_index=Q), "cutoff"),
    (lambda: _rvq(quantize_dropout_cutoff_index=-1), "cutoff"),
    (lambda: _rvq(quantize_dropout_multiple_of=0), "multiple_of"),
    (lambda: _grouped(groups=3), "divide"),
    (lambda: _grouped(groups=0), "groups"),
])
def test_bad_construction_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_calls_raise_clear_errors():
    rvq = _rvq(num_quantizers=4).eval()
    x = torch.randn(2, 12, DIM)
    indices = rvq.encode(x)
    with pytest.raises(ValueError, match=r"num_quantizers must be an int in \[1, 4\]"):
        rvq(x, num_quantizers=5)
    with pytest.raises(ValueError, match="num_quantizers"):
        rvq.get_output_from_indices(indices, num_quantizers=0)
    with pytest.raises(ValueError, match="one column per quantizer"):
        rvq.get_output_from_indices(indices[..., :3])  # no quantize dropout: 3 of 4 is an error
    with pytest.raises(ValueError, match="one column per quantizer"):
        rvq.get_codes_from_indices(indices, num_quantizers=2)
    with pytest.raises(ValueError, match="4 quantizers"):
        rvq(x, indices=indices[..., :3])
    with pytest.raises(ValueError, match="-1"):
        rvq(x, indices=torch.where(indices > 5, indices, -1))
    with pytest.raises(ValueError, match=r"lie in \[-1, 31\]"):
        rvq.get_output_from_indices(indices + CODEBOOK_SIZE)
    with pytest.raises(TypeError, match="integer"):
        rvq.get_output_from_indices(indices.float())
    with pytest.raises(TypeError, match="seed"):
        rvq(x, rand_quantize_dropout_fixed_seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        rvq(x, rand_quantize_dropout_fixed_seed=2**40)
    with pytest.raises(ValueError, match=f"expected {DIM} features"):
        rvq(torch.randn(2, 12, DIM + 1))
    grouped = _grouped().eval()
    with pytest.raises(ValueError, match="one entry per group"):
        grouped(x, indices=grouped.encode(x)[:1])
    with pytest.raises(TypeError, match="sequence"):
        grouped.get_output_from_indices("codes")
