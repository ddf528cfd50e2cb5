"""LatentQuantize: the learned per-channel grid, index arithmetic, learning the values, layouts and errors.

Sequences are (b, dim, n), as 1.32.0 takes every input channel-first (1.14.17's defaults: (b, n, dim))."""

import pytest
import torch

from vqdeploy import LatentQuantize


@pytest.mark.parametrize("levels", [[5, 5, 8], [6, 6, 6], [15, 4]])
def test_indices_round_trip_through_the_grid(levels):
    lq = LatentQuantize(levels, dim=len(levels))
    grid = lq.implicit_codebook
    size = torch.tensor(levels).prod().item()
    assert lq.codebook_size == size and grid.shape == (size, len(levels))
    # levels 6 and 15 are where the reference's truncating index arithmetic misses grid points
    assert torch.equal(lq.codes_to_indices(grid), torch.arange(size, dtype=torch.int32))
    quantized, indices, _ = lq(grid.t().unsqueeze(0))
    assert torch.equal(indices[0], torch.arange(size, dtype=torch.int32)) and torch.equal(quantized[0].t(), grid)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("options, shape, index_shape", [
    (dict(levels=[5, 5, 8], dim=16), (2, 16, 4, 5), (2, 4, 5)),  # image, projections
    (dict(levels=[5, 5, 8], dim=16), (2, 16, 2, 3, 4), (2, 2, 3, 4)),  # video
    (dict(levels=4, dim=6, num_codebooks=2), (2, 6, 7), (2, 7, 2)),  # int levels, codebooks
    (dict(levels=4, codebook_dim=3, dim=6, num_codebooks=2), (2, 6, 7), (2, 7, 2)),  # 1.32.0's int levels
    (dict(levels=[5, 5, 5], dim=8), (2, 8, 7), (2, 7)),  # equal levels with projections (the reference fails)
    (dict(levels=[7, 3], dim=2, keep_num_codebooks_dim=True), (2, 2, 7), (2, 7, 1)),
    (dict(levels=[7, 3], dim=2, defaults="1.14.17"), (2, 7, 2), (2, 7)),  # 1.14.17: sequences channel-last
])
def test_layouts_and_decoding_give_back_forward(options, shape, index_shape, train):
    lq = LatentQuantize(**options).train(train)
    x = torch.randn(shape)
    quantized, indices, loss = lq(x)
    assert quantized.shape == x.shape and indices.shape == index_shape and indices.dtype == torch.int32
    assert loss.shape == () and (loss > 0 if train else loss == 0)
    assert torch.equal(lq.indices_to_codes(indices), quantized)  # exact, in training too
    assert torch.equal(lq.decode(lq.encode(x)), quantized)


def test_values_learn_from_the_quantization_loss_and_the_input_from_the_commitment():
    torch.manual_seed(0)
    lq = LatentQuantize([4], dim=1, commitment_loss_weight=0.0, quantization_loss_weight=1.0)
    centres = torch.tensor([-0.6, -0.2, 0.1, 0.4])  # each nearest its own initial value
    optimizer = torch.optim.SGD(lq.parameters(), lr=0.5)
    for _ in range(60):
        x = (centres[torch.randint(4, (256,))] + 0.01 * torch.randn(256)).reshape(1, 1, -1)
        optimizer.zero_grad()
        lq(x).loss.backward()
        optimizer.step()
    torch.testing.assert_close(lq.values_per_latent[0].detach(), centres, atol=0.02, rtol=0)

    lq = LatentQuantize([5, 5], dim=2, commitment_loss_weight=0.25, quantization_loss_weight=0.0)
    x = torch.randn(1, 2, 10, requires_grad=True)
    quantized, _, loss = lq(x)
    loss.backward()
    torch.testing.assert_close(x.grad, 0.25 * 2 * (x - quantized).detach() / x.numel())
    assert all(values.grad is None for values in lq.values_per_latent)


def test_fixed_values_are_buffers_outside_checkpoints_for_unequal_levels():
    """1.32.0 saves none of the fixed values; 1.14.17 saved those of equal levels, as one tensor."""
    equal = LatentQuantize(6, dim=3, optimize_values=False)
    assert list(equal.parameters()) == [] and list(equal.state_dict()) == []
    equal_1_14 = LatentQuantize(6, dim=3, optimize_values=False, defaults="1.14.17")
    assert list(equal_1_14.parameters()) == [] and list(equal_1_14.state_dict()) == ["values_per_latent"]
    unequal = LatentQuantize([7, 3, 4], dim=3, optimize_values=False).double()
    assert list(unequal.state_dict()) == [] and len(unequal.values_per_latent) == 3
    assert all(v.dtype == torch.float64 for v in unequal.values_per_latent)
    learned = LatentQuantize([7, 3, 4], dim=3)
    assert list(learned.state_dict()) == ["values_per_latent.0", "values_per_latent.1", "values_per_latent.2"]


def test_in_place_optimizer_moves_values_in_training_only():
    lq = LatentQuantize([5, 3], dim=2, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    before = [v.detach().clone() for v in lq.values_per_latent]
    lq.eval()(torch.randn(2, 2, 20))
    assert all(torch.equal(a, b) for a, b in zip(before, lq.values_per_latent))
    lq.train()
    quantized, indices, loss = lq((torch.randn(2, 2, 20) * 0.3).requires_grad_())
    assert not all(torch.equal(a, b) for a, b in zip(before, lq.values_per_latent))
    assert all(v.grad is None for v in lq.values_per_latent)  # the optimizer cleared them
    loss.backward()  # the optimizer owns the values: the returned loss does not move them again
    assert all(v.grad is None for v in lq.values_per_latent)
    assert torch.equal(lq.indices_to_codes(indices), quantized)  # quantized with the updated values


def test_non_finite_tokens_do_not_reach_the_values():
    lq = LatentQuantize([5, 5, 8], dim=3)
    x = torch.randn(2, 10, 3)
    x[0, 3, 1], x[1, 0, 0] = float("nan"), float("inf")
    loss = lq(x.transpose(1, 2)).loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(torch.cat([v.grad for v in lq.values_per_latent])).all()
    finite_tokens = torch.cat([x[0, :3], x[0, 4:], x[1, 1:]]).t().unsqueeze(0)
    torch.testing.assert_close(loss, LatentQuantize([5, 5, 8], dim=3)(finite_tokens).loss)  # their mean


@pytest.mark.parametrize("dim", [3, 8])
def test_half_input_keeps_its_dtype(dim):
    lq = LatentQuantize([5, 5, 8], dim=dim)
    x = torch.randn(2, dim, 10).half()
    quantized, indices, loss = lq(x)
    assert quantized.dtype == torch.float16 and torch.equal(indices, lq(x.float()).indices)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("build, error, match", [
    (lambda: LatentQuantize([5, 1], dim=2), ValueError, "ints >= 2"),
    (lambda: LatentQuantize([5, 2.5], dim=2), ValueError, "ints >= 2"),
    (lambda: LatentQuantize("55", dim=2), ValueError, "levels"),
    (lambda: LatentQuantize(5), ValueError, "needs codebook_dim"),
    (lambda: LatentQuantize([5, 5], dim=2, codebook_dim=3), ValueError, "must equal the number of levels"),
    (lambda: LatentQuantize(5, codebook_dim=0), ValueError, "codebook_dim must be -1"),
    (lambda: LatentQuantize(8, dim=16), ValueError, "int32"),
    (lambda: LatentQuantize([5, 5], dim=4, num_codebooks=2, keep_num_codebooks_dim=False), ValueError,
     "keep_num_codebooks_dim"),
    (lambda: LatentQuantize([5, 5], dim=2, commitment_loss_weight=-1.0), ValueError, "commitment_loss_weight"),
    (lambda: LatentQuantize([5, 5], dim=2, optimize_values=False,
                            in_place_codebook_optimizer=torch.optim.SGD), ValueError, "optimize_values"),
])
def test_bad_options_raise(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_bad_inputs_raise():
    lq = LatentQuantize([5, 5], dim=4, num_codebooks=2)
    with pytest.raises(ValueError, match="expected 4 features"):
        lq(torch.randn(2, 10, 3))
    with pytest.raises(ValueError, match="batch, n"):
        lq(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        lq(torch.ones(2, 10, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 24\]"):
        lq.indices_to_codes(torch.full((2, 3, 2), 25))
    with pytest.raises(ValueError, match="codebook axis of size 2"):
        lq.indices_to_codes(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        lq.indices_to_codes(torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="2 channels"):
        lq.codes_to_indices(torch.zeros(2, 3))


@pytest.mark.parametrize("levels, optimize", [(5, True), ([5, 4, 8], True), (6, False)])
def test_checkpoints_of_either_release_load_into_either(levels, optimize):
    """1.32.0 stores equal levels as values_per_latent.i, 1.14.17 as one tensor (and fixed equal values as a
    buffer, which 1.32.0 does not save): a strict load goes both ways and carries the values over."""
    options = dict(levels=levels, dim=3, optimize_values=optimize)
    for source, target in (("1.14.17", "1.32.0"), ("1.32.0", "1.14.17")):
        trained = LatentQuantize(**options, defaults=source)
        with torch.no_grad():
            for values in ([trained.values_per_latent] if trained.values_as_tensor else trained.values_per_latent):
                values.add_(0.01 * torch.randn(values.shape))
        loaded = LatentQuantize(**options, defaults=target)
        loaded.load_state_dict(trained.state_dict(), strict=True)
        if optimize or source == "1.14.17":  # values that were saved come across
            torch.testing.assert_close(loaded.value_table(), trained.value_table(), atol=0, rtol=0)
