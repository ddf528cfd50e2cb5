"""Codebook state and its training update (EMA, k-means init, dead codes, affine).

Buffer names follow vector-quantize-pytorch 1.14.17 (``embed``, ``embed_avg``,
``cluster_size``, ``initted``, the affine statistics) so its checkpoints load.
Each training-only state change lives in a method with a trailing underscore,
computes its new values out of place and writes them with ``copy_``, guarded by
``torch.where`` so that a step with NaN/Inf data leaves the codebook untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from . import distributed as D
from .primitives import (cosine_logits, counts_per_code, draw_uniform, ema, euclidean_logits, gather_codes, gumbel_noise,
                         kmeans, l2norm, laplace_smoothing, lookup_codes, masked_mean_var, nearest_codes,
                         row_sample_noise_shape, rows_all_finite, sample_codes, sample_rows, snapshot, sq_dist_scores,
                         straight_through_weights, sums_per_code, zero_dropped_rows)
from .state import OptionalStateMixin, flag


class CodebookOutput(NamedTuple):
    quantized: torch.Tensor  # (h, n, d) float32
    indices: torch.Tensor  # (h, n) int64
    logits: torch.Tensor | None  # (h, n, k): -distance or cosine similarity, when asked for or sampled from


def _in_float32(method):
    """Run a codebook entry on float32 rows (x, the first argument) with autocast off."""
    @functools.wraps(method)
    def entry(self, x: torch.Tensor, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return method(self, x.float(), *args, **kwargs)
    return entry


def _uniform_init(*shape: int) -> torch.Tensor:
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t)
    return t


@dataclass(frozen=True)
class CodebookConfig:
    """Every option of a codebook, in one value: quantizers build it from their
    arguments, residual and grouped wrappers copy it with ``dataclasses.replace``."""

    dim: int
    codebook_size: int
    num_codebooks: int = 1
    use_cosine_sim: bool = False
    kmeans_init: bool = False
    kmeans_iters: int = 10
    sync_kmeans: bool = True
    decay: float = 0.8
    eps: float = 1e-5
    threshold_ema_dead_code: float = 2
    reset_cluster_size: float | None = None
    use_ddp: bool = False
    learnable_codebook: bool = False
    sample_codebook_temp: float = 1.0
    ema_update: bool = True
    affine_param: bool = False
    sync_affine_param: bool = False
    affine_param_batch_decay: float = 0.99
    affine_param_codebook_decay: float = 0.9
    stochastic_sample_codes: bool = False
    straight_through: bool = False
    reinmax: bool = False
    initial_cluster_size: float = 0.0  # the EMA count of every code of a new codebook (1 since 1.15.3)
    manual_ema_update: bool = False  # track counts and sums, but recompute the codes only in update_ema()
    codes_from_kmeans_state: bool = False  # after k-means, codes = sums / smoothed counts (1.32.0), not the means
    dead_codes_without_ema: bool = False  # ema_update=False still tracks counts and replaces dead codes (1.32.0)

    def __post_init__(self):
        if self.affine_param and self.use_cosine_sim:
            raise ValueError("affine_param is only compatible with the Euclidean codebook (use_cosine_sim=False)")
        if self.reinmax and not self.straight_through:
            raise ValueError("reinmax=True needs straight_through=True")

    @property
    def reset_value(self) -> float:
        """The EMA count a replaced dead code restarts from."""
        return self.threshold_ema_dead_code if self.reset_cluster_size is None else self.reset_cluster_size

    @property
    def syncs_kmeans(self) -> bool:
        return self.use_ddp and self.sync_kmeans


@dataclass(frozen=True)
class StepOptions:
    """The per-call options of one step, built once by the quantizer's forward and handed down to the codebook
    and its EMA update; fixed at trace time like the configuration.

    ema_update_weight: scales the EMA step per code (a number, an (h, k) tensor, or a callable of the
    batch's sums and counts); accum_ema_update: only add this batch's statistics to those waiting for the
    next EMA step (gradient accumulation: k such calls and one plain call make one step on all k + 1);
    topk: the ``topk`` best codes of every row, best first (indices (h, n, topk), codes (h, n, topk, d)),
    and no EMA step (beam search updates the codebook with the codes it keeps, ``update_from_indices_``);
    ema_update=False: this call recomputes no codes (counts and sums are still tracked for dead codes);
    codebook_transform_fn: maps the codes (h, k, d) to each row's own codes (h, b, n, k, d), the implicit
    neural codebook (QINCo) of 1.32.0's ResidualVQ; rows are then matched against their own codes."""

    sample_codebook_temp: float | None = None  # None: the codebook's own
    freeze_codebook: bool = False
    ema_update_weight: Any = None
    accum_ema_update: bool = False
    topk: int | None = None
    ema_update: bool | None = None  # None: the codebook's own
    codebook_transform_fn: Callable | None = None


_FLAGS = ("initted", "batch_stats_need_init", "codebook_mean_needs_init", "codebook_variance_needs_init")


class Codebook(OptionalStateMixin):
    """``num_codebooks`` codebooks of ``codebook_size`` codes of size ``dim``,
    matched by Euclidean distance or cosine similarity; the input is (num_codebooks, n, dim)."""

    _optional_state = ("skipped_updates", "batch_stats_need_init", "batch_mean", "batch_variance")

    def __init__(self, config: CodebookConfig, vq_bridge: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vq_bridge = vq_bridge  # a learned transform of the codes (FVQ, 1.27.21): codes = vq_bridge(embed)
        dim, codebook_size, num_codebooks = config.dim, config.codebook_size, config.num_codebooks
        kmeans_init = config.kmeans_init

        if kmeans_init:
            embed = torch.zeros(num_codebooks, codebook_size, dim)
        else:
            embed = _uniform_init(num_codebooks, codebook_size, dim)
            if config.use_cosine_sim:
                embed = l2norm(embed)

        self.register_buffer("initted", flag(not kmeans_init))
        self._kmeans_pending = kmeans_init
        self.register_buffer("cluster_size", torch.full((num_codebooks, codebook_size), config.initial_cluster_size))
        self.register_buffer("embed_avg", embed.clone())
        if config.learnable_codebook:
            self.embed = nn.Parameter(embed)
        else:
            self.register_buffer("embed", embed)
        # vqdeploy's own: how many training steps skipped their update because of NaN/Inf data
        self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        if self.tracks_counts:  # statistics of micro-batches waiting for one EMA step (accum_ema_update)
            self.register_buffer("accumulated_counts", torch.zeros(num_codebooks, codebook_size), persistent=False)
            self.register_buffer("accumulated_sums", torch.zeros(num_codebooks, codebook_size, dim), persistent=False)

        if config.affine_param:
            stat_shape = (num_codebooks, 1, dim)
            self.register_buffer("batch_mean", torch.zeros(stat_shape))
            self.register_buffer("batch_variance", torch.ones(stat_shape))
            self.register_buffer("batch_stats_need_init", flag(True))
            self.register_buffer("codebook_mean_needs_init", flag(True))
            self.register_buffer("codebook_mean", torch.zeros(stat_shape))
            self.register_buffer("codebook_variance_needs_init", flag(True))
            self.register_buffer("codebook_variance", torch.ones(stat_shape))

    # ------------------------------------------------------------------ loading

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_kmeans_pending()

    def _adapt_state_dict(self, state_dict: dict, prefix: str) -> None:
        # since 1.27.0 the reference saves its flags as 0-d bools; ours are its older one-element floats
        for name in _FLAGS:
            value = state_dict.get(prefix + name)
            if isinstance(value, torch.Tensor) and value.ndim == 0:
                state_dict[prefix + name] = value.reshape(1).to(torch.float32)
        # the reference registers batch statistics lazily: their presence means they are initialised
        flag_key = prefix + "batch_stats_need_init"
        if self.config.affine_param and prefix + "batch_mean" in state_dict and flag_key not in state_dict:
            state_dict[flag_key] = flag(False)

    # ------------------------------------------------------------------ helpers

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return l2norm(x) if self.config.use_cosine_sim else x

    def _sample(self, x, num, weights, uniform):
        sample_fn = D.sample_rows_synced if self.config.use_ddp else sample_rows
        return sample_fn(x, num, weights, uniform)

    def noise_shapes(self, num_rows: int, temperature: float | None = None) -> dict:
        """Shapes of the uniform noise one training step consumes for ``num_rows`` rows per codebook."""
        temperature = self.config.sample_codebook_temp if temperature is None else temperature
        h, k = self.config.num_codebooks, self.config.codebook_size
        shapes = {}
        if self.config.kmeans_init:
            shapes["kmeans"] = row_sample_noise_shape(h, num_rows, k)
        if self.tracks_counts and self.config.threshold_ema_dead_code > 0:
            shapes["expire"] = row_sample_noise_shape(h, num_rows, k)
        if self.config.stochastic_sample_codes and temperature > 0:
            shapes["gumbel"] = (h, num_rows, k)
        return shapes

    def _stds(self):
        codebook_std = self.codebook_variance.clamp(min=1e-5).sqrt()
        batch_std = self.batch_variance.clamp(min=1e-5).sqrt()
        return codebook_std, batch_std

    def codes_for_matching(self) -> torch.Tensor:
        """The codes the input is matched against: ``embed``, moved to the batch
        statistics when affine reparameterisation is on (https://arxiv.org/abs/2305.08842)."""
        embed = self.embed if self.config.learnable_codebook else self.embed.detach()
        embed = embed.float()
        if self.vq_bridge is not None:
            embed = self.vq_bridge(embed)
        if not self.config.affine_param:
            return embed
        codebook_std, batch_std = self._stds()
        return (embed - self.codebook_mean) * (batch_std / codebook_std) + self.batch_mean

    def output_codes(self) -> torch.Tensor:
        """The codes indices decode to (h, k, d): ``embed``, through ``vq_bridge`` when there is one."""
        return self.embed if self.vq_bridge is None else self.vq_bridge(self.embed)

    # ------------------------------------------------------------------ eval

    def quantize(self, x: torch.Tensor) -> CodebookOutput:
        """Nearest code per row (h, n, d) -> (h, n) and the code itself, no state change (the eval forward)."""
        codes = self.codes_for_matching().detach()
        indices = nearest_codes(x.float(), codes, self.config.use_cosine_sim)
        return CodebookOutput(lookup_codes(codes, indices), indices, None)

    # ------------------------------------------------------------------ forward

    @_in_float32
    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None, noise: dict | None = None,
                return_logits: bool = False, options: StepOptions = StepOptions(), **changes) -> CodebookOutput:
        """x: (h, n, d); weights: (h, n) with 0 for rows to ignore (padding);
        noise: the uniform tensors named by :meth:`noise_shapes` (drawn here when None); options: the step's
        ``StepOptions`` (``changes`` replace some of them, for direct calls)."""
        if changes:
            options = dataclasses.replace(options, **changes)
        temperature = self.config.sample_codebook_temp if options.sample_codebook_temp is None \
            else options.sample_codebook_temp
        if self.training:
            if noise is None:
                noise = draw_uniform(self.noise_shapes(x.shape[1], temperature), x.device)
            clean, update_ok = self._guard(x, weights)
            if self.config.kmeans_init:
                self.init_codebook_(clean, weights, update_ok, noise["kmeans"])
            if self.config.affine_param:
                self.update_affine_(clean, weights, update_ok)

        codes = self.codes_for_matching()
        if self.training:
            codes = snapshot(codes)  # the updates below overwrite what codes was read from
        samples = self.config.stochastic_sample_codes or self.config.straight_through
        sampling = self.training and samples and temperature > 0
        logits = None
        if options.topk is not None:
            return self._top_codes(x, codes, options.topk, temperature if sampling else 0.0, noise, return_logits)
        if options.codebook_transform_fn is not None:
            quantized, indices, logits = self._match_own_codes(
                x, options.codebook_transform_fn(codes), temperature if sampling else 0.0, noise)
        else:
            if not (return_logits or sampling):  # indices alone: matched block by block (large codebooks)
                indices = nearest_codes(x, codes, self.config.use_cosine_sim)
            elif self.config.use_cosine_sim:
                logits = cosine_logits(x, codes)
                indices = logits.argmax(dim=-1)
            else:
                scores = sq_dist_scores(x, codes)
                indices = scores.argmin(dim=-1)
                logits = euclidean_logits(x, codes, scores)
            if self.training and self.config.stochastic_sample_codes and temperature > 0:
                indices = sample_codes(logits, temperature, noise["gumbel"])

            quantized = gather_codes(codes, indices)
            if self.training and self.config.straight_through and temperature > 0:
                soft = straight_through_weights(logits, indices, temperature, self.config.reinmax)
                quantized = quantized + torch.bmm(soft, codes)

        tracks = self._recomputes_codes(options) or (self.tracks_counts and self.config.threshold_ema_dead_code > 0)
        if self.training and tracks and not options.freeze_codebook:
            self._learn_from_(clean, indices, weights, update_ok, noise.get("expire"), options)
        return CodebookOutput(quantized, indices, logits if return_logits else None)

    def _match_own_codes(self, x: torch.Tensor, own_codes: torch.Tensor, temperature: float, noise: dict | None):
        """Rows x (h, n, d) against their own codes (h, b, n', k, d) with b * n' = n: (codes, indices, logits).
        Distances as 1.32.0 takes them (``F.pairwise_distance``: the norm of the difference plus 1e-6)."""
        h, n, d = x.shape
        own_codes = own_codes.reshape(h, n, -1, d)
        if self.config.use_cosine_sim:
            own_codes = l2norm(own_codes)
            logits = torch.einsum("hnd,hnkd->hnk", x, own_codes)
        else:
            logits = -(x.unsqueeze(-2) - own_codes + 1e-6).norm(dim=-1)
        indices = logits.argmax(dim=-1) if temperature <= 0 else sample_codes(logits, temperature, noise["gumbel"])
        chosen = own_codes.gather(2, indices[..., None, None].expand(h, n, 1, d)).squeeze(2)
        return chosen, indices, logits

    @_in_float32
    def quantize_own_codes(self, x: torch.Tensor, codebook_transform_fn) -> CodebookOutput:
        """``quantize`` against each row's own codes (an implicit neural codebook), no state change."""
        codes = codebook_transform_fn(self.codes_for_matching().detach())
        quantized, indices, _ = self._match_own_codes(x, codes, 0.0, None)
        return CodebookOutput(quantized, indices, None)

    @_in_float32
    def top_codes(self, x: torch.Tensor, topk: int) -> CodebookOutput:
        """The ``topk`` nearest codes of rows (h, n, d), best first, no state change (eval)."""
        return self._top_codes(x, self.codes_for_matching().detach(), topk, 0.0, None, False)

    @property
    def tracks_counts(self) -> bool:
        """Whether a training step updates the code counts: with the EMA, or for dead-code replacement alone."""
        return self.config.ema_update or (self.config.dead_codes_without_ema and self.config.threshold_ema_dead_code > 0)

    def _logits(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return cosine_logits(x, codes) if self.config.use_cosine_sim else euclidean_logits(x, codes)

    def _top_codes(self, x, codes, topk: int, temperature: float, noise: dict | None,
                   return_logits: bool) -> CodebookOutput:
        """The ``topk`` largest logits per row (Gumbel-perturbed when sampling), as 1.32.0's ``topk``."""
        logits = self._logits(x, codes)
        ranked = logits if temperature <= 0 else logits / temperature + gumbel_noise(noise["gumbel"])
        indices = ranked.topk(topk, dim=-1).indices
        h, n, _ = indices.shape
        quantized = gather_codes(codes, indices.reshape(h, n * topk)).reshape(h, n, topk, codes.shape[-1])
        return CodebookOutput(quantized, indices, logits if return_logits else None)

    @_in_float32
    def update_from_indices_(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None = None,
                             count_skipped: bool = True) -> None:
        """The EMA step (and dead-code replacement) for rows x (h, n, d) assigned to ``indices`` (h, n), as a
        training forward would make it (1.32.0's ``update_indices``); -1 marks rows to leave out."""
        if not self.tracks_counts:
            return
        kept = (indices >= 0).float()
        weights = kept if weights is None else weights * kept
        uniform = self.dead_code_noise(x.shape[1], x.device)
        clean, update_ok = self._guard(x, weights, count_skipped)
        self._learn_from_(clean, indices.clamp(min=0), weights, update_ok, uniform)

    def dead_code_noise(self, num_rows: int, device) -> torch.Tensor | None:
        """The uniform noise that picks replacement rows for dead codes among ``num_rows`` rows (None without
        dead-code replacement), for updates made outside ``forward``'s single draw."""
        if self.config.threshold_ema_dead_code <= 0:
            return None
        shape = row_sample_noise_shape(self.config.num_codebooks, num_rows, self.config.codebook_size)
        return draw_uniform({"expire": shape}, device)["expire"]

    def _recomputes_codes(self, options: StepOptions) -> bool:
        """Whether this step's EMA update recomputes the codes (``ema_update=False``: only counts and sums)."""
        return self.config.ema_update if options.ema_update is None else options.ema_update

    def _learn_from_(self, clean: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None,
                     update_ok: torch.Tensor, uniform: torch.Tensor | None, options: StepOptions = StepOptions()) -> None:
        """``update_ema_`` of clean rows assigned to ``indices``: their sums taken in codebook space (undoing the
        affine reparameterisation's batch statistics), dead codes replaced by the rows as they are."""
        in_codebook_space = clean
        if self.config.affine_param:
            codebook_std, batch_std = self._stds()
            in_codebook_space = (clean - self.batch_mean) * (codebook_std / batch_std) + self.codebook_mean
        self.update_ema_(in_codebook_space, indices, weights, update_ok, clean, uniform, options)

    # ------------------------------------------------------------------ training-only state changes

    def _guard(self, x: torch.Tensor, weights: torch.Tensor | None, count_skipped: bool = True):
        """The preamble of every state change: (the rows x, zeroed where dropped and wholly when the batch is not
        finite, update_ok: a 0-d bool agreed by every synchronised rank).

        A batch with NaN/Inf in a kept row must not reach the codebook: its
        update is skipped and counted in ``skipped_updates`` (once per step:
        ``count_skipped=False`` for a second look at the same step's rows).  A
        batch with no kept row at all (every token masked) carries nothing to
        learn from, and its update is skipped too."""
        all_ranks = D.all_ranks if self.config.use_ddp else (lambda t: t)
        any_rank = D.any_rank if self.config.use_ddp else (lambda t: t)
        data_ok = all_ranks(rows_all_finite(x, weights))
        if count_skipped:
            with torch.no_grad():
                self.skipped_updates.add_((~data_ok).long())
        update_ok = data_ok if weights is None else data_ok & any_rank((weights > 0).any())
        return zero_dropped_rows(torch.where(data_ok, x, torch.zeros((), device=x.device)), weights), update_ok

    def _write_(self, update_ok: torch.Tensor, **new_values: torch.Tensor) -> None:
        """Copy new values into the named buffers, or keep the old ones when ``update_ok`` is False."""
        with torch.no_grad():
            for name, value in new_values.items():
                buffer = getattr(self, name)
                buffer.copy_(torch.where(update_ok, value, buffer))

    def _kmeans_branch(self, x, weights, uniform, embed, embed_avg, cluster_size, initted):
        reduce = D.all_reduce_sum if self.config.syncs_kmeans else None
        sample_fn = D.sample_rows_synced if self.config.syncs_kmeans else sample_rows
        means, counts = kmeans(x, self.config.codebook_size, self.config.kmeans_iters, self.config.use_cosine_sim,
                               weights, sample_fn=sample_fn, all_reduce=reduce, uniform=uniform)
        sums = means * counts.unsqueeze(-1)
        codes = self.codes_from(counts, sums) if self.config.codes_from_kmeans_state else means
        return codes, sums, counts, torch.ones_like(initted)

    @staticmethod
    def _keep_branch(x, weights, uniform, embed, embed_avg, cluster_size, initted):
        return embed.clone(), embed_avg.clone(), cluster_size.clone(), initted.clone()

    def init_codebook_(self, x: torch.Tensor, weights: torch.Tensor | None, update_ok: torch.Tensor,
                       uniform: torch.Tensor) -> None:
        """k-means on the first clean training batch; ``torch.cond`` keeps it out of later steps.

        Inductor reads a cond's predicate on the host, so once the codebook is
        known to be initialised (a loaded checkpoint, an eager step, a call of
        ``train()``/``eval()``) the Python flag ``_kmeans_pending`` drops the
        cond from the graph (one recompile)."""
        if not self._kmeans_pending:
            return
        if weights is None:
            weights = torch.ones(x.shape[:2], device=x.device)
        needs_init = (self.initted == 0).all() & update_ok
        state = (self.embed.detach(), self.embed_avg, self.cluster_size, self.initted)
        operands = tuple(snapshot(t) for t in (x.detach(), weights, uniform, *state))
        if torch.compiler.is_compiling():
            new = torch.cond(needs_init, self._kmeans_branch, self._keep_branch, operands)
        elif bool(needs_init):
            new = self._kmeans_branch(*operands)
        else:
            new = None
        if new is not None:  # the cond already kept the old values when the batch was not ok
            with torch.no_grad():
                for buffer, value in zip(state, new):
                    buffer.copy_(value)
        if not torch.compiler.is_compiling():
            self._sync_kmeans_pending()

    def train(self, mode: bool = True):
        # a mode switch is a rare, eager moment: a good time to learn whether k-means already ran
        super().train(mode)
        self._sync_kmeans_pending()
        return self

    def _sync_kmeans_pending(self) -> None:
        self._kmeans_pending = self.config.kmeans_init and not bool((self.initted != 0).all())

    def update_affine_(self, x: torch.Tensor, weights: torch.Tensor | None, update_ok: torch.Tensor) -> None:
        """EMA of the codebook's and the batch's mean and variance (first value taken as is)."""
        embed = self.embed.detach()
        code_mean = embed.mean(dim=1, keepdim=True)
        code_var = embed.var(dim=1, keepdim=True, unbiased=False)
        reduce = D.all_reduce_sum if self.config.sync_affine_param else None
        batch_mean, batch_var = masked_mean_var(x, weights, reduce)

        def decayed(old, new, needs_init, decay):
            return torch.where(needs_init > 0, new, old * decay + new * (1 - decay))

        cb_decay, b_decay = self.config.affine_param_codebook_decay, self.config.affine_param_batch_decay
        self._write_(
            update_ok,
            codebook_mean=decayed(self.codebook_mean, code_mean, self.codebook_mean_needs_init, cb_decay),
            codebook_variance=decayed(self.codebook_variance, code_var, self.codebook_variance_needs_init, cb_decay),
            batch_mean=decayed(self.batch_mean, batch_mean, self.batch_stats_need_init, b_decay),
            batch_variance=decayed(self.batch_variance, batch_var, self.batch_stats_need_init, b_decay),
            codebook_mean_needs_init=torch.zeros_like(self.codebook_mean_needs_init),
            codebook_variance_needs_init=torch.zeros_like(self.codebook_variance_needs_init),
            batch_stats_need_init=torch.zeros_like(self.batch_stats_need_init),
        )

    def update_ema_(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor | None,
                    update_ok: torch.Tensor, batch_rows: torch.Tensor, uniform: torch.Tensor | None,
                    options: StepOptions = StepOptions()) -> None:
        """The EMA step (with the statistics accumulated since the last one), then dead-code replacement,
        written to the buffers once; or, with ``accum_ema_update``, only the accumulation."""
        counts = counts_per_code(indices, self.config.codebook_size, weights)
        sums = sums_per_code(x, indices, self.config.codebook_size, weights)
        if self.config.use_ddp:
            counts, sums = D.all_reduce_sum(counts), D.all_reduce_sum(sums)
        if options.accum_ema_update:
            self._write_(update_ok, accumulated_counts=self.accumulated_counts + counts,
                         accumulated_sums=self.accumulated_sums + sums)
            return
        counts, sums = counts + self.accumulated_counts, sums + self.accumulated_sums
        weight = options.ema_update_weight
        new = self.ema_values(counts, sums, weight(sums, counts) if callable(weight) else weight)
        if not self._recomputes_codes(options):
            new.pop("embed", None)
        if self.config.threshold_ema_dead_code > 0:
            new = self.replace_dead_codes(new, batch_rows, weights, uniform)
        self._write_(update_ok, **new, accumulated_counts=torch.zeros_like(counts),
                     accumulated_sums=torch.zeros_like(sums))

    def ema_values(self, counts: torch.Tensor, sums: torch.Tensor, weight=None) -> dict:
        """EMA of per-code counts and sums (summed over ranks); codes = sums / smoothed counts (kept as they are
        with ``manual_ema_update``, until ``update_ema``)."""
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=counts.dtype, device=counts.device).expand_as(counts)
        cluster_size = ema(self.cluster_size, counts, self.config.decay, weight)
        embed_avg = ema(self.embed_avg, sums, self.config.decay, weight)
        if self.config.manual_ema_update or not self.config.ema_update:  # codes learned otherwise, or later
            return dict(cluster_size=cluster_size, embed_avg=embed_avg)
        return dict(cluster_size=cluster_size, embed_avg=embed_avg, embed=self.codes_from(cluster_size, embed_avg))

    def codes_from(self, cluster_size: torch.Tensor, embed_avg: torch.Tensor) -> torch.Tensor:
        """The codes an EMA state gives: sums over Laplace-smoothed counts (unit length for cosine)."""
        smoothed = laplace_smoothing(cluster_size, self.config.codebook_size, self.config.eps)
        embed = embed_avg / smoothed.unsqueeze(-1)
        return l2norm(embed) if self.config.use_cosine_sim else embed

    def end_of_shared_step_(self, x: torch.Tensor, weights: torch.Tensor | None,
                            uniform: torch.Tensor | None) -> None:
        """A shared codebook with ``manual_ema_update`` after every layer has tracked its statistics (1.32.0's
        ResidualVQ): recompute the codes, then replace codes still dead by rows of any layer.  x: (h, n, d),
        every layer's rows; weights: (h, n), 0 for padding and dropped layers."""
        clean, update_ok = self._guard(x, weights, count_skipped=False)  # the layers counted the step
        new = dict(embed=self.codes_from(self.cluster_size, self.embed_avg))
        if self.config.threshold_ema_dead_code > 0:
            new = self.replace_dead_codes(dict(new, embed_avg=self.embed_avg, cluster_size=self.cluster_size), clean,
                                          weights, uniform)
        self._write_(update_ok, **new)

    @_in_float32
    def expire_codes_(self, x: torch.Tensor) -> None:
        """Replace the codes whose count is under the threshold with rows of x (h, n, d), now (1.32.0's
        ``expire_codes_``); non-finite rows are never used."""
        if self.config.threshold_ema_dead_code <= 0:
            return
        clean, update_ok = self._guard(x, None, count_skipped=False)
        new = dict(embed_avg=self.embed_avg, cluster_size=self.cluster_size)
        self._write_(update_ok, **self.replace_dead_codes(new, clean, None, self.dead_code_noise(x.shape[1], x.device)))

    def update_ema(self) -> None:
        """Recompute the codes from the EMA counts and sums: with ``manual_ema_update``, when the program chooses
        (after every layer of a shared codebook has run, or after several steps)."""
        with torch.no_grad():
            self.embed.copy_(self.codes_from(self.cluster_size, self.embed_avg))

    def replace_dead_codes(self, new: dict, batch_rows: torch.Tensor, weights: torch.Tensor | None,
                           uniform: torch.Tensor | None) -> dict:
        """Codes whose EMA count fell under the threshold become rows of this
        batch (SoundStream).  Applied to the EMA's result, so the EMA cannot
        overwrite them (EnCodec's bug); a fixed-size sample and ``torch.where``
        keep the shapes static.  Cosine codebooks get unit rows already."""
        expired = new["cluster_size"] < self.config.threshold_ema_dead_code
        sampled = self._sample(batch_rows, self.config.codebook_size, weights, uniform)
        reset = self.config.reset_value
        return dict(
            embed=torch.where(expired.unsqueeze(-1), sampled, new.get("embed", self.embed.detach())),
            embed_avg=torch.where(expired.unsqueeze(-1), sampled * reset, new["embed_avg"]),
            cluster_size=torch.where(expired, torch.full_like(new["cluster_size"], float(reset)), new["cluster_size"]),
        )
