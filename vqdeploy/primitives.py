"""Graph-friendly building blocks shared by every quantizer.

Every function here has static output shapes, branches only on Python values
known at trace time (shapes, flags), and behaves the same eagerly, under
``torch.compile(fullgraph=True)`` and when exported.  Masks are carried as
float weights (1 keeps a row, 0 drops it) instead of boolean indexing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .search.dispatch import fused_search_used, search_nearest
from .search.torch_path import cosine_logits, nearest_codes_torch, sq_dist_scores

# ---------------------------------------------------------------------------
# small numerics


def l2norm(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return F.normalize(t, p=2, dim=dim)


def soft_clamp(x: torch.Tensor, value: float | torch.Tensor) -> torch.Tensor:
    """``tanh(x / value) * value``: x squashed into (-value, value), about the identity near 0."""
    return (x / value).tanh() * value


def rotate_to(x: torch.Tensor, codes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024, arXiv 2410.06424, section 4.2): ``codes`` in the forward pass, while
    the gradient reaches ``x`` through the rotation and rescaling that carries x onto its code (held constant),
    so it keeps the angle between x and the code instead of passing through unchanged as straight-through does.
    x, codes: (..., d); ``codes`` get no gradient."""
    x_norm = x.norm(dim=-1, keepdim=True)
    codes = codes.detach()
    code_norm = codes.norm(dim=-1, keepdim=True)
    u = (x / x_norm.clamp(min=eps)).detach()
    q = codes / code_norm.clamp(min=eps)
    w = F.normalize(u + q, dim=-1, eps=eps)
    # (I - 2 w w^T + 2 u q^T) applied to x: a Householder reflection, then one onto the code's direction
    rotated = x - 2 * (x * w).sum(dim=-1, keepdim=True) * w + 2 * (x * u).sum(dim=-1, keepdim=True) * q
    return rotated * (code_norm / x_norm.clamp(min=eps)).detach()


def normal_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """Standard normal samples (Box-Muller) from uniform ones (2, *shape) -> shape: Gaussian noise from a step's
    single uniform draw (``draw_uniform``)."""
    radius = (-2 * torch.log(uniform[0].clamp(min=torch.finfo(uniform.dtype).tiny))).sqrt()
    return radius * torch.cos(2 * math.pi * uniform[1])


def directional_reparam(x: torch.Tensor, codes: torch.Tensor, noise: torch.Tensor, variance: float) -> torch.Tensor:
    """DiVeQ (Vali et al., https://openreview.net/forum?id=KRVnpTbx7R): ``x`` plus the quantization error's length
    along its direction perturbed by Gaussian ``noise`` of ``variance`` (the direction held constant), so the
    gradient reaches the codes through that length and the input unchanged.  Its value is the code up to the
    noise's turn of the direction."""
    error = codes - x
    direction = F.normalize(error + variance ** 0.5 * noise, dim=-1).detach()
    return x + direction * error.norm(dim=-1, keepdim=True)


def safe_log(t: torch.Tensor, eps: float = 1e-20) -> torch.Tensor:
    return torch.log(t.clamp(min=eps))


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples from uniform ones."""
    return -safe_log(-safe_log(uniform))


def draw_uniform(shapes: dict, device: torch.device | str | None = None) -> dict:
    """Every uniform random number a step needs, from a single generator call.

    torch.compile may reorder independent random ops, which changes which
    numbers each one gets; one draw, split into named views, makes compiled
    and eager runs from the same seed consume the generator identically."""
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.rand(sum(sizes), device=device)
    return {name: chunk.view(shape) for (name, shape), chunk in zip(shapes.items(), flat.split(sizes))}


def round_ste(z: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient."""
    return z + (z.round() - z).detach()


SEED_LIMIT = 2**31  # integer seeds lie in [-SEED_LIMIT, SEED_LIMIT): compiled graphs hold them as int32


def uniform_from_seed(seed: int | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A uniform number in [0, 1) (0-d float tensor) that depends only on ``seed``.

    An integer hash (two rounds of ``x ^= x >> 16; x *= 0x45d9f3b`` on 32 bits,
    done in int64 so nothing overflows), so it is the same eagerly, compiled,
    exported and on any device, and needs no generator object in the graph."""
    x = seed.to(device=device, dtype=torch.int64) if isinstance(seed, torch.Tensor) \
        else torch.as_tensor(seed, dtype=torch.int64, device=device)
    x = (x ^ (x >> 32)) & 0xFFFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    x = (x >> 16) ^ x
    return (x >> 8).float() / float(2**24)  # the top 24 bits: exact in float32, never 1.0


def row_sample_noise_shape(num_codebooks: int, num_rows: int, num: int) -> tuple[int, int]:
    """Shape of the uniform noise :func:`sample_row_indices` consumes."""
    return (num_codebooks, num_rows + num)


def laplace_smoothing(counts: torch.Tensor, num_categories: int, eps: float) -> torch.Tensor:
    """Additive smoothing of EMA cluster sizes, rescaled to keep their total
    (so that a never-used code does not divide by zero)."""
    total = counts.sum(dim=-1, keepdim=True)
    return (counts + eps) / (total + num_categories * eps) * total


def ema(old: torch.Tensor, new: torch.Tensor, decay: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Out-of-place exponential moving average ``decay * old + (1 - decay) * new``; ``weight`` scales the step
    (1 - decay) per element (broadcast from the left: per code for (h, k) weights of (h, k, d) sums)."""
    rate = 1.0 - decay
    if weight is not None:
        rate = rate * weight.reshape(*weight.shape, *(1,) * (new.ndim - weight.ndim))
    return torch.lerp(old.to(new.dtype), new, rate)


# ---------------------------------------------------------------------------
# reading state that the same step updates in place


@torch.library.custom_op("vqdeploy::snapshot", mutates_args=())
def snapshot(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` that torch.compile can neither recompute nor re-layout.

    Two compiler issues need one: the min-cut partitioner may recompute, in the
    backward, a read of a buffer that the forward has since overwritten,
    silently giving wrong gradients (pytorch/pytorch PR 197039, open), and
    inductor may hand ``torch.cond`` an operand with other strides than it
    traced.  An opaque op's output has the exact layout of its fake (contiguous)
    and the partitioner does not recompute it.  Its gradient is the identity."""
    return t.clone(memory_format=torch.contiguous_format)


@snapshot.register_fake
def _snapshot_shape(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


snapshot.register_autograd(lambda ctx, grad: grad)


# ---------------------------------------------------------------------------
# entropies of binary codes (LFQ)


def bit_table(num_bits: int, device=None) -> torch.Tensor:
    """(2^num_bits, num_bits) float 0/1: row i holds the bits of i, most significant first."""
    shifts = torch.arange(num_bits - 1, -1, -1, device=device)
    return ((torch.arange(2 ** num_bits, device=device).unsqueeze(-1) >> shifts) & 1).float()


def factorized_code_entropies(bit_logits: torch.Tensor, weights: torch.Tensor | None = None,
                              clamp: float = 1e-5, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample and batch entropy of ``softmax`` over all 2^d binary codes, without the N x 2^d table.

    bit_logits (N, c, d): code k's logit is sum_j z_j * (2 * bit_j(k) - 1) / 2, so the
    distribution is a product of per-bit Bernoullis with p_j = sigmoid(z_j).
    - per-sample entropy: the sum of the d binary entropies (exact), averaged over
      tokens (``weights``) and codebooks;
    - batch entropy: of the token-averaged code distribution, which is
      Q_hi^T diag(w) Q_lo / sum(w) with Q_hi, Q_lo the (N, 2^(d/2)) distributions
      over the two halves of the bits: one matrix product into a (c, 2^d) table.
      Probabilities are clamped at ``clamp`` inside the log, as the reference does.
    ``all_reduce`` (a differentiable sum over ranks) makes both of every rank's tokens: the weighted sums
    and the total weight are summed before dividing.
    Returns 0-d ``(per_sample_entropy, batch_entropy)`` (nats)."""
    n, _, d = bit_logits.shape
    reduce = all_reduce or (lambda t: t)
    log_one, log_zero = F.logsigmoid(bit_logits), F.logsigmoid(-bit_logits)
    p_one = log_one.exp()
    per_sample = -(p_one * log_one + (1 - p_one) * log_zero).sum(dim=-1)  # (N, c)
    if weights is None:
        weights = torch.ones(n, device=bit_logits.device, dtype=bit_logits.dtype)
    weights = weights.to(bit_logits.dtype)
    total = reduce(weights.sum()).clamp(min=1e-12)
    per_sample_entropy = (reduce((per_sample * weights.unsqueeze(-1)).sum(dim=0)) / total).mean()

    def half_distribution(lo: int, hi: int) -> torch.Tensor:  # (N, c, 2^(hi - lo))
        bits = bit_table(hi - lo, bit_logits.device).to(bit_logits.dtype)
        return (log_one[..., lo:hi] @ bits.t() + log_zero[..., lo:hi] @ (1 - bits).t()).exp()

    high = half_distribution(0, d // 2) * weights[:, None, None]
    low = half_distribution(d // 2, d)
    # (c, 2^d), code order high * 2^|low| + low
    average = reduce(torch.einsum("nch,ncl->chl", high, low).flatten(1)) / total
    batch_entropy = (-average * average.clamp(min=clamp).log()).sum(dim=-1).mean()
    return per_sample_entropy, batch_entropy


# ---------------------------------------------------------------------------
# distances and nearest codes


def euclidean_logits(x: torch.Tensor, codes: torch.Tensor, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Negative Euclidean distance ``-||x - c||`` (h, n, k), as the reference
    library exposes it for sampling and cross-entropy losses.  The squared distance is clamped at 1e-8 as
    1.32.0 does (1.14.17: at 0, where the square root's gradient is infinite: NaN for a row equal to a code)."""
    if scores is None:
        scores = sq_dist_scores(x, codes)
    sq = x.pow(2).sum(dim=-1, keepdim=True) + scores
    return -sq.clamp(min=1e-8).sqrt()


def nearest_codes(x: torch.Tensor, codes: torch.Tensor, use_cosine_sim: bool = False) -> torch.Tensor:
    """Index of the nearest code for every row: (h, n, d), (h, k, d) -> (h, n).

    On CUDA (float32, Triton installed) the fused kernel of :mod:`vqdeploy.search` does it: exact against
    float64, with no rows x codes matrix in memory.  Elsewhere, :func:`nearest_codes_torch`."""
    if fused_search_used(x, codes):
        return search_nearest(x, codes, use_cosine_sim)
    return nearest_codes_torch(x, codes, use_cosine_sim)


def lookup_codes(codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``gather_codes`` for lookups without a gradient to the codes (eval, export): one embedding Gather
    over the flattened codebooks instead of an expanded GatherElements."""
    h, k, d = codes.shape
    if h > 1:
        indices = indices + torch.arange(h, device=indices.device).unsqueeze(1) * k
    return F.embedding(indices, codes.reshape(h * k, d))


def gather_codes(codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Look codes up per codebook: (h, k, d), (h, n) -> (h, n, d)."""
    h, n = indices.shape
    expanded = indices.unsqueeze(-1).expand(h, n, codes.shape[-1])
    return codes.gather(1, expanded)


# ---------------------------------------------------------------------------
# masked statistics (weights instead of boolean indexing)


@torch.library.custom_op("vqdeploy::segment_sum", mutates_args=())
def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum of the rows of ``values`` (N, d) that share a segment id (N,): (num_segments, d).

    An opaque op to torch.compile on purpose: inductor's CPU backend fuses an
    index_add/scatter_add into 2D-tiled (transposing) kernels with a wrong
    stride in the store index, writing out of bounds (torch 2.13); kept whole,
    it runs as one eager index_add, which is as fast."""
    return values.new_zeros(num_segments, values.shape[1]).index_add_(0, segment_ids, values)


@segment_sum.register_fake
def _segment_sum_shape(values, segment_ids, num_segments):
    return values.new_empty(num_segments, values.shape[1])


def _segment_sum_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _segment_sum_backward(ctx, grad):
    (segment_ids,) = ctx.saved_tensors
    return grad.index_select(0, segment_ids), None, None


segment_sum.register_autograd(_segment_sum_backward, setup_context=_segment_sum_context)


def _flat_code_ids(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(h, n) codes -> (h * n,) ids of codebook h's code i at h * num_codes + i."""
    offsets = torch.arange(indices.shape[0], device=indices.device).unsqueeze(-1) * num_codes
    return (indices + offsets).reshape(-1)


def counts_per_code(indices: torch.Tensor, num_codes: int, weights: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weighted bincount per codebook: (h, n) -> (h, k), with no (n, k) one-hot."""
    h = indices.shape[0]
    values = torch.ones(indices.shape, dtype=dtype, device=indices.device) if weights is None else weights.to(dtype)
    return segment_sum(values.reshape(-1, 1), _flat_code_ids(indices, num_codes), h * num_codes).reshape(h, num_codes)


def sums_per_code(x: torch.Tensor, indices: torch.Tensor, num_codes: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the rows assigned to each code: (h, n, d), (h, n) -> (h, k, d)."""
    h, n, d = x.shape
    if weights is not None:
        x = x * weights.unsqueeze(-1)
    sums = segment_sum(x.reshape(h * n, d), _flat_code_ids(indices, num_codes), h * num_codes)
    return sums.reshape(h, num_codes, d)


def masked_mean_var(x: torch.Tensor, weights: torch.Tensor | None, all_reduce=None):
    """Per-codebook mean and biased variance over rows: (h, n, d) -> (h, 1, d) each.

    ``all_reduce`` (sum over ranks) turns this into the statistics of the
    union of every rank's rows."""
    reduce = all_reduce if all_reduce is not None else (lambda t: t)
    if weights is None:
        weights = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    w = weights.to(x.dtype).unsqueeze(-1)
    count = reduce(w.sum(dim=1, keepdim=True))
    count = count.clamp(min=1.0)
    mean = reduce((x * w).sum(dim=1, keepdim=True)) / count
    var = reduce((w * (x - mean).pow(2)).sum(dim=1, keepdim=True)) / count
    return mean, var


def masked_mse(a: torch.Tensor, b: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the kept rows of (h, n, d) tensors; dropped rows
    may hold anything, NaN included, in the value and in the gradient."""
    if weights is None:
        return F.mse_loss(a, b)
    a, b = zero_dropped_rows(a, weights), zero_dropped_rows(b, weights)
    return (a - b).pow(2).sum() / (weights.sum() * a.shape[-1]).clamp(min=1.0)


def rows_all_finite(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """True (0-d bool tensor) when every kept row is free of NaN and Inf."""
    finite_rows = torch.isfinite(x).all(dim=-1)
    if weights is not None:
        finite_rows = finite_rows | (weights <= 0)
    return finite_rows.all()


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of (h, n, k) logits against (h, n) codes, over kept rows
    with a target other than -1; dropped rows may hold NaN (value and gradient)."""
    if weights is not None:
        logits = zero_dropped_rows(logits, weights)
        targets = torch.where(weights > 0, targets, -1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


def zero_dropped_rows(x: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Zero the rows whose weight is 0, so that NaN padding cannot leak into sums."""
    if weights is None:
        return x
    return torch.where(weights.unsqueeze(-1) > 0, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------
# sampling a fixed number of rows


def sample_row_indices(weights: torch.Tensor, num: int, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """Pick ``num`` row indices per codebook: (h, n) weights -> (h, num).

    Rows with weight > 0 are drawn without replacement while there are enough
    of them (Gumbel top-k), and with replacement for the rest, so the output
    shape never depends on the data.  If a codebook has no kept row at all,
    every row is eligible.  ``uniform`` (see :func:`row_sample_noise_shape`)
    supplies the randomness."""
    h, n = weights.shape
    if uniform is None:
        uniform = torch.rand(row_sample_noise_shape(h, n, num), device=weights.device)
    keep = weights > 0
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    keys = torch.where(keep, uniform[:, :n], torch.full((), -1.0, device=weights.device))

    # with replacement: inverse CDF over the kept rows
    cdf = keep.to(torch.float32).cumsum(dim=-1)
    targets = uniform[:, n:] * cdf[:, -1:]
    with_replacement = torch.searchsorted(cdf, targets, right=True).clamp(max=n - 1)

    if n < num:
        return with_replacement
    top_keys, without_replacement = keys.topk(num, dim=-1)
    return torch.where(top_keys >= 0, without_replacement, with_replacement)


def sample_rows(x: torch.Tensor, num: int, weights: torch.Tensor | None = None,
                uniform: torch.Tensor | None = None) -> torch.Tensor:
    """``num`` rows of each codebook's batch: (h, n, d) -> (h, num, d)."""
    if weights is None:
        weights = torch.ones(x.shape[:2], device=x.device)
    return gather_codes(x, sample_row_indices(weights, num, uniform))


# ---------------------------------------------------------------------------
# k-means


def kmeans(x: torch.Tensor, num_clusters: int, num_iters: int, use_cosine_sim: bool = False,
           weights: torch.Tensor | None = None, sample_fn=None, all_reduce=None, uniform: torch.Tensor | None = None):
    """Lloyd's k-means with a fixed number of iterations: (h, n, d) -> means (h, k, d), counts (h, k).

    ``sample_fn(x, num, weights, uniform)`` picks the starting means (shared across
    ranks when distributed) and ``all_reduce`` sums counts and sums over ranks.
    Empty clusters keep their previous mean."""
    sample_fn = sample_fn if sample_fn is not None else sample_rows
    reduce = all_reduce if all_reduce is not None else (lambda t: t)
    means = sample_fn(x, num_clusters, weights, uniform)
    counts = torch.zeros(x.shape[0], num_clusters, dtype=x.dtype, device=x.device)
    for _ in range(num_iters):
        assigned = nearest_codes(x, means, use_cosine_sim)
        counts = reduce(counts_per_code(assigned, num_clusters, weights, dtype=x.dtype))
        sums = reduce(sums_per_code(x, assigned, num_clusters, weights))
        new_means = sums / counts.clamp(min=1.0).unsqueeze(-1)
        if use_cosine_sim:
            new_means = l2norm(new_means)
        means = torch.where((counts == 0).unsqueeze(-1), means, new_means)
    return means, counts


# ---------------------------------------------------------------------------
# losses


def codebook_diversity_loss(logits: torch.Tensor, temperature: float, tokens_per_sequence: int,
                            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the entropy of the code distribution (softmax of ``temperature * logits``), averaged over the batch
    (and heads) at each position of the sequence, then over positions, as vector-quantize-pytorch 1.32.0 does;
    minimising it spreads the batch over the codebook.  logits: (h, rows, k), rows = (b, [heads,] n);
    weights: (h, rows), 0 leaves a token out (positions without any token are left out too)."""
    h, rows, k = logits.shape
    prob = (logits * temperature).softmax(dim=-1).reshape(h, -1, tokens_per_sequence, k)
    if weights is None:
        average = prob.mean(dim=(0, 1))
        kept = torch.ones(tokens_per_sequence, device=logits.device)
    else:
        weights = weights.reshape(h, -1, tokens_per_sequence, 1).to(prob.dtype)
        total = weights.sum(dim=(0, 1))
        average = (prob * weights).sum(dim=(0, 1)) / total.clamp(min=1e-12)
        kept = (total[:, 0] > 0).to(prob.dtype)
    entropy = -(average * safe_log(average, eps=1e-5)).sum(dim=-1)
    return -(entropy * kept).sum() / kept.sum().clamp(min=1.0)


def orthogonal_loss(codes: torch.Tensor, code_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared cosine similarity between codes, minus its floor
    (eq. 2 of https://arxiv.org/abs/2112.00384): (h, k, d) -> scalar.

    ``code_weights`` (h, k) of 0/1 restricts the loss to a subset of codes
    with a static shape; each head is normalised by its own subset size and
    the heads are averaged."""
    h, k = codes.shape[:2]
    normed = l2norm(codes)
    cosine_sim = torch.bmm(normed, normed.transpose(1, 2))
    if code_weights is None:
        return cosine_sim.pow(2).sum() / (h * k ** 2) - 1.0 / k
    w = code_weights.to(cosine_sim.dtype)
    pair_weights = w.unsqueeze(-1) * w.unsqueeze(-2)
    n = w.sum(dim=-1).clamp(min=1.0)
    return ((cosine_sim.pow(2) * pair_weights).sum(dim=(-1, -2)) / n.pow(2)).mean() - (1.0 / n).mean()


# ---------------------------------------------------------------------------
# code selection: gumbel sampling and straight-through relaxations


def sample_codes(logits: torch.Tensor, temperature: float, uniform: torch.Tensor) -> torch.Tensor:
    """Gumbel-max sampling of codes at ``temperature``: (h, n, k) -> (h, n)."""
    return (logits / temperature + gumbel_noise(uniform)).argmax(dim=-1)


def straight_through_weights(logits: torch.Tensor, indices: torch.Tensor, temperature: float,
                             reinmax: bool = False) -> torch.Tensor:
    """Soft code weights whose value is zero and whose gradient is that of the
    straight-through Gumbel-softmax (or ReinMax, https://arxiv.org/abs/2304.08612,
    algorithm 2).  Add ``weights @ codes`` to the hard lookup: (h, n, k)."""
    if not reinmax:
        soft = (logits / temperature).softmax(dim=-1)
        return soft - soft.detach()
    pi0 = logits.softmax(dim=-1)
    half_soft = (logits / temperature).softmax(dim=-1) * 0.5
    pi1 = half_soft.scatter_add(-1, indices.unsqueeze(-1), torch.full_like(half_soft[..., :1], 0.5))
    pi1 = ((safe_log(pi1) - logits).detach() + logits).softmax(dim=-1)
    pi2 = 2 * pi1 - 0.5 * pi0
    return pi2 - pi2.detach()
