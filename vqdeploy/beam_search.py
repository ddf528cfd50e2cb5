"""Beam search over a residual VQ's codes (1.32.0's ``beam_size``), with static shapes.

Greedy residual quantization takes each layer's nearest code; a beam keeps the ``beam_size`` best partial
paths instead.  At every layer each beam expands into its layer's ``k = min(beam_size, codebook_size)`` nearest
codes (``VectorQuantize(topk=k)``); a path's score is minus the sum over layers of each code's commitment error
(times ``beam_score_quantizer_weights``), and the ``beam_size`` best of the beams x k candidates go on (one after
the last layer).  All sizes are Python ints fixed by the module, so the search is one graph: ``topk`` and
``gather`` on tensors (b, n, beams, ...), exportable to ONNX (TopK, GatherElements).

Quantize dropout keeps shapes too: a dropped layer keeps every beam as it is (one candidate per beam with the
beam's score, the others at -inf), which selects what 1.32.0 selects when it stops the search at the last kept
layer.  In training, after the search, each layer's codebook takes its EMA step with the inputs and codes of the
chosen path (``VectorQuantize.update_from_token_indices_``), as 1.32.0's ``update_indices``.
"""

from __future__ import annotations

import torch

from .codebooks import StepOptions


def _expand(t: torch.Tensor, k: int) -> torch.Tensor:
    """(b, n, j, ...) -> (b, n, j * k, ...), each beam repeated k times."""
    b, n, j = t.shape[:3]
    return t.unsqueeze(3).expand(b, n, j, k, *t.shape[3:]).reshape(b, n, j * k, *t.shape[3:])


def _select(t: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The beams ``chosen`` (b, n, keep) of t (b, n, beams, ...)."""
    index = chosen.reshape(*chosen.shape, *(1,) * (t.ndim - 3)).expand(*chosen.shape, *t.shape[3:])
    return t.gather(2, index)


def beam_search(rvq, tokens: torch.Tensor, token_weights: torch.Tensor | None, beam_size: int,
                sample_codebook_temp=None, freeze_codebook: bool = False, num_quantizers: int | None = None,
                active_count: torch.Tensor | None = None, training: bool | None = None):
    """Beam search through ``rvq``'s first ``num_quantizers`` layers for tokens (b, n, dim).

    Returns (quantized (b, n, dim) before ``project_out``, indices (b, n, q), per-token losses (b, n, q), the
    chosen path's layer inputs [(b, n, d)] * q)."""
    training = rvq.training if training is None else training
    layers = rvq.layers[:rvq.bandwidth(num_quantizers)]
    x = rvq.project_in(tokens)
    b, n, d = x.shape
    residual = x.unsqueeze(2)  # (b, n, beams, d)
    quantized_out = torch.zeros_like(residual)
    scores = torch.zeros(b, n, 1, dtype=x.dtype, device=x.device)
    paths = inputs = losses = None  # (b, n, beams, layers[, d]) so far
    for i, layer in enumerate(layers):
        beams = residual.shape[2]
        active = None if active_count is None else active_count > i
        weights = None if token_weights is None else token_weights.unsqueeze(-1).expand(b, n, beams).reshape(b, -1)
        layer_input = residual
        k = min(beam_size, layer.codebook_size)
        out = layer.quantize_topk(residual.reshape(b, n * beams, d), weights, active,
                                  StepOptions(sample_codebook_temp, freeze_codebook, topk=k), training=training)
        quantized = out.quantized.reshape(b, n, beams, k, d)
        codes = out.indices.reshape(b, n, beams, k)
        loss = out.loss.reshape(b, n, beams, k)
        step = -loss * rvq.beam_score_weights[i].to(loss.dtype)
        if active is not None:  # a dropped layer: each beam once, unchanged
            first = torch.arange(k, device=x.device) == 0
            step = torch.where(active, step, torch.where(first, 0.0, -torch.inf).to(step.dtype))
            quantized = torch.where(active, quantized, torch.zeros((), dtype=quantized.dtype, device=x.device))
            codes = torch.where(active, codes, -1)
            loss = torch.where(active, loss, torch.zeros((), dtype=loss.dtype, device=x.device))
        candidates = (scores.unsqueeze(-1) + step).reshape(b, n, beams * k)
        residual = (residual.unsqueeze(3) - rvq.residual_gradient(quantized)).reshape(b, n, beams * k, d)
        quantized_out = (quantized_out.unsqueeze(3) + quantized).reshape(b, n, beams * k, d)
        layer_input = _expand(layer_input, k).unsqueeze(3)
        inputs = layer_input if inputs is None else torch.cat([_expand(inputs, k), layer_input], dim=3)
        codes, loss = codes.reshape(b, n, beams * k, 1), loss.reshape(b, n, beams * k, 1)
        paths = codes if paths is None else torch.cat([_expand(paths, k), codes], dim=3)
        losses = loss if losses is None else torch.cat([_expand(losses, k), loss], dim=3)
        keep = 1 if i == len(layers) - 1 else beam_size
        scores = candidates
        if beams * k > keep:
            scores, chosen = candidates.topk(keep, dim=-1)
            residual, quantized_out = _select(residual, chosen), _select(quantized_out, chosen)
            paths, losses, inputs = _select(paths, chosen), _select(losses, chosen), _select(inputs, chosen)
    quantized_out = rvq.reparameterize(x, quantized_out[:, :, 0], token_weights) if training \
        else quantized_out[:, :, 0]
    return quantized_out, paths[:, :, 0], losses[:, :, 0], list(inputs[:, :, 0].unbind(dim=2))


def masked_token_mean(losses: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    """Per-token losses (b, n, q) -> (q,): the mean over kept tokens (1.32.0 divides by the kept count,
    clamped at 1e-4)."""
    if token_weights is None:
        return losses.mean(dim=(0, 1))
    kept = (token_weights > 0).unsqueeze(-1)
    total = torch.where(kept, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum(dim=(0, 1))
    return total / kept.sum().clamp(min=1e-4)
