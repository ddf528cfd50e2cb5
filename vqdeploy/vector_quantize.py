"""VectorQuantize: the API of vector-quantize-pytorch 1.14.17 and its additions up to 1.32.0, as one static graph.

Shapes, argument names and checkpoint keys follow the reference library (defaults: defaults.py);
the training update is graph-friendly (see codebooks.py), so the whole module,
training included, compiles with ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .checks import number, positive_int
from .config import records_config
from . import distributed as D
from .codebooks import Codebook, StepOptions
from .defaults import release_for
from .token_layout import check_index_range, check_indices_dtype, lens_to_mask, to_tokens
from .primitives import (codebook_diversity_loss, counts_per_code, directional_reparam, draw_uniform, gather_codes,
                         masked_cross_entropy, masked_mse, normal_from_uniform, orthogonal_loss, rotate_to)
from .returns import QuantizeLossOutput, QuantizeOutput
from .vq_arguments import checked_arguments, codebook_config


class VQLossBreakdown(NamedTuple):
    """The unweighted terms of a training loss (``forward(..., return_loss_breakdown=True)``); zeros in eval."""

    commitment: torch.Tensor
    codebook_diversity: torch.Tensor
    orthogonal_reg: torch.Tensor
    inplace_optimize: torch.Tensor


class QuantizeOutputWithBreakdown(NamedTuple):
    """``forward(..., return_loss_breakdown=True)``: the reference's flat 4-tuple."""

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    breakdown: VQLossBreakdown


def _restore_candidates(layout, candidates: torch.Tensor) -> torch.Tensor:
    """(b, n, k, d) -> the user's layout with the k candidates before the features (channel-last) or last
    (channel-first: (b, d, *spatial, k)), as 1.32.0 returns ``topk`` codes."""
    b, _, k, d = candidates.shape
    if layout.kind == "vector":
        return candidates.reshape(b, k, d)
    if layout.kind in ("sequence", "channel_last_map"):
        return candidates.reshape(b, *layout.spatial, k, d)
    return candidates.permute(0, 3, 1, 2).reshape(b, d, *layout.spatial, k)


# constructor arguments kept as attributes as they are (after checked_arguments)
_PLAIN_ATTRIBUTES = (
    "dim", "heads", "separate_codebook_per_head", "codebook_size", "codebook_dim", "eps", "freeze_codebook",
    "directional_reparam", "directional_reparam_variance", "commitment_weight", "commitment_use_cross_entropy_loss",
    "learnable_codebook", "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes",
    "sync_update_v", "accept_3d_fmap", "channel_last", "route_gradients_to_input", "codebook_diversity_loss_weight",
    "codebook_diversity_temperature", "rotation_trick", "masked_indices_are_minus_one", "scalar_loss",
    "feature_map_codes_channel_first", "return_zeros_for_masked_padding", "sync_codebook",
)


@records_config
class VectorQuantize(nn.Module):
    """Vector quantization with EMA codebooks (VQ-VAE, SoundStream, Improved VQGAN tricks)."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        heads: int = 1,
        separate_codebook_per_head: bool = False,
        decay: float = 0.8,
        eps: float = 1e-5,
        freeze_codebook: bool = False,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        sync_kmeans: bool = True,
        use_cosine_sim: bool = False,
        threshold_ema_dead_code: float = 0,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        commitment_weight: float = 1.0,
        commitment_use_cross_entropy_loss: bool = False,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: int | None = None,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 1.0,
        straight_through: bool = False,
        reinmax: bool = False,
        sync_codebook: bool | None = None,
        sync_affine_param: bool = False,
        ema_update: bool | None = None,
        learnable_codebook: bool | None = None,
        in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        affine_param: bool = False,
        affine_param_batch_decay: float = 0.99,
        affine_param_codebook_decay: float = 0.9,
        sync_update_v: float = 0.0,
        rotation_trick: bool | None = None,
        return_zeros_for_masked_padding: bool | None = None,
        layernorm_after_project_in: bool = False,
        accept_3d_fmap: bool = False,
        codebook_diversity_loss_weight: float = 0.0,
        codebook_diversity_temperature: float = 100.0,
        manual_ema_update: bool = False,
        route_gradients_to_input: bool = True,
        manual_in_place_optimizer_update: bool = False,
        vq_bridge: nn.Module | None = None,
        directional_reparam: bool = False,
        directional_reparam_variance: float = 5e-3,
        defaults: str | None = None,
    ):
        super().__init__()
        args = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        self.defaults_release = release = release_for(defaults)
        a = checked_arguments(args, release)
        for name in _PLAIN_ATTRIBUTES:
            setattr(self, name, a[name])
        codebook_input_dim = self.codebook_dim * heads
        self.has_projections = codebook_input_dim != dim
        self.project_in = nn.Linear(dim, codebook_input_dim) if self.has_projections else nn.Identity()
        if self.has_projections and layernorm_after_project_in:  # the reference's keys: project_in.0, project_in.1
            self.project_in = nn.Sequential(self.project_in, nn.LayerNorm(codebook_input_dim))
        self.project_out = nn.Linear(codebook_input_dim, dim) if self.has_projections else nn.Identity()
        self.has_codebook_orthogonal_loss = orthogonal_reg_weight > 0
        self.accept_image_fmap = accept_image_fmap or accept_3d_fmap  # channels first, any number of axes
        self._codebook = Codebook(codebook_config(a, release), vq_bridge)
        self.in_place_codebook_optimizer = (
            in_place_codebook_optimizer(self._codebook.parameters()) if in_place_codebook_optimizer is not None else None
        )
        self.manual_in_place_optimizer_update = bool(manual_in_place_optimizer_update)

    # ------------------------------------------------------------------ codebook access

    @property
    def codebook(self) -> torch.Tensor:
        """(codebook_size, codebook_dim), or (heads, codebook_size, codebook_dim) with separate codebooks."""
        embed = self._codebook.embed
        return embed if self.separate_codebook_per_head else embed[0]

    @codebook.setter
    def codebook(self, codes: torch.Tensor) -> None:
        expected = tuple(self._codebook.embed.shape[1:] if not self.separate_codebook_per_head
                         else self._codebook.embed.shape)
        if tuple(codes.shape) != expected:
            raise ValueError(f"codebook must have shape {expected}, got {tuple(codes.shape)}")
        if not self.separate_codebook_per_head:
            codes = codes.unsqueeze(0)
        with torch.no_grad():
            self._codebook.embed.copy_(codes)

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes for ``indices`` (b, ...) or (b, ..., heads), before ``project_out``: (b, ..., heads *
        codebook_dim), channel-first with ``channel_last=False`` and, under 1.32.0's defaults, for feature maps."""
        codes = self.lookup(indices)
        return codes.movedim(-1, 1) if self._codes_channel_first else codes

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """``get_codes_from_indices`` followed by ``project_out`` (in the layout ``get_codes_from_indices``
        gives; the projection is applied before the channels move)."""
        out = self.project_out(self.lookup(indices))
        return out.movedim(-1, 1) if self._codes_channel_first else out

    @property
    def _codes_channel_first(self) -> bool:
        return not self.channel_last or (self.accept_image_fmap and self.feature_map_codes_channel_first)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (..., heads * codebook_dim) for indices (...) or (..., heads), before ``project_out``."""
        check_indices_dtype(indices)
        if self.heads > 1 and (indices.ndim < 2 or indices.shape[-1] != self.heads):
            raise ValueError(f"indices must end with a heads dimension of size {self.heads}, got {tuple(indices.shape)}")
        check_index_range(indices, self.codebook_size)
        embed, indices = self._codebook.output_codes(), indices.long()
        if self.heads == 1:
            return F.embedding(indices, embed[0])
        if self.separate_codebook_per_head:  # codebook h's codes sit at rows h * codebook_size + i
            indices = indices + torch.arange(self.heads, device=indices.device) * self.codebook_size
        return F.embedding(indices, embed.reshape(-1, self.codebook_dim)).flatten(-2)

    # ------------------------------------------------------------------ pure eval API

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes for ``x`` without touching any state (the export encoder)."""
        tokens, layout = self._to_tokens(x)
        return layout.restore_indices(self.encode_tokens(tokens)[1])

    def _to_tokens(self, x: torch.Tensor):
        if self.accept_3d_fmap and isinstance(x, torch.Tensor) and x.ndim != 5:
            raise ValueError(f"accept_3d_fmap=True expects (batch, {self.dim}, depth, height, width) input, got shape "
                             f"{tuple(x.shape)}")
        return to_tokens(x, self.dim, self.channel_last, self.accept_image_fmap)

    def encode_tokens(self, tokens: torch.Tensor, codebook_transform_fn=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure eval quantization of tokens (b, n, dim): ``(quantized (b, n, dim), indices (b, n[, heads]))``,
        what the eval ``forward`` computes; residual wrappers chain it (with each token's own codes from
        ``codebook_transform_fn``, an implicit neural codebook)."""
        rows = self._codebook.transform_input(self._split_heads(self.project_in(tokens)))
        if codebook_transform_fn is not None:
            quantized, indices, _ = self._codebook.quantize_own_codes(rows, codebook_transform_fn)
        else:
            quantized, indices, _ = self._codebook.quantize(rows)
        batch = tokens.shape[0]
        return self.project_out(self._merge_rows(quantized.to(rows.dtype), batch)), self._merge_indices(indices, batch)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """The quantized output for ``indices``, in the layout ``forward`` returns."""
        out = self.project_out(self.lookup(indices))
        has_tokens = indices.ndim > (2 if self.heads > 1 else 1)
        return out.movedim(-1, 1) if has_tokens and (self.accept_image_fmap or not self.channel_last) else out

    # ------------------------------------------------------------------ head handling

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, n, heads * d) -> codebook rows (num_codebooks, rows, d)."""
        # contiguous: strided rows trip torch.cond's checks in the k-means init under inductor
        if self.heads == 1:  # a plain reshape (einops would add a size-1 permute, a copy in exported graphs)
            return tokens.reshape(1, -1, tokens.shape[-1]).contiguous()
        if self.separate_codebook_per_head:
            return rearrange(tokens, "b n (h d) -> h (b n) d", h=self.heads).contiguous()
        return rearrange(tokens, "b n (h d) -> 1 (b h n) d", h=self.heads).contiguous()

    def _merge_rows(self, rows: torch.Tensor, batch: int) -> torch.Tensor:
        if self.heads == 1:
            return rows.reshape(batch, -1, rows.shape[-1])
        if self.separate_codebook_per_head:
            return rearrange(rows, "h (b n) d -> b n (h d)", b=batch)
        return rearrange(rows, "1 (b h n) d -> b n (h d)", b=batch, h=self.heads)

    def _split_token_values(self, values: torch.Tensor) -> torch.Tensor:
        """Per-token values (b, n) -> per-row (num_codebooks, rows)."""
        if self.separate_codebook_per_head:
            return repeat(values, "b n -> h (b n)", h=self.heads).contiguous()
        return repeat(values, "b n -> 1 (b h n)", h=self.heads).contiguous()

    def _split_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(b, n, heads) -> (num_codebooks, rows)."""
        if self.separate_codebook_per_head:
            return rearrange(indices, "b n h -> h (b n)")
        return rearrange(indices, "b n h -> 1 (b h n)")

    def _merge_indices(self, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """(num_codebooks, rows) -> (b, n) or (b, n, heads)."""
        if self.separate_codebook_per_head:
            merged = rearrange(indices, "h (b n) -> b n h", b=batch)
        else:
            merged = rearrange(indices, "1 (b h n) -> b n h", b=batch, h=self.heads)
        return merged if self.heads > 1 else merged[..., 0]

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                sample_codebook_temp: float | None = None, freeze_codebook: bool = False,
                lens: torch.Tensor | None = None, return_loss_breakdown: bool = False, ema_update_weight=None,
                accum_ema_update: bool = False, topk: int | None = None, ema_update: bool | None = None,
                codebook_transform_fn=None):
        """x: (b, dim), (b, n, dim), (b, dim, n) with ``channel_last=False``, or
        (b, dim, *spatial) with ``accept_image_fmap=True`` ((b, dim, d, h, w) with ``accept_3d_fmap``);
        mask: bool (b, n), or lens: int (b,), the number of leading tokens of each sequence that are real.
        ema_update_weight scales this step's EMA update per code (a number, a (codebook_size,) or
        (heads, codebook_size) tensor, or a callable of the batch's code sums and counts); accum_ema_update=True
        only accumulates the batch's statistics for the next plain call's single EMA step.

        Returns ``(quantized, indices, loss)`` (with ``return_loss_breakdown``, a fourth element: the
        unweighted loss terms), or ``(quantized, ce_loss)`` when ``indices`` are given.  ``topk=k``: the k nearest
        codes of every token, best first, on a trailing axis of the indices and the loss and before the features
        of the output (1.32.0's layout), with a loss per candidate and no EMA step."""
        if sample_codebook_temp is not None:
            number("sample_codebook_temp", sample_codebook_temp, 0.0)
        tokens, layout = self._to_tokens(x)
        if lens is not None:
            if mask is not None:
                raise ValueError("pass either mask or lens, not both")
            mask = lens_to_mask(lens, tokens.shape[0], tokens.shape[1])
        token_weights = layout.token_weights(mask, tokens.shape[0])
        target = None if indices is None else layout.token_indices(indices, self.heads)
        self._check_ema_arguments(ema_update_weight, accum_ema_update)
        if ema_update and not self._codebook.config.ema_update:
            raise ValueError("ema_update=True needs a codebook built with EMA (ema_update=True at construction)")
        if codebook_transform_fn is not None and (not callable(codebook_transform_fn) or topk is not None
                                                  or self.heads > 1):
            raise ValueError("codebook_transform_fn must be a callable, on a single-head VectorQuantize, without topk")
        if topk is not None and (indices is not None or return_loss_breakdown or ema_update_weight is not None
                                 or accum_ema_update):
            raise ValueError("topk does not combine with indices, return_loss_breakdown or EMA arguments")
        out = self.quantize_tokens(tokens, token_weights, target, sample_codebook_temp, freeze_codebook,
                                   return_loss_breakdown=return_loss_breakdown, ema_update_weight=ema_update_weight,
                                   accum_ema_update=accum_ema_update, topk=topk, ema_update=ema_update,
                                   codebook_transform_fn=codebook_transform_fn)
        if topk is not None:
            return QuantizeOutput(_restore_candidates(layout, out.quantized), layout.restore_indices(out.indices),
                                  layout.restore_indices(out.loss))
        quantized = layout.restore_features(out[0])
        if indices is not None:
            return QuantizeLossOutput(quantized, out.ce_loss)
        if return_loss_breakdown:
            return QuantizeOutputWithBreakdown(quantized, layout.restore_indices(out.indices), out.loss, out.breakdown)
        return QuantizeOutput(quantized, layout.restore_indices(out.indices), out.loss)

    def quantize_tokens(self, tokens: torch.Tensor, token_weights: torch.Tensor | None = None,
                        target: torch.Tensor | None = None, sample_codebook_temp: float | None = None,
                        freeze_codebook: bool = False, active: torch.Tensor | None = None,
                        return_loss_breakdown: bool = False, ema_update_weight=None, accum_ema_update: bool = False,
                        topk: int | None = None, ema_update: bool | None = None, codebook_transform_fn=None):
        """``forward`` on validated tokens (b, n, dim), the form residual wrappers call.

        token_weights: (b, n), 0 for tokens that must neither train the codebook
        nor be quantized (padding); target: (b, n, heads) codes for the
        cross-entropy loss; active: a 0-d bool, False for a dropped-out residual
        layer, which then trains nothing (its outputs are the caller's to discard).
        Returns a ``QuantizeOutput`` with indices (b, n) or (b, n, heads) (a
        ``QuantizeOutputWithBreakdown`` with ``return_loss_breakdown``), or a ``QuantizeLossOutput``.
        topk: the ``topk`` nearest codes of every token instead of one (see ``quantize_topk``)."""
        options = StepOptions(sample_codebook_temp, freeze_codebook or self.freeze_codebook, ema_update_weight,
                              accum_ema_update, topk, ema_update, codebook_transform_fn)
        if topk is not None:
            return self.quantize_topk(tokens, token_weights, active, options)
        batch = tokens.shape[0]
        row_weights = None if token_weights is None else self._split_token_values(token_weights)
        target_rows = None
        if target is not None:
            target_rows = self._split_indices(target)
            check_index_range(target_rows, self.codebook_size, allow_minus_one=True)

        if token_weights is not None:
            # non-finite values in padding must not reach gradients (0 * NaN is NaN in project_in's backward)
            dropped = (token_weights.unsqueeze(-1) == 0) & ~torch.isfinite(tokens)
            tokens_in = torch.where(dropped, torch.zeros((), dtype=tokens.dtype, device=tokens.device), tokens)
        else:
            tokens_in = tokens
        rows = self._codebook.transform_input(self._split_heads(self.project_in(tokens_in)))
        codebook_weights = row_weights
        if active is not None:  # zero weights: no statistics, no update, nothing sent to other ranks
            gate = active.to(rows.dtype)
            codebook_weights = gate.expand(rows.shape[:2]) if row_weights is None else row_weights * gate
        want_logits = target is not None or (self.training and (self.commitment_use_cross_entropy_loss
                                                                 or self.codebook_diversity_loss_weight > 0))
        noise = self._draw_noise(rows.shape[1], options.sample_codebook_temp, tuple(rows.shape)) \
            if self.training else None
        quantized, code_indices, logits = self._codebook(rows, codebook_weights, noise, want_logits, options)

        zero = torch.zeros((), device=tokens.device)
        inplace_loss = zero
        if self.in_place_codebook_optimizer is not None and self.training and not options.freeze_codebook:
            inplace_loss = self._in_place_codebook_step(quantized, rows, codebook_weights)
            quantized, code_indices, logits = self._codebook(rows, codebook_weights, None, want_logits, options)

        quantized = quantized.to(rows.dtype)
        commit_quantized = quantized
        if self.training:
            commit_quantized, quantized = self._gradient_path(rows, quantized, noise, options.freeze_codebook)

        out = self.project_out(self._merge_rows(quantized, batch))
        if token_weights is not None:
            out = self.restore_padding(out, tokens, token_weights.unsqueeze(-1) > 0)

        if target is not None:
            return QuantizeLossOutput(out, masked_cross_entropy(logits, target_rows, row_weights))

        # like the reference, a training loss that requires grad even when no term does (a leaf with
        # requires_grad cannot be created inside a compiled graph, so there it has only its terms' grad)
        loss = torch.zeros(1, device=tokens.device, requires_grad=self.training and not torch.compiler.is_compiling())
        breakdown = VQLossBreakdown(zero, zero, zero, inplace_loss)
        if self.training:
            breakdown = self._aux_losses(rows, commit_quantized, code_indices, logits, row_weights, noise,
                                         tokens.shape[1])._replace(inplace_optimize=inplace_loss)
            loss = loss + (breakdown.commitment * self.commitment_weight
                           + breakdown.codebook_diversity * self.codebook_diversity_loss_weight
                           + breakdown.orthogonal_reg * self.orthogonal_reg_weight)
        if self.scalar_loss:
            loss = loss.reshape(())
        indices = self._merge_indices(code_indices, batch)
        if token_weights is not None and self.masked_indices_are_minus_one:
            kept = (token_weights > 0).reshape(*token_weights.shape, *(1,) * (indices.ndim - 2))
            indices = torch.where(kept, indices, -1)
        if return_loss_breakdown:
            return QuantizeOutputWithBreakdown(out, indices, loss, breakdown)
        return QuantizeOutput(out, indices, loss)

    def _gradient_path(self, rows: torch.Tensor, codes: torch.Tensor, noise: dict, freeze_codebook: bool):
        """Training: (the codes the commitment loss compares with, the output whose value is the codes and whose
        gradient reaches ``rows``: rotation trick, DiVeQ or straight-through, plus the synchronous update)."""
        commit_codes = codes.detach() if not self.learnable_codebook or freeze_codebook else codes
        quantized = codes
        if not self.route_gradients_to_input:
            pass  # the codes themselves: no gradient reaches the input (a learnable codebook still gets one)
        elif self.rotation_trick and rows.requires_grad:
            quantized = rotate_to(rows, codes.detach())
        elif self.directional_reparam and rows.requires_grad:
            quantized = directional_reparam(rows, codes, normal_from_uniform(noise["directional"]),
                                            self.directional_reparam_variance)
        else:
            quantized = rows + (codes - rows).detach()  # straight-through estimator
        if self.sync_update_v > 0:
            # optimistic/pessimistic synchronous update, eq. 21 of https://arxiv.org/abs/2305.08842
            quantized = quantized + self.sync_update_v * (quantized - quantized.detach())
        return commit_codes, quantized

    def restore_padding(self, out: torch.Tensor, tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The output where ``kept``, and zeros (or, under 1.14.17's defaults, the input ``tokens``) elsewhere."""
        padding = torch.zeros((), dtype=out.dtype, device=out.device) if self.return_zeros_for_masked_padding \
            else tokens
        return torch.where(kept, out, padding)

    def _check_topk(self, topk, training: bool) -> int:
        positive_int("topk", topk)
        if self.heads > 1:
            raise ValueError("topk needs a single-head VectorQuantize (heads=1)")
        if training and (self.commitment_use_cross_entropy_loss or self.in_place_codebook_optimizer is not None
                              or self._codebook.config.straight_through):
            raise ValueError("topk in training does not combine with commitment_use_cross_entropy_loss, "
                             "in_place_codebook_optimizer or straight_through")
        return min(topk, self.codebook_size)

    def quantize_topk(self, tokens: torch.Tensor, token_weights: torch.Tensor | None, active: torch.Tensor | None,
                      options: StepOptions, training: bool | None = None):
        """The ``topk`` nearest codes of every token, best first (1.32.0's ``forward(topk=)``, which beam search
        builds on): quantized (b, n, topk, dim), indices (b, n, topk) and a loss per candidate (b, n, topk), the
        commitment error of each code (weighted when ``commitment_weight`` > 0; in training plus the diversity
        and orthogonal terms).  The codebook only gets k-means and affine statistics, no EMA step.
        ``training=False`` computes the eval result whatever the module's mode (a pure encode)."""
        training = self.training if training is None else training
        topk = self._check_topk(options.topk, training)
        b, n, _ = tokens.shape
        weights = token_weights
        if active is not None:
            gate = active.to(tokens.dtype)
            weights = gate.expand(b, n) if weights is None else weights * gate
        rows = self._codebook.transform_input(self._split_heads(self.project_in(tokens)))
        row_weights = None if weights is None else weights.reshape(1, -1)
        noise = logits = None
        if training:
            want_logits = self.codebook_diversity_loss_weight > 0
            noise = self._draw_noise(rows.shape[1], options.sample_codebook_temp,
                                     (*rows.shape[:2], topk, rows.shape[2]))
            codes, indices, logits = self._codebook(rows, row_weights, noise, want_logits, options, topk=topk)
        else:
            codes, indices, _ = self._codebook.top_codes(rows, topk)
        codes = codes.to(rows.dtype)
        rows_k = rows.unsqueeze(-2).expand_as(codes)
        commit_codes, quantized = codes, codes
        if training:
            commit_codes, quantized = self._gradient_path(rows_k, codes, noise, options.freeze_codebook)
        out = self.project_out(quantized.reshape(b, n, topk, -1))
        kept = None if weights is None else weights.reshape(b, n, 1) > 0
        if kept is not None:
            out = self.restore_padding(out, tokens.unsqueeze(-2), kept.unsqueeze(-1))
        commit = (commit_codes - rows_k).pow(2).mean(dim=-1).reshape(b, n, topk)
        if kept is not None:
            commit = torch.where(kept, commit, torch.zeros((), dtype=commit.dtype, device=commit.device))
        loss = commit * self.commitment_weight if self.commitment_weight > 0 else commit
        if training:
            loss = loss if self.commitment_weight > 0 else torch.zeros_like(commit)
            if self.codebook_diversity_loss_weight > 0:
                diversity = codebook_diversity_loss(logits, self.codebook_diversity_temperature, n, row_weights)
                loss = loss + diversity * self.codebook_diversity_loss_weight
            if self.has_codebook_orthogonal_loss:
                loss = loss + self._orthogonal_loss(indices.reshape(1, -1), noise.get("orthogonal")) \
                    * self.orthogonal_reg_weight
        indices = indices.reshape(b, n, topk)
        if kept is not None and self.masked_indices_are_minus_one:
            indices = torch.where(kept, indices, -1)
        return QuantizeOutput(out, indices, loss)

    def update_indices(self, x: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """An EMA step (and dead-code replacement) with ``x`` assigned to the given codes, as a training forward
        would make it: what beam search does with the codes it keeps (1.32.0's ``update_indices``; also
        ``update_ema_indices``).  x and mask as ``forward`` takes them; indices (b, *tokens), -1 left out."""
        tokens, layout = self._to_tokens(x)
        token_weights = layout.token_weights(mask, tokens.shape[0])
        if self.heads > 1:
            raise ValueError("update_indices needs a single-head VectorQuantize (heads=1)")
        target = layout.token_indices(indices, 1)
        check_index_range(target, self.codebook_size, allow_minus_one=True)
        self.update_from_token_indices_(tokens, target[..., 0], token_weights)

    update_ema_indices = update_indices

    def update_from_token_indices_(self, tokens: torch.Tensor, indices: torch.Tensor,
                                   token_weights: torch.Tensor | None = None, count_skipped: bool = True) -> None:
        """``update_indices`` on tokens (b, n, dim) and indices (b, n); ``count_skipped=False`` when this step's
        forward already counted a skipped (non-finite) batch."""
        rows = self._codebook.transform_input(self._split_heads(self.project_in(tokens.detach())))
        weights = None if token_weights is None else token_weights.reshape(1, -1)
        self._codebook.update_from_indices_(rows, indices.reshape(1, -1), weights, count_skipped=count_skipped)

    def update_ema(self) -> None:
        """Recompute the codes from the EMA statistics (``manual_ema_update=True`` leaves it to the program)."""
        self._codebook.update_ema()

    def _check_ema_arguments(self, weight, accumulate: bool) -> None:
        if (weight is not None or accumulate) and not self._codebook.config.ema_update:
            raise ValueError("ema_update_weight and accum_ema_update need an EMA codebook (ema_update=True)")
        if weight is None or callable(weight):
            return
        if isinstance(weight, torch.Tensor):
            books = self._codebook.config.num_codebooks
            if weight.shape not in ((), (self.codebook_size,), (books, self.codebook_size)):
                raise ValueError(f"ema_update_weight must be a number or a tensor of shape ({self.codebook_size},) or "
                                 f"({books}, {self.codebook_size}), got shape {tuple(weight.shape)}")
        elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
            number("ema_update_weight", weight, 0.0)
        else:
            raise TypeError(f"ema_update_weight must be a number, a tensor or a callable, got {type(weight).__name__}")

    def _samples_orthogonal_codes(self) -> bool:
        max_codes = self.orthogonal_reg_max_codes
        return self.has_codebook_orthogonal_loss and max_codes is not None and self.codebook_size > max_codes

    def _draw_noise(self, num_rows: int, temperature: float | None, output_shape: tuple | None = None) -> dict:
        """All of a training step's randomness in one draw (see ``draw_uniform``); ``output_shape``: the codes'
        shape, for DiVeQ's Gaussian noise (drawn only with ``directional_reparam``)."""
        shapes = self._codebook.noise_shapes(num_rows, temperature)
        if self._samples_orthogonal_codes():
            shapes["orthogonal"] = tuple(self._codebook.embed.shape[:2])
        if self.directional_reparam and output_shape is not None:
            shapes["directional"] = (2, *output_shape)
        return draw_uniform(shapes, self._codebook.embed.device)

    # ------------------------------------------------------------------ losses

    def _aux_losses(self, rows, commit_quantized, code_indices, logits, row_weights, noise,
                    tokens_per_sequence: int) -> VQLossBreakdown:
        """The training loss's terms, unweighted (zero where their weight is zero)."""
        zero = torch.zeros((), device=rows.device)
        commitment = diversity = orthogonal = zero
        if self.commitment_weight > 0:
            if self.commitment_use_cross_entropy_loss:
                commitment = masked_cross_entropy(logits, code_indices, row_weights)
            else:
                commitment = masked_mse(commit_quantized, rows, row_weights)
        if self.codebook_diversity_loss_weight > 0:
            diversity = codebook_diversity_loss(logits, self.codebook_diversity_temperature, tokens_per_sequence,
                                                row_weights)
        if self.has_codebook_orthogonal_loss:
            orthogonal = self._orthogonal_loss(code_indices, noise.get("orthogonal"))
        return VQLossBreakdown(commitment, diversity, orthogonal, zero)

    def _orthogonal_loss(self, code_indices: torch.Tensor, uniform: torch.Tensor | None) -> torch.Tensor:
        """Orthogonality of the (updated) codebook, over the codes used in this
        batch when ``orthogonal_reg_active_codes_only``, and over a random
        subset of at most ``orthogonal_reg_max_codes`` codes; subsets are 0/1
        weights so that shapes stay static."""
        codebook = self._codebook.embed
        code_weights = None
        if self.orthogonal_reg_active_codes_only:
            code_weights = (counts_per_code(code_indices, self.codebook_size) > 0).float()
        if self._samples_orthogonal_codes():
            eligible = code_weights if code_weights is not None else torch.ones(codebook.shape[:2], device=codebook.device)
            keys = torch.where(eligible > 0, uniform, torch.full_like(eligible, -1.0))
            chosen = keys.topk(self.orthogonal_reg_max_codes, dim=-1).indices
            codebook = gather_codes(codebook, chosen)
            code_weights = eligible.gather(1, chosen) if self.orthogonal_reg_active_codes_only else None
        return orthogonal_loss(codebook, code_weights)

    @torch.compiler.disable
    def _in_place_codebook_step(self, quantized, rows, row_weights) -> torch.Tensor:
        """One step of the user's codebook optimizer on ``mse(quantized, x)``; returns that loss.
        It runs a user's optimizer, so it stays eager (a graph break under torch.compile)."""
        loss = masked_mse(quantized, rows.detach(), row_weights)
        params = [p for p in self._codebook.parameters() if p.requires_grad]
        loss.backward(inputs=params)
        if not self.manual_in_place_optimizer_update:
            self.update_in_place_optimizer()
        return loss.detach()

    @torch.compiler.disable
    def update_in_place_optimizer(self) -> None:
        """Step the in-place codebook optimizer on the gradients accumulated so far (averaged over ranks with a
        synchronised codebook) and clear them: each forward with ``manual_in_place_optimizer_update=False``, or
        when the program calls it (several forwards, one step)."""
        if self.in_place_codebook_optimizer is None:
            return
        if self.sync_codebook and D.is_distributed():
            for param in self._codebook.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= torch.distributed.get_world_size()
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    def expire_codes_(self, x: torch.Tensor) -> None:
        """Replace dead codes (count under ``threshold_ema_dead_code``) with rows of ``x`` now, in training
        (1.32.0's ``expire_codes_``: for programs that track counts over several calls, as a shared codebook)."""
        if not self.training:
            return
        tokens, _ = self._to_tokens(x)
        self._codebook.expire_codes_(self._codebook.transform_input(self._split_heads(self.project_in(tokens.detach()))))
