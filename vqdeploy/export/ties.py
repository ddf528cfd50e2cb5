"""Near-ties: telling float rounding from real disagreements between onnxruntime's indices and PyTorch's.

Every quantizer decides by comparison: the nearest code, the nearest level after a tanh bound, the sign.
PyTorch and onnxruntime evaluate the compared quantities in float32 with other summation orders and other
tanh and exp approximations, so a token within a few hundred float32 ulps of a decision boundary can go
either way in a correct export.  Such a token is a near-tie: it is counted and reported, never failed on.

For each token whose indices differ, the first layer where they differ is examined in float64 on the
PyTorch side, with the graph's own weights and the layer input PyTorch computed (for a user network inside
the encoder graph: the network's output as PyTorch computed it).  Two numbers decide:

- the margin ``m``: how much better PyTorch's choice is than onnxruntime's for that input (the table below;
  negative when float64 prefers onnxruntime's);
- the size ``e`` of the float32 computation that compared them: the magnitude its terms can reach, so that
  the rounding of two correct implementations is at most a small multiple of ``2**-24 * e``.

The token is a near-tie when ``m <= NEAR_TIE_RTOL * e``, else its disagreement is real.  Per decision
(``z`` the layer's input, ``a`` the elementwise magnitude of what ``z`` was computed from: ``|x|`` for
the graph input, ``|W| |x| + |b|`` through a projection, plus the codes a residual subtracted):

=============================  ==========================================  ===============================
decision                       margin m                                    size e
=============================  ==========================================  ===============================
nearest code (Euclidean)       ``|z - c_onnx|^2 - |z - c_torch|^2``        ``C^2 + 2 |a| C``, C = max(|c|)
nearest code (cosine)          ``zn . c_torch - zn . c_onnx``              ``max(1, |a| / |z|)``
FSQ level, per channel         the bounded value's distance to the         ``h * (1 + a / s)``: ``h`` the
                               midpoint between the two levels             half width, ``s`` the residual
                                                                           layer's scale
LFQ sign, per channel          ``|z|``, the distance to the sign boundary  ``a``
LatentQuantize value, channel  half the difference of the two distances    ``a + max |value|``
FSP bin, per channel           the activation's distance (in bins) to the  ``levels / 2 * (1 + a)``: the
                               midpoint between the two bins' centres      CDFs' slope is at most 1/2
=============================  ==========================================  ===============================

Dividing by the residual scale ``s`` is how a residual FSQ layer amplifies the error of its input: layer i
rounds ``residual / (levels - 1) ** -i``.  A user network's output is exact only up to its own rounding,
which grows with the size of the token's features, not of each feature: with a network inside the encoder
graph, ``a`` is at least the root mean square of the token's features.

``NEAR_TIE_RTOL = 2**-16`` is 256 float32 unit roundoffs of ``e``, the worst-case rounding of a float32 sum of
256 terms (n u e): every flip measured between onnxruntime and PyTorch, bare and behind a conv network, lay
within 1/300 of it, while a wrong weight or op moves decisions by far more (an ONNX codebook perturbed by
1e-3 of its spread fails, tests/test_export_ties.py).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..grid import CosineSimLinear
from ..token_layout import to_tokens
from ..registry import entry_of, family_of
from .graphs import index_dims, is_residual

NEAR_TIE_RTOL = 2.0 ** -16


class Agreement(NamedTuple):
    """How one encoder run's indices compare, per token (one feature vector of the quantizer's input)."""

    tokens: int
    identical: int
    near_ties: int | None  # None when not classified (float16 graphs)
    real: int | None
    worst: float  # the largest m / (NEAR_TIE_RTOL * e) among differing tokens (<= 1 when all are near-ties)


def compare_indices(quantizer: nn.Module, features: torch.Tensor, expected: torch.Tensor, got: torch.Tensor,
                    wrapped: bool = False, classify: bool = True) -> Agreement:
    """Classify onnxruntime's indices ``got`` against PyTorch's ``expected`` for the quantizer input
    ``features`` (PyTorch's, float32); ``wrapped``: the features came out of a user network.
    ``classify=False`` only counts identical tokens.  Runs on the CPU, whatever the inputs' device."""
    expected, got = _per_token(quantizer, expected.long().cpu()), _per_token(quantizer, got.long().cpu())
    differs = (expected != got).flatten(1).any(dim=1)
    tokens, num_differ = expected.shape[0], int(differs.sum())
    if num_differ == 0 or not classify:
        return Agreement(tokens, tokens - num_differ, 0 if classify else None, 0 if classify else None, 0.0)
    rows = differs.nonzero().squeeze(1)
    if family_of(quantizer) == "hierarchical":
        with torch.no_grad():
            ratios = _hierarchical_ratios(copy.deepcopy(quantizer).cpu().double(), features.detach().cpu(),
                                          expected.reshape(features.shape[0], -1), got.reshape(features.shape[0], -1),
                                          wrapped).reshape(-1)[rows]
        near = int((ratios <= 1).sum())
        return Agreement(tokens, tokens - num_differ, near, num_differ - near, float(ratios.max()))
    expected, got = expected[rows], got[rows]
    invalid = ((got < 0) | (got >= _code_limits(quantizer, got.shape[2]))).flatten(1).any(dim=1)  # no code: real
    x = _tokens(quantizer, features.detach().cpu()).reshape(tokens, -1)[rows].double()
    magnitude = x.abs()
    if wrapped:
        magnitude = magnitude.clamp(min=x.pow(2).mean(dim=-1, keepdim=True).sqrt())
    with torch.no_grad():
        ratios = _ratios(copy.deepcopy(quantizer).cpu().double(), x, magnitude, expected,
                         torch.where(invalid[:, None, None, None], expected, got))
    ratios = torch.where(invalid, torch.inf, ratios)
    near = int((ratios <= 1).sum())
    return Agreement(tokens, tokens - num_differ, near, num_differ - near, float(ratios.max()))


# ---------------------------------------------------------------------------------------- shapes


def _tokens(quantizer: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The quantizer's input as tokens (b, n, dim), in the order its indices are laid out."""
    family = family_of(quantizer)
    if family == "grid":
        return quantizer._tokens(features)[0]
    if family == "projection":
        return features
    return to_tokens(features, quantizer.dim, quantizer.channel_last, quantizer.accept_image_fmap,
                     getattr(quantizer, "channel_last_maps", False))[0]


def _code_limits(quantizer: nn.Module, layers: int) -> torch.Tensor | int:
    """Codes per layer, shaped to compare with ``_per_token``'s (tokens, groups, layers, columns)."""
    if is_residual(quantizer):
        return torch.tensor(quantizer.codebook_sizes[:layers]).view(1, 1, layers, 1)
    return quantizer.codebook_size


def _per_token(quantizer: nn.Module, indices: torch.Tensor) -> torch.Tensor:
    """Indices as the quantizer returns them -> (tokens, groups, layers, columns)."""
    leading, trailing = index_dims(quantizer, indices.shape[-1] if is_residual(quantizer) else None)
    if leading:  # grouped: (groups, b, *tokens, layers)
        return indices.movedim(0, -2).reshape(-1, leading[0], trailing[0], 1)
    if is_residual(quantizer):
        return indices.reshape(-1, 1, trailing[0], 1)
    return indices.reshape(-1, 1, 1, trailing[0] if trailing else 1)


# ---------------------------------------------------------------------------------------- families


def _ratios(quantizer: nn.Module, x, magnitude, expected, got) -> torch.Tensor:
    """m / (NEAR_TIE_RTOL * e) per token at its first differing layer, the worst over groups: (M,)."""
    family = family_of(quantizer)
    if family == "grouped":
        chunks = zip(quantizer.rvqs, x.chunk(quantizer.groups, dim=-1), magnitude.chunk(quantizer.groups, dim=-1))
        return torch.stack([_residual_ratios(rvq, xg, mg, expected[:, g], got[:, g])
                            for g, (rvq, xg, mg) in enumerate(chunks)]).amax(dim=0)
    if family == "residual":
        return _residual_ratios(quantizer, x, magnitude, expected[:, 0], got[:, 0])
    if family == "projection":
        x, magnitude = _random_projection(quantizer, x, magnitude)
        quantizer = quantizer.vq
    return _layer(quantizer, x, magnitude, expected[:, 0, 0], got[:, 0, 0])[0]


def _residual_ratios(rvq, x, magnitude, expected, got) -> torch.Tensor:
    """Walk the layers with PyTorch's codes (the same as onnxruntime's up to the first difference)."""
    if (getattr(rvq, "eval_beam_size", None) or 1) > 1:
        return _beam_ratios(rvq, x, magnitude, expected, got)
    residual, magnitude = _projected(rvq.project_in, x, magnitude)
    if getattr(rvq, "bounds_input_once", False):  # ResidualFSQ's |bound(z)| <= h, with z's error times h
        magnitude = rvq.layers[0].bound_scale() * (1 + magnitude)
    # (1.32.0's soft clamp tanh(z / v) * v moves no value, nor its error, by more than z's own)
    residual = rvq.start_residual(residual)
    ratios = torch.full(x.shape[:1], -torch.inf, dtype=x.dtype)
    decided = torch.zeros(x.shape[:1], dtype=torch.bool)
    for i in range(expected.shape[1]):
        scale = rvq.layer_scale(i)
        scale = 1.0 if scale is None else scale.to(x.dtype)
        layer_ratios, codes = _layer(rvq.layers[i], residual / scale, magnitude / scale, expected[:, i], got[:, i])
        first = (expected[:, i] != got[:, i]).any(dim=-1) & ~decided
        ratios = torch.where(first, layer_ratios, ratios)
        decided |= first
        residual = residual - codes * scale
        magnitude = magnitude + (codes * scale).abs()
    return ratios


def _beam_ratios(rvq, x, magnitude, expected, got) -> torch.Tensor:
    """A beam search encoder: onnxruntime's path is a near-tie when its score (minus the weighted commitment
    errors summed over the layers, in float64) is at least PyTorch's within the rounding of that sum; a worse
    path is real.  (A rounding flip of a pruning decision that leads to a clearly worse path is reported as
    real: conservative.)"""
    z, magnitude = _projected(rvq.project_in, x, magnitude)
    scores, sizes = [], []
    for path in (expected[..., 0], got[..., 0]):  # (M, layers)
        residual, score, size = z, 0.0, 0.0
        for i in range(path.shape[1]):
            layer = rvq.layers[i]
            codes = layer._codebook.codes_for_matching()[0].to(z.dtype)
            code = codes[path[:, i].clamp(0, codes.shape[0] - 1)]
            weight = float(rvq.beam_score_weights[i]) * (layer.commitment_weight or 1.0)
            matched = layer._codebook.transform_input(residual)  # unit rows for cosine codebooks
            score = score - weight * (code - matched).pow(2).mean(dim=-1)
            size = size + weight * (code.abs() + matched.abs() + magnitude).pow(2).mean(dim=-1)
            residual = residual - code
        scores.append(score)
        sizes.append(size)
    return _ratio(scores[0] - scores[1], torch.maximum(*sizes))


def _hierarchical_ratios(hvq, features, expected, got, wrapped: bool) -> torch.Tensor:
    """Per token (b, T): each sample's levels are walked with PyTorch's codes (every level depends on all
    coarser ones); the first level where onnxruntime's codes differ decides, with the nearest-code rule on the
    pooled residual (its magnitude: the pooled magnitudes of the input and of every coarser level's output), and
    that ratio stands for every differing token of the sample.  An index of no code is real."""
    x = hvq._checked_input(features.double())
    b, full_shape = x.shape[0], tuple(x.shape[2:])
    residual = x
    magnitude = x.abs()
    if wrapped:
        magnitude = magnitude.clamp(min=x.pow(2).mean(dim=1, keepdim=True).sqrt())
    sample_ratio = torch.full((b,), -torch.inf, dtype=x.dtype)
    decided = torch.zeros(b, dtype=torch.bool)
    levels = zip(hvq.level_shapes, expected.split(list(hvq.level_tokens), dim=1), got.split(list(hvq.level_tokens), 1))
    for level, (shape, ours, theirs) in enumerate(levels):
        z, _ = hvq.pool_residual(residual, shape, None)
        size, _ = hvq.pool_residual(magnitude, shape, None)
        z, size = z.flatten(2).transpose(1, 2), size.flatten(2).transpose(1, 2)  # (b, N, d)
        codes = hvq.get_vq(level)._codebook.codes_for_matching().to(x.dtype)
        invalid = (theirs < 0) | (theirs >= codes.shape[1])
        differs = ours != theirs
        ratio, _ = _nearest_code(codes, False, z.reshape(-1, 1, hvq.dim), size.reshape(-1, 1, hvq.dim),
                                 ours.reshape(-1, 1), theirs.clamp(0, codes.shape[1] - 1).reshape(-1, 1))
        ratio = torch.where(invalid, torch.inf, ratio.reshape(b, -1))
        worst = torch.where(differs, ratio, -torch.inf).amax(dim=1)
        first = differs.any(dim=1) & ~decided
        sample_ratio = torch.where(first, worst, sample_ratio)
        decided |= first
        chosen = codes[0][ours].transpose(1, 2).reshape(b, hvq.dim, *shape)
        upsampled = hvq.upsample(chosen, full_shape, level)
        residual = residual - upsampled
        magnitude = magnitude + upsampled.abs()
    return torch.where(expected != got, sample_ratio[:, None], -torch.inf)


def _random_projection(rpq, x, magnitude):
    """The BEST-RQ projection: normalised features through fixed random matrices."""
    normed, magnitude = _projected(rpq.norm, x, magnitude)
    projected = torch.einsum("nd,hde->nhe", normed, rpq.rand_projs).flatten(1)
    return projected, torch.einsum("nd,hde->nhe", magnitude, rpq.rand_projs.abs()).flatten(1)


def _projected(module: nn.Module, z, magnitude):
    """``module(z)`` and the magnitude of its terms, through linear layers and layer norms (which compute
    (z - mean) / std: terms |z| and |mean|, divided by std, then scaled and shifted)."""
    if isinstance(module, nn.Sequential):
        for inner in module:
            z, magnitude = _projected(inner, z, magnitude)
        return z, magnitude
    if isinstance(module, nn.LayerNorm):
        std = (z.var(dim=-1, unbiased=False, keepdim=True) + module.eps).sqrt()
        magnitude = (magnitude + z.mean(dim=-1, keepdim=True).abs()) / std
        if module.weight is not None:
            magnitude = magnitude * module.weight.abs()
        if module.bias is not None:
            magnitude = magnitude + module.bias.abs()
        return module(z), magnitude
    if isinstance(module, CosineSimLinear):  # unit rows onto unit columns: terms relative to |z|, scaled
        norm = z.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(z.dtype).tiny)
        columns = F.normalize(module.weight, dim=0).abs()
        return module(z), (magnitude / norm) @ columns * module.scale
    if not isinstance(module, nn.Linear):
        return z, magnitude
    magnitude = magnitude @ module.weight.abs().t()
    if module.bias is not None:
        magnitude = magnitude + module.bias.abs()
    return module(z), magnitude


def _layer(layer: nn.Module, z, magnitude, expected, got):
    """One layer's decision for inputs z (M, dim): (worst ratio over its differing columns (M,), the output
    PyTorch's indices select (M, dim))."""
    z, magnitude = _projected(layer.project_in, z, magnitude)
    m = z.shape[0]
    decision = entry_of(layer).decision
    if decision == "vq_code":
        z, magnitude = z.reshape(m, layer.heads, -1), magnitude.reshape(m, layer.heads, -1)
        ratio, codes = _nearest_code(layer._codebook.codes_for_matching(), layer._codebook.config.use_cosine_sim,
                                     z, magnitude, expected, got)
    elif decision == "sim_code":  # one Euclidean codebook, the transformed frozen codes
        ratio, codes = _nearest_code(layer.codebook[None], False, z[:, None], magnitude[:, None],
                                     expected.reshape(m, 1), got.reshape(m, 1))
    else:  # per channel of each codebook
        z, magnitude = z.reshape(m, layer.num_codebooks, -1), magnitude.reshape(m, layer.num_codebooks, -1)
        expected, got = expected.reshape(m, -1), got.reshape(m, -1)
        ratio, codes = _CHANNEL_DECISIONS[decision](layer, z, magnitude, expected, got)
    ratio = torch.where(expected.reshape(m, -1) != got.reshape(m, -1), ratio, -torch.inf).amax(dim=-1)
    return ratio, layer.project_out(codes.flatten(1))


def _ratio(margin, size):
    return margin / (NEAR_TIE_RTOL * size).clamp(min=torch.finfo(size.dtype).tiny)


def _nearest_code(codes: torch.Tensor, use_cosine_sim: bool, z, magnitude, expected, got):
    """Per head of z (M, heads, codebook_dim), codes (1 or heads, K, codebook_dim): (ratio (M, heads),
    PyTorch's codes (M, heads, codebook_dim))."""
    heads = z.shape[1]
    codes = codes.to(z.dtype)  # (the model computes in float32: exact for float32 codes)
    books = torch.arange(heads) if codes.shape[0] > 1 else torch.zeros(heads, dtype=torch.long)
    ours, theirs = codes[books, expected], codes[books, got]
    size = magnitude.norm(dim=-1)
    if use_cosine_sim:
        zn = F.normalize(z, dim=-1)
        margin = (zn * ours).sum(dim=-1) - (zn * theirs).sum(dim=-1)
        scale = (size / z.norm(dim=-1).clamp(min=torch.finfo(z.dtype).tiny)).clamp(min=1.0)
    else:
        margin = (z - theirs).pow(2).sum(dim=-1) - (z - ours).pow(2).sum(dim=-1)
        largest = torch.maximum(ours.norm(dim=-1), theirs.norm(dim=-1))
        scale = largest * (largest + 2 * size)  # the terms of the compared scores |c|^2 - 2 z.c
    return _ratio(margin, scale), ours


def _channel_ratio(margin, size, differs):
    """The worst channel of each codebook (M, c), over the channels whose choice differs."""
    return torch.where(differs, _ratio(margin, size), -torch.inf).amax(dim=-1)


def _fsq_level(fsq, z, magnitude, expected, got):
    """Each channel's level is the rounding of its position on the levels (``FSQ.level_position``: the bounded
    value, or the symmetric bound's bracket, after an orthogonal rotation when there is one)."""
    if fsq.orthogonal_rotation:
        rotation = fsq.orthogonal_rot.to(z.dtype)
        z, magnitude = z @ rotation, magnitude @ rotation.abs()
    position = fsq.level_position(z)
    ours, theirs = fsq.indices_to_level_indices(expected), fsq.indices_to_level_indices(got)
    margin = ((position - theirs).abs() - (position - ours).abs()) / 2
    size = fsq.position_scale().to(z.dtype) * (1 + magnitude)
    codes = fsq.rotate_back(fsq._indices_to_codes(expected).to(z.dtype))
    return _channel_ratio(margin, size, ours != theirs), codes


def _lfq_sign(lfq, z, magnitude, expected, got):
    """Each channel's sign, after the soft clamp and any rotation (the sphere scales a token's channels
    together and never flips a sign); the codes returned are the output's (on the sphere, rotated back)."""
    z = lfq.soft_clamp(z)
    if lfq.orthogonal_rotation:
        rotation = lfq.orthogonal_rot.to(z.dtype)
        z, magnitude = z @ rotation, magnitude @ rotation.abs()
    ours, theirs = (lfq.bits_to_codes(lfq.index_bits(i).to(z.dtype)) for i in (expected, got))
    margin = ((z - theirs).abs() - (z - ours).abs()) / 2
    return _channel_ratio(margin, magnitude, ours != theirs), lfq.rotate_back(lfq.to_sphere(ours))


def _fsp_bin(fsp, z, magnitude, expected, got):
    """Each channel's bin is the floor of its position (``FSP.level_position``: the CDF activation times the
    levels), i.e. the nearest bin centre k + 1/2."""
    position = fsp.level_position(z)
    ours, theirs = fsp.indices_to_level_indices(expected), fsp.indices_to_level_indices(got)
    margin = ((position - theirs - 0.5).abs() - (position - ours - 0.5).abs()) / 2
    size = fsp._levels.to(z.dtype) / 2 * (1 + magnitude)
    codes = fsp.from_unit_interval(fsp.bin_centres(ours.to(z.dtype)), 1e-6)
    return _channel_ratio(margin, size, ours != theirs), codes


def _latent_value(lq, z, magnitude, expected, got):
    table = lq.value_table()
    ours, theirs = lq.indices_to_level_indices(expected), lq.indices_to_level_indices(got)
    values, other = lq.level_values(ours, table), lq.level_values(theirs, table)
    margin = ((z - other).abs() - (z - values).abs()) / 2
    size = magnitude + table.abs().amax(dim=-1)
    return _channel_ratio(margin, size, ours != theirs), values


# a registry ``decision`` made per channel -> its margins and sizes
_CHANNEL_DECISIONS = {"fsq_level": _fsq_level, "lfq_sign": _lfq_sign, "latent_value": _latent_value,
                      "fsp_bin": _fsp_bin}
