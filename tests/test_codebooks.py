"""``vqdeploy.codebooks`` on its own: the EMA step, k-means init, dead-code replacement, the NaN/Inf guard,
eval and frozen steps, and the frozen config, each checked against a plain definition written here (explicit
loops in float64) rather than through ``VectorQuantize``."""

import dataclasses

import pytest
import torch

from vqdeploy.codebooks import Codebook, CodebookConfig

from tolerances import assert_rounding_close, rounding_atol, size_of

STATE = ("embed", "embed_avg", "cluster_size")


def make(dim=3, codebook_size=5, num_codebooks=1, **options) -> Codebook:
    return Codebook(CodebookConfig(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **options)).train()


def set_state(cb: Codebook, embed=None, embed_avg=None, cluster_size=None) -> None:
    with torch.no_grad():
        for name, value in (("embed", embed), ("embed_avg", embed_avg), ("cluster_size", cluster_size)):
            if value is not None:
                getattr(cb, name).copy_(value)


def snapshot_state(cb: Codebook) -> dict:
    return {k: v.detach().clone() for k, v in cb.state_dict().items()}


def assert_state_unchanged(cb: Codebook, before: dict, skipped: int = 0) -> None:
    after = cb.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key == "skipped_updates":
            assert int(after[key]) == int(value) + skipped, key
        else:
            assert torch.equal(after[key], value), f"{key} changed"


def explicit_stats(x, indices, weights, codebook_size):
    """Weighted count and sum of the rows assigned to every code, one row at a time, in float64 (rows of
    weight 0 are never read)."""
    h, n, d = x.shape
    counts = torch.zeros(h, codebook_size, dtype=torch.float64)
    sums = torch.zeros(h, codebook_size, d, dtype=torch.float64)
    for head in range(h):
        for i in range(n):
            w = 1.0 if weights is None else float(weights[head, i])
            if w == 0:
                continue
            k = int(indices[head, i])
            counts[head, k] += w
            sums[head, k] += w * x[head, i].double()
    return counts, sums


def explicit_codes(cluster_size, embed_avg, eps, cosine=False):
    """sums / Laplace-smoothed counts: (c + eps) / (N + K eps) * N, N the total count of the codebook."""
    k = cluster_size.shape[-1]
    total = cluster_size.sum(dim=-1, keepdim=True)
    smoothed = (cluster_size + eps) / (total + k * eps) * total
    codes = embed_avg / smoothed.unsqueeze(-1)
    return torch.nn.functional.normalize(codes, dim=-1) if cosine else codes


def nearest_float64(x, codes):
    """Index of the nearest code (first of equals) and the gap to the second nearest, per row, in float64."""
    dist = ((x.double().unsqueeze(-2) - codes.double().unsqueeze(-3)) ** 2).sum(-1)  # (h, n, k)
    best = dist.argmin(dim=-1)
    top2 = dist.topk(2, dim=-1, largest=False).values
    return best, top2[..., 1] - top2[..., 0]


def first_keys(keys, weights, num):
    """The rows drawn as the first ``num`` codes: the kept rows with the largest noise keys, largest first."""
    keys = torch.where(weights > 0, keys, torch.full_like(keys, -1.0))
    return keys.topk(num, dim=-1).indices


# ---------------------------------------------------------------------------------------------- EMA step


@pytest.mark.parametrize("num_codebooks", [1, 3])
@pytest.mark.parametrize("masked", [False, True], ids=["all_rows", "masked"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_ema_step_is_decayed_counts_and_sums_over_smoothed_counts(num_codebooks, masked, cosine):
    """Two training steps: cluster_size and embed_avg move to decay * old + (1 - decay) * this batch's
    per-code counts and sums (masked rows left out, every codebook on its own rows), and the codes become
    embed_avg over the Laplace-smoothed counts."""
    torch.manual_seed(1)
    h, k, d, n, decay, eps = num_codebooks, 6, 4, 24, 0.7, 1e-3
    cb = make(dim=d, codebook_size=k, num_codebooks=h, decay=decay, eps=eps, threshold_ema_dead_code=0,
              use_cosine_sim=cosine)
    embed = torch.randn(h, k, d)
    if cosine:
        embed = torch.nn.functional.normalize(embed, dim=-1)
    cluster_size = 0.5 + 3 * torch.rand(h, k)
    set_state(cb, embed=embed, embed_avg=embed * cluster_size.unsqueeze(-1), cluster_size=cluster_size)
    ref_size, ref_avg = cluster_size.double(), (embed * cluster_size.unsqueeze(-1)).double()
    for step in range(2):
        x = torch.randn(h, n, d)
        weights = None
        if masked:
            weights = (torch.rand(h, n) > 0.3).float()
            weights[:, 0] = 1.0
            x = torch.where(weights.unsqueeze(-1) > 0, x, torch.full_like(x, 1e4))  # far rows, left out
        out = cb(x, weights=weights)
        counts, sums = explicit_stats(x, out.indices, weights, k)
        if masked:
            assert counts.sum() == weights.sum()
        ref_size = decay * ref_size + (1 - decay) * counts
        ref_avg = decay * ref_avg + (1 - decay) * sums
        kept = x if weights is None else x[weights > 0]
        bound = dict(steps=step + 1, n=x.numel(), data=torch.cat([kept.flatten(), ref_avg.flatten().float()]))
        assert_rounding_close(cb.cluster_size, ref_size, msg="cluster_size", **bound)
        assert_rounding_close(cb.embed_avg, ref_avg, msg="embed_avg", **bound)
        assert_rounding_close(cb.embed, explicit_codes(ref_size, ref_avg, eps, cosine), msg="embed", **bound)
    assert int(cb.skipped_updates) == 0
    assert cb.cluster_size.dtype == cb.embed_avg.dtype == cb.embed.dtype == torch.float32


def test_ema_step_counts_the_rows_matched_to_each_code():
    """The indices a step returns are each row's nearest code, and they are the assignment it learns from."""
    torch.manual_seed(2)
    cb = make(dim=4, codebook_size=8, num_codebooks=2, threshold_ema_dead_code=0, decay=0.0)
    x = torch.randn(2, 40, 4)
    codes = cb.embed.clone()
    out = cb(x)
    best, gap = nearest_float64(x, codes)
    clear = gap > 1e-4  # rows with a tie to rounding may go either way
    assert clear.float().mean() > 0.9
    assert torch.equal(out.indices[clear], best[clear])
    torch.testing.assert_close(out.quantized, codes.gather(1, out.indices.unsqueeze(-1).expand(-1, -1, 4)),
                               atol=0, rtol=0)
    counts, _ = explicit_stats(x, out.indices, None, 8)
    assert torch.equal(cb.cluster_size, counts.float())  # decay 0: this batch's counts, exact small integers


def test_update_from_indices_is_the_explicit_ema_of_the_given_codes():
    """``update_from_indices_``: the EMA step of rows assigned to given codes, rows marked -1 left out."""
    torch.manual_seed(3)
    h, k, d, n, decay, eps = 2, 5, 3, 16, 0.8, 1e-5
    cb = make(dim=d, codebook_size=k, num_codebooks=h, decay=decay, eps=eps, threshold_ema_dead_code=0)
    cluster_size = 1 + torch.rand(h, k)
    embed_avg = torch.randn(h, k, d)
    set_state(cb, embed_avg=embed_avg, cluster_size=cluster_size)
    x = torch.randn(h, n, d)
    indices = torch.randint(0, k, (h, n))
    indices[:, ::4] = -1
    x[:, ::4] = float("nan")  # rows left out may hold anything
    cb.update_from_indices_(x, indices)
    counts, sums = explicit_stats(x, indices.clamp(min=0), (indices >= 0).float(), k)
    ref_size = decay * cluster_size.double() + (1 - decay) * counts
    ref_avg = decay * embed_avg.double() + (1 - decay) * sums
    bound = dict(n=x.numel(), data=torch.cat([x[indices >= 0].flatten(), embed_avg.flatten()]))
    assert_rounding_close(cb.cluster_size, ref_size, msg="cluster_size", **bound)
    assert_rounding_close(cb.embed_avg, ref_avg, msg="embed_avg", **bound)
    assert_rounding_close(cb.embed, explicit_codes(ref_size, ref_avg, eps), msg="embed", **bound)
    assert int(cb.skipped_updates) == 0


def test_manual_ema_update_tracks_statistics_and_recomputes_codes_on_request():
    torch.manual_seed(4)
    cb = make(dim=3, codebook_size=4, manual_ema_update=True, threshold_ema_dead_code=0, eps=1e-5)
    codes = cb.embed.clone()
    x = torch.randn(1, 20, 3)
    cb(x)
    assert torch.equal(cb.embed, codes)  # the codes wait
    assert float(cb.cluster_size.sum()) > 0
    cb.update_ema()
    expected = explicit_codes(cb.cluster_size.double(), cb.embed_avg.double(), 1e-5)
    assert_rounding_close(cb.embed, expected, n=x.numel(), data=x)


# ---------------------------------------------------------------------------------------------- k-means init


def kmeans_float64(x, weights, init, iters):
    """Lloyd's algorithm from ``init``, one row at a time in float64: each code becomes the mean of the kept
    rows nearest to it (first code of equals), a code with no row keeps its value.  Also returns the last
    iteration's counts and the smallest gap between a row's nearest and second nearest code."""
    h, n, d = x.shape
    means = init.double().clone()
    counts = torch.zeros(h, init.shape[1], dtype=torch.float64)
    min_gap = float("inf")
    for _ in range(iters):
        assigned, gap = nearest_float64(x, means)
        keep = weights > 0
        min_gap = min(min_gap, float(gap[keep].min()))
        counts, sums = explicit_stats(x, assigned, weights, init.shape[1])
        for head in range(h):
            for c in range(init.shape[1]):
                if counts[head, c] > 0:
                    means[head, c] = sums[head, c] / counts[head, c]
    return means, counts, min_gap


@pytest.mark.parametrize("iters", [1, 3, 6])
def test_kmeans_init_runs_lloyd_from_sampled_rows_on_the_first_batch(iters):
    """Two codebooks, a mask: after the first training batch the codes are ``kmeans_iters`` iterations of
    Lloyd's k-means of its kept rows started from the rows the noise picks; cluster_size holds the last
    iteration's counts and embed_avg their sums; ``initted`` flips; a second, very different batch changes
    nothing."""
    torch.manual_seed(9)  # data on which the partition moves at iterations 2, 3 and 4, then stays
    h, k, d, n = 2, 4, 3, 32
    x = torch.randn(h, n, d) * 3
    weights = (torch.rand(h, n) > 0.25).float()
    x = torch.where(weights.unsqueeze(-1) > 0, x, torch.full_like(x, 1e3))  # masked rows: far away
    cb = make(dim=d, codebook_size=k, num_codebooks=h, kmeans_init=True, kmeans_iters=iters,
              ema_update=False, threshold_ema_dead_code=0)
    assert float(cb.initted) == 0 and not cb.embed.any() and cb._kmeans_pending
    noise = {"kmeans": torch.rand(cb.noise_shapes(n)["kmeans"])}
    cb(x, weights=weights, noise=noise)

    init = x.gather(1, first_keys(noise["kmeans"][:, :n], weights, k).unsqueeze(-1).expand(-1, -1, d))
    means, counts, min_gap = kmeans_float64(x, weights, init, iters)
    kept = x[weights > 0]
    # no near tie: every assignment is clear of float32 rounding of the squared distances (by about 1000 times on this data)
    assert min_gap > rounding_atol(size_of(kept) ** 2, steps=iters, n=n), "a near tie (pick another seed)"
    assert float(cb.initted) == 1 and not cb._kmeans_pending
    assert torch.equal(cb.cluster_size, counts.float())
    assert_rounding_close(cb.embed, means, n=n, data=kept, msg="codes")
    assert_rounding_close(cb.embed_avg, means * counts.unsqueeze(-1), n=n, data=kept * float(counts.max()), msg="sums")
    assert cb.embed.abs().max() < 100  # no masked row reached a code

    if iters == 6:  # converged: every code with rows is the mean of the kept rows nearest to it
        assigned, _ = nearest_float64(x, cb.embed)
        counts_now, sums_now = explicit_stats(x, assigned, weights, k)
        has_rows = counts_now > 0
        assert_rounding_close(cb.embed[has_rows], (sums_now / counts_now.clamp(min=1).unsqueeze(-1))[has_rows],
                              n=n, data=kept, msg="fixed point")

    before = snapshot_state(cb)
    cb(torch.randn(h, n, d) * 100, noise={"kmeans": torch.rand(cb.noise_shapes(n)["kmeans"])})
    assert_state_unchanged(cb, before)


def test_kmeans_keeps_the_sampled_row_of_a_code_left_without_rows():
    """Exact small numbers (every sum and mean is exact in float32): the noise starts the codes at a row of
    cluster A, a row of cluster B and both copies of an outlier; cluster C joins A's code, the outlier's rows
    go to the first of its two equal codes, and the second keeps its sampled row with a count of 0."""
    a = [[1, 0], [-1, 0], [0, 1], [0, -1]]
    b = [[11, 0], [9, 0], [10, 1], [10, -1]]
    c = [[1, 10], [-1, 10], [0, 11], [0, 9]]
    outlier = [[20, 20], [20, 20]]
    x = torch.tensor([a + b + c + outlier], dtype=torch.float32)  # (1, 14, 2)
    n = x.shape[1]
    cb = make(dim=2, codebook_size=4, kmeans_init=True, kmeans_iters=5, ema_update=False, threshold_ema_dead_code=0)
    keys = torch.full((1, n + 4), 0.1)
    keys[0, [0, 4, 12, 13]] = torch.tensor([0.9, 0.8, 0.7, 0.6])  # first codes: a[0], b[0], outlier, outlier
    cb(x, noise={"kmeans": keys})
    expected = torch.tensor([[[0, 5], [10, 0], [20, 20], [20, 20]]], dtype=torch.float32)  # A and C: mean (0, 5)
    assert torch.equal(cb.embed, expected)
    assert torch.equal(cb.cluster_size, torch.tensor([[8.0, 4.0, 2.0, 0.0]]))
    assert torch.equal(cb.embed_avg, expected * cb.cluster_size.unsqueeze(-1))
    means, counts, _ = kmeans_float64(x, torch.ones(1, n), x[:, [0, 4, 12, 13]], 5)
    assert torch.equal(means.float(), expected) and torch.equal(counts.float(), cb.cluster_size)


def test_kmeans_init_with_ema_then_takes_one_ema_step_of_the_same_batch():
    """With the EMA on, the first step is k-means followed by the EMA step of the batch matched to the new
    codes; k-means converged, so every row keeps its code and the state is the k-means state itself."""
    a = [[1, 0], [-1, 0], [0, 1], [0, -1]]
    x = torch.tensor([a + [[10 + p, q] for p, q in a]], dtype=torch.float32)  # two clusters, means (0,0), (10,0)
    cb = make(dim=2, codebook_size=2, kmeans_init=True, kmeans_iters=3, decay=0.8, eps=1e-5,
              threshold_ema_dead_code=0)
    keys = torch.full((1, 10), 0.1)
    keys[0, [0, 4]] = torch.tensor([0.9, 0.8])
    out = cb(x, noise={"kmeans": keys})
    assert torch.equal(out.indices, torch.tensor([[0] * 4 + [1] * 4]))
    assert torch.equal(cb.cluster_size, torch.tensor([[4.0, 4.0]]))  # 0.8 * 4 + 0.2 * 4
    ref = explicit_codes(torch.tensor([[4.0, 4.0]], dtype=torch.float64),
                         torch.tensor([[[0.0, 0.0], [40.0, 0.0]]], dtype=torch.float64), 1e-5)
    assert_rounding_close(cb.embed, ref, n=x.numel(), data=x)
    assert float(cb.initted) == 1


# ---------------------------------------------------------------------------------------------- dead codes


@pytest.mark.parametrize("reset_cluster_size", [None, 3.0])
def test_dead_codes_become_distinct_kept_rows_and_live_codes_take_the_ema_step(reset_cluster_size):
    """Codes whose count after the EMA step falls under ``threshold_ema_dead_code`` become distinct kept rows
    of the batch, with embed_avg = row * reset value and cluster_size = the reset value (the threshold unless
    ``reset_cluster_size``); the other codes hold exactly the EMA step's values."""
    torch.manual_seed(6)
    h, k, d, n, decay, threshold, eps = 2, 6, 3, 20, 0.8, 1.5, 1e-5
    cb = make(dim=d, codebook_size=k, num_codebooks=h, decay=decay, eps=eps, threshold_ema_dead_code=threshold,
              reset_cluster_size=reset_cluster_size)
    live = torch.tensor([True, False, True, False, False, True])
    embed = torch.where(live.unsqueeze(-1), torch.randn(h, k, d), torch.full((h, k, d), 100.0))  # dead: far away
    # code 4 is over the threshold before the step (1.6) and under it after (0.8 * 1.6 = 1.28)
    cluster_size = torch.tensor([5.0, 0.5, 5.0, 0.5, 1.6, 5.0]).expand(h, k).clone()
    embed_avg = embed * cluster_size.unsqueeze(-1)
    set_state(cb, embed=embed, embed_avg=embed_avg, cluster_size=cluster_size)
    x = torch.randn(h, n, d)
    weights = torch.ones(h, n)
    weights[:, -5:] = 0.0
    x[:, -5:] = -50.0  # masked rows: never a replacement
    out = cb(x, weights=weights)

    counts, sums = explicit_stats(x, out.indices, weights, k)
    assert not counts[:, ~live].any()  # no row went to a far code
    ref_size = decay * cluster_size.double() + (1 - decay) * counts
    ref_avg = decay * embed_avg.double() + (1 - decay) * sums
    expired = ref_size < threshold
    assert torch.equal(expired, ~live.expand(h, k))  # 0.8 * 0.5 = 0.4, 0.8 * 1.6 = 1.28 < 1.5 <= 0.8 * 5
    reset = threshold if reset_cluster_size is None else reset_cluster_size
    kept_rows = [x[head][weights[head] > 0] for head in range(h)]
    for head in range(h):
        codes = cb.embed[head, expired[head]]
        matches = (codes.unsqueeze(1) == kept_rows[head].unsqueeze(0)).all(-1)  # (dead, kept rows)
        assert matches.any(dim=1).all(), "a replaced code is not a kept row of its codebook's batch"
        assert len({tuple(c.tolist()) for c in codes}) == len(codes), "two codes replaced by one row"
    assert torch.equal(cb.cluster_size[expired], torch.full((int(expired.sum()),), float(reset)))
    assert torch.equal(cb.embed_avg[expired], cb.embed[expired] * reset)

    bound = dict(n=x.numel(), data=torch.cat([x.flatten(), embed_avg.flatten()]))
    assert_rounding_close(cb.cluster_size[~expired], ref_size[~expired], msg="live cluster_size", **bound)
    assert_rounding_close(cb.embed_avg[~expired], ref_avg[~expired], msg="live embed_avg", **bound)
    # the codes divide by the smoothed counts of the step's EMA (before the reset), as in the EMA test
    ref_codes = explicit_codes(ref_size, ref_avg, eps)
    assert_rounding_close(cb.embed[~expired], ref_codes[~expired], msg="live embed", **bound)


def test_expire_codes_replaces_only_codes_under_the_threshold():
    torch.manual_seed(7)
    cb = make(dim=3, codebook_size=6, num_codebooks=2, threshold_ema_dead_code=2.0)
    cluster_size = torch.tensor([[5.0, 1.0, 2.0, 0.0, 3.0, 1.99], [0.5, 4.0, 4.0, 4.0, 4.0, 4.0]])
    set_state(cb, cluster_size=cluster_size)
    before = snapshot_state(cb)
    x = torch.randn(2, 10, 3)
    cb.expire_codes_(x)
    dead = cluster_size < 2.0
    assert torch.equal(cb.embed[~dead], before["embed"][~dead])
    assert torch.equal(cb.embed_avg[~dead], before["embed_avg"][~dead])
    assert torch.equal(cb.cluster_size[~dead], cluster_size[~dead])
    for head in range(2):
        for code in cb.embed[head, dead[head]]:
            assert (code == x[head]).all(-1).any()
    assert torch.equal(cb.cluster_size[dead], torch.full((int(dead.sum()),), 2.0))
    assert torch.equal(cb.embed_avg[dead], cb.embed[dead] * 2.0)


# ---------------------------------------------------------------------------------------------- bad data


def _forward(cb, x):
    cb(x)


def _update_from_indices(cb, x):
    cb.update_from_indices_(x, torch.zeros(x.shape[:2], dtype=torch.long))


def _expire(cb, x):
    cb.expire_codes_(x)


def _end_of_shared_step(cb, x):
    cb.end_of_shared_step_(x, None, cb.dead_code_noise(x.shape[1], x.device))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("entry, options, counted", [
    (_forward, dict(threshold_ema_dead_code=2.0), True),
    (_forward, dict(kmeans_init=True, threshold_ema_dead_code=2.0, affine_param=True), True),
    (_forward, dict(ema_update=False, dead_codes_without_ema=True, threshold_ema_dead_code=2.0), True),
    (_update_from_indices, dict(threshold_ema_dead_code=2.0), True),
    (_expire, dict(threshold_ema_dead_code=2.0), False),
    (_end_of_shared_step, dict(manual_ema_update=True, threshold_ema_dead_code=2.0), False),
], ids=["forward", "forward_kmeans_affine", "forward_dead_codes_only", "update_from_indices", "expire_codes",
        "end_of_shared_step"])
def test_non_finite_rows_never_reach_the_codebook(entry, options, counted, bad):
    """One bad element in one row: every buffer keeps its value (the step is skipped and, where it is a
    training step, counted in ``skipped_updates``), even with every code dead; a clean batch then updates."""
    torch.manual_seed(8)
    cb = make(dim=3, codebook_size=4, num_codebooks=2, **options)
    set_state(cb, cluster_size=torch.zeros(2, 4))  # every code is dead: any update would show
    before = snapshot_state(cb)
    x = torch.randn(2, 10, 3)
    x[1, 7, 2] = bad
    entry(cb, x)
    assert_state_unchanged(cb, before, skipped=int(counted))
    assert all(torch.isfinite(v.float()).all() for v in cb.state_dict().values())
    x[1, 7, 2] = 0.0
    entry(cb, x)
    assert not torch.equal(cb.embed, before["embed"])
    assert all(torch.isfinite(v.float()).all() for v in cb.state_dict().values())


def test_non_finite_masked_rows_are_left_out_exactly():
    """A masked row holding NaN or Inf changes nothing: the state equals that of the same step whose masked
    row holds a finite value (same noise), bit for bit."""
    torch.manual_seed(9)
    twins = [make(dim=3, codebook_size=4, num_codebooks=2, kmeans_init=True, threshold_ema_dead_code=2.0)
             for _ in range(3)]
    for cb in twins[1:]:
        cb.load_state_dict(twins[0].state_dict())
    x = torch.randn(2, 10, 3)
    weights = torch.ones(2, 10)
    weights[0, 3] = 0.0
    noise = {name: torch.rand(shape) for name, shape in twins[0].noise_shapes(10).items()}
    for cb, value in zip(twins, [5.0, float("nan"), float("inf")]):
        xb = x.clone()
        xb[0, 3] = value
        cb(xb, weights=weights, noise=noise)
    assert float(twins[0].initted) == 1 and int(twins[0].skipped_updates) == 0
    for cb in twins[1:]:
        assert_state_unchanged(cb, twins[0].state_dict())


def test_a_bad_first_batch_leaves_kmeans_for_the_next_clean_one():
    cb = make(dim=3, codebook_size=4, kmeans_init=True, kmeans_iters=3)
    x = torch.randn(1, 12, 3)
    x[0, 0, 0] = float("nan")
    cb(x)
    assert float(cb.initted) == 0 and not cb.embed.any() and cb._kmeans_pending
    x[0, 0, 0] = 0.0
    cb(x)
    assert float(cb.initted) == 1 and cb.embed.any() and torch.isfinite(cb.embed).all()


# ---------------------------------------------------------------------------------------------- eval, frozen


@pytest.mark.parametrize("call", ["eval_forward", "quantize", "top_codes", "frozen_forward"])
def test_eval_and_frozen_steps_change_no_state(call):
    torch.manual_seed(10)
    cb = make(dim=3, codebook_size=5, num_codebooks=2, threshold_ema_dead_code=2.0)
    cb(torch.randn(2, 8, 3))  # a trained state
    set_state(cb, cluster_size=torch.zeros(2, 5))  # every code dead: a training step would replace them
    before = snapshot_state(cb)
    x = torch.randn(2, 9, 3)
    if call == "eval_forward":
        out = cb.eval()(x)
    elif call == "quantize":
        out = cb.quantize(x)
    elif call == "top_codes":
        out = cb.top_codes(x, 2)
    else:
        out = cb(x, freeze_codebook=True)
    assert_state_unchanged(cb, before)
    indices = out.indices[..., 0] if call == "top_codes" else out.indices
    best, gap = nearest_float64(x, before["embed"])
    clear = gap > 1e-4
    assert torch.equal(indices[clear], best[clear])


def test_eval_forward_of_a_non_finite_batch_changes_no_state():
    cb = make(dim=3, codebook_size=4, kmeans_init=True).eval()
    before = snapshot_state(cb)
    x = torch.randn(1, 6, 3)
    x[0, 2] = float("nan")
    cb(x)
    assert_state_unchanged(cb, before)  # not even skipped_updates: eval takes no step


# ---------------------------------------------------------------------------------------------- config, buffers


def test_config_is_frozen_and_validated():
    config = CodebookConfig(dim=3, codebook_size=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.decay = 0.5
    with pytest.raises(ValueError, match="Euclidean"):
        CodebookConfig(dim=3, codebook_size=4, affine_param=True, use_cosine_sim=True)
    with pytest.raises(ValueError, match="straight_through"):
        CodebookConfig(dim=3, codebook_size=4, reinmax=True)
    with pytest.raises(ValueError, match="Euclidean"):
        dataclasses.replace(config, affine_param=True, use_cosine_sim=True)  # copies are validated too
    assert config.reset_value == config.threshold_ema_dead_code
    assert dataclasses.replace(config, reset_cluster_size=7.0).reset_value == 7.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_buffers_keep_their_shape_and_float32_whatever_the_batch_dtype(dtype):
    torch.manual_seed(11)
    cb = make(dim=3, codebook_size=4, num_codebooks=2, kmeans_init=True, threshold_ema_dead_code=2.0,
              affine_param=True)
    shapes = {k: (v.shape, v.dtype) for k, v in cb.state_dict().items()}
    out = cb(torch.randn(2, 12, 3, dtype=dtype))
    cb(torch.randn(2, 12, 3, dtype=dtype))
    assert {k: (v.shape, v.dtype) for k, v in cb.state_dict().items()} == shapes
    assert out.quantized.dtype == torch.float32 and out.indices.dtype == torch.long
    assert float(cb.initted) == 1


def test_loaded_state_is_checked_and_sets_the_kmeans_flag():
    """A checkpoint of the wrong shape is refused; one whose k-means ran (the reference's 0-d bool flag
    included) loads, and the next batch does not run k-means again."""
    trained = make(dim=3, codebook_size=4, kmeans_init=True, kmeans_iters=3)
    trained(torch.randn(1, 12, 3))
    state = trained.state_dict()
    fresh = make(dim=3, codebook_size=4, kmeans_init=True, kmeans_iters=3)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fresh.load_state_dict({**state, "embed": torch.zeros(1, 5, 3)})
    fresh.load_state_dict({**state, "initted": torch.tensor(True)})
    assert float(fresh.initted) == 1 and fresh.initted.dtype == torch.float32 and not fresh._kmeans_pending
    frozen = make(dim=3, codebook_size=4, kmeans_init=True, ema_update=False, threshold_ema_dead_code=0)
    frozen.load_state_dict(state)
    before = snapshot_state(frozen)
    frozen(torch.randn(1, 12, 3) * 100)
    assert_state_unchanged(frozen, before)
