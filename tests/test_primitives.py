"""The shared primitives against their plain (dynamic-shape, one-hot) definitions."""

import torch
import torch.nn.functional as F

from vqdeploy import primitives as P
from vqdeploy.search import torch_path


def test_nearest_codes_match_exact_distances():
    x, codes = torch.randn(2, 50, 6), torch.randn(2, 20, 6)
    exact = torch.cdist(x.double(), codes.double()).argmin(dim=-1)
    assert torch.equal(P.nearest_codes(x, codes), exact)
    cos = (F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).transpose(1, 2)).argmax(dim=-1)
    assert torch.equal(P.nearest_codes(F.normalize(x, dim=-1), F.normalize(codes, dim=-1), use_cosine_sim=True), cos)


def test_large_codebooks_are_matched_block_by_block(monkeypatch):
    """Rows go through the score matrix in blocks (static slices) without changing any index."""
    x, codes = torch.randn(2, 50, 6, dtype=torch.float64), torch.randn(2, 9, 6, dtype=torch.float64)
    exact = torch.cdist(x, codes).argmin(dim=-1)
    cosine = (F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).transpose(1, 2)).argmax(dim=-1)
    monkeypatch.setattr(torch_path, "SCORE_BLOCK_ELEMENTS", 2 * 9 * 7)  # 7 rows per block: 8 blocks, the last one short
    assert torch.equal(P.nearest_codes(x, codes), exact)
    assert torch.equal(P.nearest_codes(F.normalize(x, dim=-1), F.normalize(codes, dim=-1), use_cosine_sim=True),
                       cosine)


def test_euclidean_logits_are_negative_distances():
    x, codes = torch.randn(1, 30, 5), torch.randn(1, 7, 5)
    torch.testing.assert_close(P.euclidean_logits(x, codes), -torch.cdist(x, codes), atol=1e-5, rtol=1e-5)


def test_codebook_diversity_loss_is_minus_the_entropy_of_the_average_code_distribution_per_position():
    h, b, n, k, temperature = 2, 3, 4, 5, 7.0
    logits = torch.randn(h, b * n, k, dtype=torch.float64)
    weights = torch.ones(h, b * n, dtype=torch.float64)
    weights[:, -n:] = 0  # the last sequence is padding
    weights[:, 1::n] = 0  # and the second position of every sequence
    expected, positions = 0.0, 0
    for position in range(n):
        kept = [(c, s * n + position) for c in range(h) for s in range(b) if weights[c, s * n + position] > 0]
        if not kept:
            continue
        average = sum((logits[c, r] * temperature).softmax(-1) for c, r in kept) / len(kept)
        expected += float((average * average.clamp(min=1e-5).log()).sum())
        positions += 1
    got = P.codebook_diversity_loss(logits, temperature, n, weights)
    torch.testing.assert_close(got, torch.tensor(expected / positions, dtype=torch.float64))
    unweighted = P.codebook_diversity_loss(logits, temperature, n)
    torch.testing.assert_close(unweighted, P.codebook_diversity_loss(logits, temperature, n, torch.ones_like(weights)))


def test_weighted_counts_and_sums_equal_one_hot_products():
    indices = torch.randint(0, 9, (3, 40))
    x = torch.randn(3, 40, 4)
    weights = (torch.rand(3, 40) > 0.3).float()
    one_hot = F.one_hot(indices, 9).float() * weights.unsqueeze(-1)
    torch.testing.assert_close(P.counts_per_code(indices, 9, weights), one_hot.sum(dim=1))
    torch.testing.assert_close(P.sums_per_code(x, indices, 9, weights), one_hot.transpose(1, 2) @ x)


def test_opaque_ops_pass_opcheck_and_have_the_documented_gradients():
    """segment_sum and snapshot are custom ops (see their docstrings): fake kernels, autograd and schema checked."""
    values = torch.randn(12, 3, requires_grad=True)
    ids = torch.randint(0, 5, (12,))
    torch.library.opcheck(P.segment_sum, (values, ids, 5))
    torch.library.opcheck(P.snapshot, (torch.randn(4, 3, requires_grad=True).t(),))
    P.segment_sum(values, ids, 5).pow(2).sum().backward()
    expected = F.one_hot(ids, 5).float().t() @ values.detach()
    torch.testing.assert_close(values.grad, 2 * expected[ids])
    source = torch.randn(3, 4, requires_grad=True)
    copy = P.snapshot(source.t())
    assert copy.is_contiguous() and torch.equal(copy, source.t())
    (copy * 3).sum().backward()
    torch.testing.assert_close(source.grad, torch.full((3, 4), 3.0))


def test_masked_mean_var_equal_statistics_of_kept_rows():
    x = torch.randn(2, 30, 3)
    weights = torch.ones(2, 30)
    weights[1, 10:] = 0
    mean, var = P.masked_mean_var(x, weights)
    kept = x[1, :10]
    torch.testing.assert_close(mean[1, 0], kept.mean(dim=0))
    torch.testing.assert_close(var[1, 0], kept.var(dim=0, unbiased=False))
    torch.testing.assert_close(mean[0, 0], x[0].mean(dim=0))


def test_row_sampling_draws_distinct_kept_rows_when_it_can():
    weights = torch.zeros(2, 100)
    weights[0, :60] = 1
    weights[1, 90:] = 1  # only 10 kept rows for 40 samples: the rest is drawn with replacement
    picked = P.sample_row_indices(weights, 40)
    assert picked.shape == (2, 40)
    assert len(set(picked[0].tolist())) == 40 and picked[0].max() < 60
    assert picked[1].min() >= 90
    assert set(range(90, 100)) <= set(picked[1].tolist())


def test_row_sampling_with_no_kept_row_uses_every_row():
    picked = P.sample_row_indices(torch.zeros(1, 8), 5)
    assert picked.min() >= 0 and picked.max() < 8 and len(set(picked[0].tolist())) == 5


def test_kmeans_recovers_separated_clusters_and_ignores_dropped_rows():
    centers = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    x = (centers.repeat_interleave(50, dim=0) + 0.1 * torch.randn(150, 2)).unsqueeze(0)
    x = torch.cat([x, torch.full((1, 20, 2), 1e4)], dim=1)  # padding that must not become a cluster
    weights = torch.ones(1, 170)
    weights[0, 150:] = 0
    means, counts = P.kmeans(x, 3, 10, weights=weights)
    found = means[0][means[0][:, 0].argsort()]
    expected = centers[centers[:, 0].argsort()]
    torch.testing.assert_close(found, expected, atol=0.1, rtol=0)
    assert counts.sum() == 150


def test_orthogonal_loss_with_weights_equals_loss_on_the_subset():
    codes = torch.randn(1, 12, 5)
    keep = torch.zeros(1, 12)
    keep[0, [1, 4, 7, 9]] = 1
    torch.testing.assert_close(P.orthogonal_loss(codes, keep), P.orthogonal_loss(codes[:, [1, 4, 7, 9]]))
    orthonormal = torch.eye(4).unsqueeze(0)
    torch.testing.assert_close(P.orthogonal_loss(orthonormal), torch.tensor(0.0))


def test_straight_through_weights_are_zero_valued_with_softmax_gradient():
    logits = torch.randn(1, 6, 5, requires_grad=True)
    indices = logits.argmax(dim=-1)
    weights = P.straight_through_weights(logits, indices, temperature=0.5)
    assert torch.equal(weights, torch.zeros_like(weights))
    codes = torch.randn(1, 5, 3)
    torch.bmm(weights, codes).sum().backward()
    expected = torch.autograd.grad(torch.bmm((logits / 0.5).softmax(-1), codes).sum(), logits)[0]
    torch.testing.assert_close(logits.grad, expected)
    reinmax = P.straight_through_weights(logits, indices, temperature=0.5, reinmax=True)
    assert torch.allclose(reinmax, torch.zeros_like(reinmax), atol=1e-6)


def test_one_uniform_draw_serves_every_consumer():
    torch.manual_seed(3)
    drawn = P.draw_uniform({"a": (2, 3), "b": (4,)})
    torch.manual_seed(3)
    flat = torch.rand(10)
    torch.testing.assert_close(drawn["a"].reshape(-1), flat[:6])
    torch.testing.assert_close(drawn["b"], flat[6:])


def test_laplace_smoothing_keeps_total_and_lifts_zeros():
    counts = torch.tensor([[0.0, 3.0, 5.0]])
    smoothed = P.laplace_smoothing(counts, 3, 1e-5)
    torch.testing.assert_close(smoothed.sum(), counts.sum())
    assert (smoothed > 0).all()


# property-based checks over random shapes and masks
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 3), n=st.integers(1, 40), k=st.integers(1, 12), d=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_counts_and_sums_match_one_hot_for_any_shape(h, n, k, d, seed):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, k, (h, n), generator=g)
    x = torch.randn(h, n, d, generator=g)
    weights = (torch.rand(h, n, generator=g) > 0.5).float()
    one_hot = F.one_hot(indices, k).float() * weights.unsqueeze(-1)
    torch.testing.assert_close(P.counts_per_code(indices, k, weights), one_hot.sum(dim=1))
    torch.testing.assert_close(P.sums_per_code(x, indices, k, weights), one_hot.transpose(1, 2) @ x)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 50), num=st.integers(1, 60), keep_prob=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_row_sampling_invariants(n, num, keep_prob, seed):
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(2, n, generator=g) < keep_prob).float()
    picked = P.sample_row_indices(weights, num, torch.rand(P.row_sample_noise_shape(2, n, num), generator=g))
    assert picked.shape == (2, num) and picked.min() >= 0 and picked.max() < n
    for row in range(2):
        kept = set(torch.nonzero(weights[row]).flatten().tolist()) or set(range(n))
        chosen = picked[row].tolist()
        assert set(chosen) <= kept
        if len(kept) >= num:
            assert len(set(chosen)) == num  # without replacement while there are enough rows
