"""VectorQuantize behaviour: shapes, the straight-through estimator, training state, masks, errors."""

import subprocess
import sys

import pytest
import torch

from vqdeploy import QuantizeOutput, VectorQuantize

from helpers import CODEBOOK_SIZE, DIM, twin
from tolerances import assert_state_close

LAYOUTS = {
    "sequence": (dict(), (2, 12, DIM), (2, 12)),
    "single_vectors": (dict(), (5, DIM), (5,)),
    "channel_first": (dict(channel_last=False), (2, DIM, 12), (2, 12)),
    "image": (dict(accept_image_fmap=True), (2, DIM, 3, 4), (2, 3, 4)),
    "video": (dict(accept_image_fmap=True), (2, DIM, 2, 3, 4), (2, 2, 3, 4)),
    "heads_shared": (dict(heads=4, codebook_dim=8), (2, 12, DIM), (2, 12, 4)),
    "heads_separate": (dict(heads=2, separate_codebook_per_head=True), (2, 12, DIM), (2, 12, 2)),
    "image_heads": (dict(accept_image_fmap=True, heads=2, separate_codebook_per_head=True, codebook_dim=4),
                    (2, DIM, 3, 4), (2, 3, 4, 2)),
    "codebook_dim": (dict(codebook_dim=4), (2, 12, DIM), (2, 12)),
}


def make(**options):
    return VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, **options)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_shapes_and_eval_forward_equals_decode_of_encode(name):
    options, shape, index_shape = LAYOUTS[name]
    vq = make(**options)
    x = torch.randn(shape)
    quantized, indices, loss = vq(x)
    assert quantized.shape == shape and indices.shape == index_shape and loss.shape == ()
    assert indices.dtype == torch.long
    vq.eval()
    out = vq(x)
    assert isinstance(out, QuantizeOutput)
    assert torch.equal(vq.encode(x), out.indices)
    torch.testing.assert_close(vq.decode(out.indices), out.quantized, atol=0, rtol=0)
    assert torch.equal(out.loss, torch.zeros(()))


def test_straight_through_passes_gradients_unchanged():
    vq = make(commitment_weight=0.0, rotation_trick=False)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, _, _ = vq(x)
    quantized.backward(torch.ones_like(quantized))
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_gradients_can_stay_out_of_the_input():
    """route_gradients_to_input=False: the output is the codes, and only the commitment loss reaches the input."""
    vq = make(route_gradients_to_input=False, commitment_weight=0.0)
    before = twin(vq).eval()
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, indices, loss = vq(x)
    assert torch.equal(quantized, before.decode(indices)) and not quantized.requires_grad
    (quantized.sum() + loss.sum()).backward()
    assert x.grad is None


@pytest.mark.parametrize("options", [dict(), dict(heads=2, codebook_dim=DIM // 2, separate_codebook_per_head=True),
                                     dict(use_cosine_sim=True)],
                         ids=["euclidean", "heads", "cosine"])
def test_rotation_trick_outputs_codes_and_rotates_gradients(options):
    """On by default (1.32.0): the output is the nearest code, and the gradient reaching each token is the
    output's gradient turned by the rotation that carries the token onto its code, times |code| / |token|."""
    vq = make(commitment_weight=0.0, **options)
    assert vq.rotation_trick
    before = twin(vq).eval()  # the codes the step chose from (the step then updates the codebook)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, indices, _ = vq(x)
    torch.testing.assert_close(quantized, before.decode(indices), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(quantized)
    quantized.backward(g)

    rows = x.detach().double().reshape(2, 12, -1, DIM // vq.heads)  # per head: the vectors that were rotated
    if options.get("use_cosine_sim"):
        rows = torch.nn.functional.normalize(rows, dim=-1)
    codes, g = before.decode(indices).double().reshape(rows.shape), g.double().reshape(rows.shape)
    u = rows / rows.norm(dim=-1, keepdim=True)
    q = codes / codes.norm(dim=-1, keepdim=True)
    w = torch.nn.functional.normalize(u + q, dim=-1)
    dot = lambda a, b: (a * b).sum(dim=-1, keepdim=True)  # noqa: E731
    expected = (g - 2 * dot(w, g) * w + 2 * dot(q, g) * u) * codes.norm(dim=-1, keepdim=True) / rows.norm(
        dim=-1, keepdim=True)
    if options.get("use_cosine_sim"):  # and back through the normalisation of x
        norm = x.detach().double().reshape(rows.shape).norm(dim=-1, keepdim=True)
        expected = (expected - dot(expected, rows) * rows) / norm
    torch.testing.assert_close(x.grad.double(), expected.reshape(x.shape), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_topk_gives_the_k_nearest_codes_best_first(training):
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, commitment_weight=0.5).train(training)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(2, 10, DIM)
    quantized, indices, loss = vq(x, topk=3)
    assert quantized.shape == (2, 10, 3, DIM) and indices.shape == loss.shape == (2, 10, 3)
    distances = torch.cdist(x.double(), vq.codebook.double())
    assert torch.equal(indices, distances.topk(3, dim=-1, largest=False).indices)
    codes = vq.codebook[indices]
    torch.testing.assert_close(quantized, codes)
    torch.testing.assert_close(loss, 0.5 * (codes - x.unsqueeze(2)).pow(2).mean(dim=-1))
    for key, value in vq.state_dict().items():  # no EMA step: beam search updates with the codes it keeps
        if not key.endswith("skipped_updates"):
            assert torch.equal(value, before[key]), key
    image = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, accept_image_fmap=True).eval()
    quantized, indices, loss = image(torch.randn(2, DIM, 3, 4), topk=2)
    assert quantized.shape == (2, DIM, 3, 4, 2) and indices.shape == loss.shape == (2, 3, 4, 2)
    with pytest.raises(ValueError, match="positive int"):
        vq(x, topk=0)
    with pytest.raises(ValueError, match="single-head"):
        VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, heads=2)(x, topk=2)


def test_directional_reparam_learns_the_codebook_through_the_output():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, directional_reparam=True, threshold_ema_dead_code=0.5)
    assert not vq._codebook.config.ema_update and vq.learnable_codebook and not vq.rotation_trick
    x = torch.randn(2, 12, DIM, requires_grad=True)
    quantized, indices, loss = vq(x)
    codes = vq.codebook[indices]
    error = (codes - x).norm(dim=-1)
    # the noise turns the error's direction, not its length: |output - x| is the distance to the code
    torch.testing.assert_close((quantized - x).norm(dim=-1), error)
    assert not torch.allclose(quantized, codes, atol=1e-4) and float(loss.detach()) == 0.0  # no commitment loss
    quantized.sum().backward()
    assert vq._codebook.embed.grad.abs().sum() > 0  # the codes learn through the error's length
    noiseless = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, directional_reparam=True,
                               directional_reparam_variance=0.0, threshold_ema_dead_code=0.5)
    noiseless.load_state_dict(vq.state_dict())
    out, indices, _ = noiseless(x)
    torch.testing.assert_close(out, noiseless.codebook[indices])
    with pytest.raises(ValueError, match="threshold_ema_dead_code"):
        VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, directional_reparam=True)
    with pytest.raises(ValueError, match="excludes"):
        VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, directional_reparam=True, threshold_ema_dead_code=1,
                       rotation_trick=True)


@pytest.mark.parametrize("release, replaced", [("1.32.0", True), ("1.14.17", False)])
def test_dead_codes_of_a_learnable_codebook_follow_the_release(release, replaced):
    """Without EMA, 1.32.0 still counts codes and replaces dead ones; 1.14.17 does neither."""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, ema_update=False, learnable_codebook=True,
                        threshold_ema_dead_code=2.0, defaults=release)
    before = vq.codebook.detach().clone()
    x = torch.randn(2, 12, DIM) + 10.0  # far from every code: most codes go unused
    vq(x)
    moved = ~torch.isclose(vq.codebook.detach(), before).all(dim=-1)
    assert bool(moved.any()) == replaced


@pytest.mark.parametrize("release, shape", [("1.32.0", (2, 16, 3, 4)), ("1.14.17", (2, 3, 4, 16))])
def test_codes_of_feature_maps_follow_the_release(release, shape):
    vq = VectorQuantize(dim=16, codebook_size=CODEBOOK_SIZE, codebook_dim=8, accept_image_fmap=True,
                        defaults=release).eval()
    x = torch.randn(2, 16, 3, 4)
    _, indices, _ = vq(x)
    assert vq.get_output_from_indices(indices).shape == shape
    codes_shape = (2, 8, 3, 4) if release == "1.32.0" else (2, 3, 4, 8)
    assert vq.get_codes_from_indices(indices).shape == codes_shape
    torch.testing.assert_close(vq.decode(indices), vq(x).quantized)  # decode: the forward's layout


def test_a_call_without_ema_keeps_the_codes_and_expire_codes_replaces_dead_ones():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, threshold_ema_dead_code=0.5)
    codes, counts = vq.codebook.clone(), vq._codebook.cluster_size.clone()
    x = torch.randn(2, 24, DIM)
    vq(x, ema_update=False)
    assert torch.equal(vq.codebook, codes) and not torch.equal(vq._codebook.cluster_size, counts)  # counts tracked
    plain = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    plain(x, ema_update=False)  # no EMA, no dead codes: nothing to track
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items() if "skipped" not in k)
    with torch.no_grad():
        vq._codebook.cluster_size[0, :4] = 0.0  # four dead codes
    vq.expire_codes_(x)
    rows = x.reshape(-1, DIM)
    for code in vq.codebook[:4]:  # each became one of x's rows
        assert torch.isclose(rows, code).all(dim=-1).any()
    assert torch.equal(vq.codebook[4:], codes[4:])
    with pytest.raises(ValueError, match="ema_update=True needs"):
        VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, ema_update=False, learnable_codebook=True)(
            x, ema_update=True)


def test_manual_in_place_optimizer_update_steps_when_asked():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, ema_update=False, learnable_codebook=True,
                        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
                        manual_in_place_optimizer_update=True)
    codes = vq.codebook.detach().clone()
    vq(torch.randn(2, 12, DIM))
    vq(torch.randn(2, 12, DIM))
    assert torch.equal(vq.codebook.detach(), codes) and vq._codebook.embed.grad is not None  # accumulated
    vq.update_in_place_optimizer()
    assert not torch.equal(vq.codebook.detach(), codes) and vq._codebook.embed.grad is None


def test_update_indices_is_the_ema_step_of_given_codes():
    """An EMA step from given codes equals a training forward's step that picked them."""
    torch.manual_seed(0)
    stepped = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, threshold_ema_dead_code=0)
    given = twin(stepped)
    x = torch.randn(2, 24, DIM)
    _, indices, _ = stepped(x)
    given.update_ema_indices(x, indices)
    assert_state_close(given, stepped, n=x.numel(), data=x)


def test_commitment_loss_is_weighted_mse_to_the_codes():
    vq = make(commitment_weight=0.25, ema_update=False)
    x = torch.randn(2, 12, DIM)
    quantized, _, loss = vq(x)
    torch.testing.assert_close(loss, 0.25 * (quantized - x).pow(2).mean())


def test_ema_moves_codes_towards_assigned_data():
    vq = make(decay=0.0)
    x = torch.randn(2, 12, DIM)
    _, indices, _ = vq(x)
    code = int(indices[0, 0])
    members = x[indices == code]
    torch.testing.assert_close(vq.codebook[code], members.mean(dim=0), atol=1e-3, rtol=1e-3)


def test_kmeans_init_runs_once_on_the_first_batch():
    vq = make(kmeans_init=True, kmeans_iters=5)
    assert float(vq._codebook.initted) == 0 and torch.count_nonzero(vq.codebook) == 0
    vq(torch.randn(2, 40, DIM))
    assert float(vq._codebook.initted) == 1 and torch.count_nonzero(vq.codebook) > 0
    after_first = vq.codebook.clone()
    vq_frozen = twin(vq)
    vq_frozen(torch.randn(2, 40, DIM) * 100, freeze_codebook=True)
    torch.testing.assert_close(vq_frozen.codebook, after_first)  # no second k-means


def test_kmeans_init_and_dead_codes_ignore_masked_padding():
    vq = make(kmeans_init=True, threshold_ema_dead_code=2)
    x = torch.randn(2, 20, DIM)
    x[:, 10:] = 1e4
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, :10] = True
    for _ in range(3):
        vq(x, mask=mask)
    assert vq.codebook.abs().max() < 100


def test_dead_codes_are_replaced_by_batch_rows():
    vq = make(threshold_ema_dead_code=2)
    with torch.no_grad():
        vq.codebook = torch.full((CODEBOOK_SIZE, DIM), 50.0)
        vq._codebook.embed_avg.copy_(vq._codebook.embed)
    x = torch.randn(2, 40, DIM)
    _, indices, _ = vq(x)
    used = int(indices[0, 0])  # every row went to the first of the identical codes: it survives
    assert torch.equal(indices, torch.full_like(indices, used))
    rows = x.reshape(-1, DIM)
    replaced = [k for k in range(CODEBOOK_SIZE) if k != used]
    for k in replaced:
        assert (vq.codebook[k] == rows).all(dim=-1).any(), f"code {k} is not a batch row"
    assert len({tuple(vq.codebook[k].tolist()) for k in replaced}) == len(replaced)  # distinct rows
    assert torch.equal(vq._codebook.cluster_size[0, replaced], torch.full((len(replaced),), 2.0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batches_never_reach_the_codebook(bad):
    vq = make(kmeans_init=True, threshold_ema_dead_code=2, affine_param=True)
    x = torch.randn(2, 12, DIM)
    x[1, 3, 2] = bad
    vq(x)
    assert float(vq._codebook.initted) == 0
    assert int(vq._codebook.skipped_updates) == 1
    vq(torch.randn(2, 12, DIM))
    state = twin(vq).state_dict()
    vq(x)
    assert int(vq._codebook.skipped_updates) == 2
    for key, value in vq.state_dict().items():
        if key != "_codebook.skipped_updates":
            assert torch.equal(value, state[key]), key
    assert all(torch.isfinite(v.float()).all() for v in vq.state_dict().values())


def test_non_finite_values_in_masked_padding_are_harmless():
    vq = make()
    x = torch.randn(2, 12, DIM)
    x[0, 8:] = float("nan")
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    quantized, _, loss = vq(x, mask=mask)
    assert int(vq._codebook.skipped_updates) == 0 and torch.isfinite(vq.codebook).all() and torch.isfinite(loss).all()


def test_all_padding_batch_changes_nothing():
    """No kept row: nothing to learn from, so k-means waits and no code is replaced by padding."""
    vq = make(kmeans_init=True, threshold_ema_dead_code=2)
    x = torch.randn(2, 12, DIM)
    nothing = torch.zeros(2, 12, dtype=torch.bool)
    state = twin(vq).state_dict()
    vq(x, mask=nothing)
    for key, value in vq.state_dict().items():
        assert torch.equal(value, state[key]), key
    vq(x, mask=~nothing)
    assert float(vq._codebook.initted) == 1
    embed = vq.codebook.clone()
    vq(torch.zeros(2, 12, DIM), mask=nothing)
    assert torch.equal(vq.codebook, embed)


@pytest.mark.parametrize("options", [dict(ema_update=False, learnable_codebook=True),
                                     dict(commitment_use_cross_entropy_loss=True)], ids=["learnable", "ce"])
def test_nan_padding_leaves_gradients_finite(options):
    vq = make(codebook_dim=8, **options)
    x = torch.randn(2, 12, DIM)
    x[0, 8:] = float("nan")
    x.requires_grad_()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, 8:] = False
    quantized, _, loss = vq(x, mask=mask)
    (quantized[mask].sum() + loss.sum()).backward()
    grads = [p.grad for p in vq.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(x.grad[mask]).all()


def test_training_loss_requires_grad_even_without_terms():
    _, _, loss = make(commitment_weight=0.0)(torch.randn(2, 12, DIM))
    assert loss.requires_grad
    loss.backward()


def test_any_integer_index_dtype_works():
    vq = make().eval()
    x = torch.randn(2, 12, DIM)
    codes = vq.encode(x)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        torch.testing.assert_close(vq.decode(codes.to(dtype)), vq.decode(codes), atol=0, rtol=0)
        torch.testing.assert_close(vq(x, indices=codes.to(dtype)).ce_loss, vq(x, indices=codes).ce_loss)


@pytest.mark.parametrize("zeros", [True, False], ids=["zeros", "input"])
def test_mask_fills_padded_positions_and_excludes_them_from_statistics(zeros):
    """Padding comes back as zeros (1.32.0's default) or as the input (1.14.17's)."""
    vq = make(decay=0.5, return_zeros_for_masked_padding=zeros)
    reference = twin(vq)
    x = torch.randn(2, 12, DIM)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    quantized, _, _ = vq(x, mask=mask)
    assert torch.equal(quantized[1, 7:], torch.zeros_like(x[1, 7:]) if zeros else x[1, 7:])
    reference(torch.cat([x[0], x[1, :7]]).unsqueeze(0))
    torch.testing.assert_close(vq.codebook, reference.codebook, atol=1e-5, rtol=1e-5)


def test_lens_equal_the_mask_of_leading_tokens():
    vq = make()
    other = twin(vq)
    x, lens = torch.randn(2, 12, DIM), torch.tensor([12, 5])
    by_lens, by_mask = vq(x, lens=lens), other(x, mask=torch.arange(12) < lens[:, None])
    for a, b in zip(by_lens, by_mask):
        assert torch.equal(a, b)


def test_3d_feature_maps_quantize_every_voxel():
    vq = make(accept_3d_fmap=True)
    x = torch.randn(2, DIM, 2, 3, 4)
    quantized, indices, _ = vq.eval()(x)
    assert quantized.shape == x.shape and indices.shape == (2, 2, 3, 4)
    tokens = make().eval()
    tokens.load_state_dict(vq.state_dict())
    assert torch.equal(indices.reshape(2, 24), tokens(x.flatten(2).transpose(1, 2)).indices)
    with pytest.raises(ValueError, match="accept_3d_fmap=True expects"):
        vq(torch.randn(2, DIM, 3, 4))


def test_loss_breakdown_holds_the_unweighted_terms_of_the_loss():
    vq = make(commitment_weight=0.25, codebook_diversity_loss_weight=0.5, orthogonal_reg_weight=2.0, codebook_dim=8)
    out = vq(torch.randn(2, 12, DIM), return_loss_breakdown=True)
    terms = out.breakdown
    assert all(t.ndim == 0 for t in terms) and float(terms.codebook_diversity.detach()) < 0 < float(terms.commitment.detach())
    expected = 0.25 * terms.commitment + 0.5 * terms.codebook_diversity + 2.0 * terms.orthogonal_reg
    torch.testing.assert_close(out.loss, expected)
    _, _, loss, terms = vq.eval()(torch.randn(2, 12, DIM), return_loss_breakdown=True)
    assert float(loss.abs().sum()) == 0 and all(float(t) == 0 for t in terms)


def test_layernorm_after_project_in_keeps_the_reference_keys():
    vq = make(codebook_dim=8, layernorm_after_project_in=True)
    assert {"project_in.0.weight", "project_in.1.weight", "project_in.1.bias"} <= set(vq.state_dict())
    tokens = vq.project_in(torch.randn(5, DIM))
    torch.testing.assert_close(tokens.mean(dim=-1), torch.zeros(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("defaults", ["1.32.0", "1.14.17"])
def test_masked_tokens_get_index_minus_one_from_1_32(defaults):
    vq = make(heads=2, codebook_dim=4, defaults=defaults)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    _, indices, _ = vq(torch.randn(2, 12, DIM), mask=mask)
    assert indices.shape == (2, 12, 2) and torch.all(indices[mask] >= 0)
    assert torch.all(indices[~mask] == -1) if defaults == "1.32.0" else torch.all(indices[~mask] >= 0)


# ---------------------------------------------------------------------------------------------- EMA control


@pytest.mark.parametrize("options", [dict(), dict(use_cosine_sim=True, heads=2, codebook_dim=8,
                                                  separate_codebook_per_head=True)], ids=["euclidean", "cosine_heads"])
def test_accumulated_micro_batches_equal_one_batch(options):
    """Gradient accumulation: k - 1 calls with accum_ema_update=True and one plain call make the EMA step that
    one call on all k micro-batches makes (the codes do not move until then)."""
    accumulated = make(**options)
    whole = twin(accumulated)
    x = torch.randn(6, 12, DIM)
    before = accumulated.codebook.clone()
    for part in x[:4].chunk(2):
        accumulated(part, accum_ema_update=True)
    assert torch.equal(accumulated.codebook, before)
    accumulated(x[4:])
    whole(x)
    assert_state_close(accumulated, whole, n=x.numel(), data=x)
    assert float(accumulated._codebook.accumulated_counts.abs().sum()) == 0  # consumed by the step


def test_manual_ema_update_moves_the_codes_only_when_asked():
    manual = make(manual_ema_update=True)
    automatic = twin(make())
    automatic.load_state_dict(manual.state_dict())
    x = torch.randn(2, 12, DIM)
    before = manual.codebook.clone()
    manual(x)
    automatic(x)
    assert torch.equal(manual.codebook, before) and not torch.equal(manual._codebook.cluster_size,
                                                                      automatic._codebook.cluster_size * 0)
    manual.update_ema()
    assert_state_close(manual, automatic, n=x.numel(), data=x)


def test_ema_update_weight_scales_each_codes_step():
    vq = make()
    plain, weighted, by_callable = twin(vq), twin(vq), twin(vq)
    x = torch.randn(2, 12, DIM)
    weight = torch.ones(CODEBOOK_SIZE)
    weight[::2] = 0.0  # even codes keep their EMA state
    plain(x)
    weighted(x, ema_update_weight=weight)
    seen = []
    by_callable(x, ema_update_weight=lambda sums, counts: seen.append((sums.shape, counts.shape)) or weight)
    assert seen == [((1, CODEBOOK_SIZE, DIM), (1, CODEBOOK_SIZE))]
    for name in ("cluster_size", "embed_avg"):  # (the codes divide by smoothed counts, which share their total)
        ours, theirs, old = (getattr(m._codebook, name) for m in (weighted, plain, vq))
        assert torch.equal(ours[:, ::2], old[:, ::2]) and torch.equal(ours[:, 1::2], theirs[:, 1::2]), name
    assert all(torch.equal(a, b) for a, b in zip(by_callable.state_dict().values(), weighted.state_dict().values()))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ema_update_weight=torch.ones(3)), ValueError, r"shape \(32,\) or \(1, 32\)"),
    (dict(ema_update_weight=-1.0), ValueError, "ema_update_weight"),
    (dict(ema_update_weight="half"), TypeError, "number, a tensor or a callable"),
])
def test_bad_ema_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        make()(torch.randn(2, 12, DIM), **kwargs)
    with pytest.raises(ValueError, match="need an EMA codebook"):
        make(ema_update=False, learnable_codebook=True)(torch.randn(2, 12, DIM), accum_ema_update=True)


def test_freeze_codebook_leaves_state_untouched():
    for vq, kwargs in [(make(freeze_codebook=True), {}), (make(), dict(freeze_codebook=True))]:
        before = vq.codebook.clone()
        vq(torch.randn(2, 12, DIM), **kwargs)
        assert torch.equal(vq.codebook, before)


def test_learnable_codebook_gets_gradients_from_the_commitment_loss():
    vq = make(ema_update=False, learnable_codebook=True)
    _, _, loss = vq(torch.randn(2, 12, DIM))
    loss.backward()
    assert vq._codebook.embed.grad is not None and vq._codebook.embed.grad.abs().sum() > 0


def test_in_place_codebook_optimizer_steps_the_codebook_eagerly():
    vq = make(ema_update=False, learnable_codebook=True,
              in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    before = vq.codebook.detach().clone()
    vq(torch.randn(2, 12, DIM))
    assert not torch.equal(vq.codebook, before)
    assert vq._codebook.embed.grad is None or torch.count_nonzero(vq._codebook.embed.grad) == 0


def test_orthogonal_regularisation_adds_the_reference_loss():
    vq = make(orthogonal_reg_weight=10.0, commitment_weight=0.0)
    _, _, loss = vq(torch.randn(2, 12, DIM))
    codes = torch.nn.functional.normalize(vq._codebook.embed.detach(), dim=-1)
    k = codes.shape[1]
    expected = 10.0 * ((codes @ codes.transpose(1, 2)).pow(2).sum() / k ** 2 - 1 / k)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert vq._codebook.embed.grad.abs().sum() > 0


def test_stochastic_sampling_and_straight_through_relaxations_train():
    for options in [dict(stochastic_sample_codes=True, sample_codebook_temp=1.0),
                    dict(straight_through=True, reinmax=True)]:
        vq = make(codebook_dim=8, **options)
        x = torch.randn(2, 12, DIM, requires_grad=True)
        quantized, indices, loss = vq(x)
        (quantized.sum() + loss.sum()).backward()
        assert torch.isfinite(x.grad).all() and indices.max() < CODEBOOK_SIZE


def test_cross_entropy_against_given_indices():
    vq = make(codebook_dim=8).eval()
    x = torch.randn(2, 12, DIM)
    own = vq.encode(x)
    quantized, ce = vq(x, indices=own)
    random_ce = vq(x, indices=torch.randint(0, CODEBOOK_SIZE, own.shape)).ce_loss
    assert quantized.shape == x.shape and ce < random_ce


def test_affine_parameters_track_batch_statistics():
    vq = make(affine_param=True, affine_param_batch_decay=0.0)
    x = torch.randn(2, 50, DIM) * 3 + 2
    vq(x)
    torch.testing.assert_close(vq._codebook.batch_mean[0, 0], x.reshape(-1, DIM).mean(0), atol=1e-5, rtol=1e-5)
    vq.eval()
    before = vq._codebook.batch_mean.clone()
    vq(torch.randn(2, 50, DIM))
    assert torch.equal(vq._codebook.batch_mean, before)  # eval is pure


def test_low_precision_input_keeps_its_dtype():
    vq = make(codebook_dim=8).to(torch.bfloat16)
    x = torch.randn(2, 12, DIM, dtype=torch.bfloat16)
    quantized, _, loss = vq(x)
    assert quantized.dtype == torch.bfloat16


def test_codebook_property_setter_and_index_lookups():
    vq = make(heads=2, separate_codebook_per_head=True, codebook_dim=4)
    assert vq.codebook.shape == (2, CODEBOOK_SIZE, 4)
    new = torch.randn(2, CODEBOOK_SIZE, 4)
    vq.codebook = new
    assert torch.equal(vq.codebook, new)
    indices = torch.tensor([[[1, 2], [3, 4]]])
    codes = vq.get_codes_from_indices(indices)
    torch.testing.assert_close(codes[0, 1], torch.cat([new[0, 3], new[1, 4]]))
    assert vq.get_output_from_indices(indices).shape == (1, 2, DIM)
    with pytest.raises(ValueError, match="shape"):
        vq.codebook = torch.randn(CODEBOOK_SIZE, 4)


def test_channel_first_index_lookups_project_before_transposing():
    vq = make(channel_last=False, codebook_dim=4)
    indices = torch.randint(0, CODEBOOK_SIZE, (2, 7))
    assert vq.get_codes_from_indices(indices).shape == (2, 4, 7)
    assert vq.get_output_from_indices(indices).shape == (2, DIM, 7)


@pytest.mark.parametrize("call, error, match", [
    (lambda vq: vq(torch.randn(2, 12, DIM + 1)), ValueError, f"expected {DIM} features"),
    (lambda vq: vq(torch.randn(2, 3, 12, DIM)), ValueError, "expected input of shape"),
    (lambda vq: vq(torch.randn(DIM)), ValueError, "expected input of shape"),
    (lambda vq: vq(torch.randint(0, 5, (2, 12, DIM))), TypeError, "floating-point"),
    (lambda vq: vq(torch.randn(2, 12, DIM), mask=torch.ones(2, 11, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 12\)"),
    (lambda vq: vq(torch.randn(2, 12, DIM), mask=torch.ones(2, 12)), TypeError, "bool"),
    (lambda vq: vq(torch.randn(2, DIM), mask=torch.ones(2, 1, dtype=torch.bool)), ValueError, "mask"),
    (lambda vq: vq.get_output_from_indices(torch.tensor([[0, CODEBOOK_SIZE]])), ValueError, r"\[0, 31\]"),
    (lambda vq: vq.get_output_from_indices(torch.tensor([[-2, 1]])), ValueError, r"\[0, 31\]"),
    (lambda vq: vq.get_output_from_indices(torch.tensor([[0.5]])), TypeError, "integer"),
    (lambda vq: vq(torch.randn(2, 12, DIM), indices=torch.zeros(2, 11, dtype=torch.long)), ValueError, "indices must have shape"),
    (lambda vq: vq("not a tensor"), TypeError, "torch.Tensor"),
    (lambda vq: vq(torch.randn(0, 12, DIM)), ValueError, "at least one"),
    (lambda vq: vq(torch.randn(2, 0, DIM)), ValueError, "at least one"),
    (lambda vq: vq(torch.randn(2, 12, DIM), sample_codebook_temp=torch.tensor(0.5)), TypeError, "Python number"),
    (lambda vq: vq(torch.randn(2, 12, DIM), lens=torch.tensor([3.0, 4.0])), TypeError, "integer tensor"),
    (lambda vq: vq(torch.randn(2, 12, DIM), lens=torch.tensor([3])), ValueError, r"lens must have shape \(2,\)"),
    (lambda vq: vq(torch.randn(2, 12, DIM), lens=torch.tensor([3, 4]), mask=torch.ones(2, 12, dtype=torch.bool)),
     ValueError, "either mask or lens"),
])
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call(make())


@pytest.mark.parametrize("options, match", [
    (dict(ema_update=True, learnable_codebook=True), "ema_update=False"),
    (dict(sync_update_v=0.5), "learnable_codebook"),
    (dict(sync_update_v=2.0, learnable_codebook=True, ema_update=False), "sync_update_v"),
    (dict(reinmax=True), "straight_through"),
    (dict(affine_param=True, use_cosine_sim=True), "Euclidean"),
    (dict(heads=0), "heads"),
    (dict(codebook_dim=0), "codebook_dim"),
    (dict(eps=0.0), "eps"),
    (dict(decay=1.5), "decay"),
    (dict(affine_param=True, affine_param_batch_decay=-0.1), "affine_param_batch_decay"),
    (dict(commitment_weight=float("nan")), "commitment_weight"),
    (dict(sample_codebook_temp=-1.0), "sample_codebook_temp"),
    (dict(accept_image_fmap=True, accept_3d_fmap=True), "exclude each other"),
    (dict(codebook_diversity_loss_weight=-1.0), "codebook_diversity_loss_weight"),
    (dict(codebook_diversity_temperature=0.0), "codebook_diversity_temperature"),
    (dict(rotation_trick=True, straight_through=True, stochastic_sample_codes=True), "exclude each other"),
])
def test_bad_options_raise_value_errors(options, match):
    with pytest.raises(ValueError, match=match):
        make(**options)


def test_own_buffers_may_be_missing_from_a_checkpoint():
    vq = make(affine_param=True)
    state = {k: v for k, v in vq.state_dict().items()
             if not k.endswith(("skipped_updates", "batch_stats_need_init", "batch_mean", "batch_variance"))}
    twin(vq).load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="embed_avg"):
        twin(vq).load_state_dict({k: v for k, v in state.items() if not k.endswith("embed_avg")}, strict=True)


def test_import_is_cheap():
    code = "import sys, vqdeploy; assert not {'onnx', 'onnxruntime', 'onnxscript'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_reduces_quantisation_error_on_clustered_data():
    torch.manual_seed(1)
    centers = torch.randn(CODEBOOK_SIZE, DIM) * 4
    vq = make(kmeans_init=True, threshold_ema_dead_code=1, decay=0.8)

    def batch():
        return (centers[torch.randint(0, CODEBOOK_SIZE, (4, 64))] + 0.1 * torch.randn(4, 64, DIM))

    for _ in range(30):
        vq(batch())
    vq.eval()
    x = batch()
    quantized, _, _ = vq(x)
    assert (quantized - x).pow(2).mean() < 0.25 * x.var()
