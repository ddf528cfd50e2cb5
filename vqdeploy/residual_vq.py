"""ResidualVQ and GroupedResidualVQ: the residual loop over VectorQuantize layers."""

from __future__ import annotations

import functools
import operator

import torch
from torch import nn

from .checks import number, positive_int
from .config import records_config
from .defaults import behaves_as_latest, release_for
from .beam_search import beam_search, masked_token_mean
from .grouped import GroupedResidualQuantizer
from .implicit_codebook import ImplicitCodebookMLP
from .primitives import directional_reparam, draw_uniform, normal_from_uniform
from .residual import ResidualQuantizer
from .returns import ResidualOutput
from .vector_quantize import VectorQuantize


DIVEQ_VARIANCE = 5e-3  # the noise on the error's direction, 1.32.0's default (ResidualVQ does not expose it)


@records_config
class ResidualVQ(ResidualQuantizer):
    """Residual vector quantization (Algorithm 1 of SoundStream, https://arxiv.org/abs/2107.03312).

    Every ``VectorQuantize`` argument passes through to the layers; ``codebook_dim``
    sets the layers' width (with a projection in and out of it when it differs from ``dim``).
    ``codebook_size``: one size for every layer, or a tuple of one per layer (then ``num_quantizers`` may be
    left out), as 1.32.0 takes.  ``quant_grad_frac``: the fraction of each layer's gradient that also flows
    back through the residual into the layers before it (0: none, as 1.14.17).  ``beam_size`` (training) and
    ``eval_beam_size`` (eval, default ``beam_size``): beam search over the layers' codes (beam_search.py), with
    ``beam_score_quantizer_weights`` weighting each layer's error in a path's score."""

    def __init__(self, dim: int, num_quantizers: int | None = None, codebook_size: int | tuple[int, ...] | None = None,
                 codebook_dim: int | None = None, shared_codebook: bool = False,
                 heads: int = 1, quantize_dropout: bool = False, quantize_dropout_cutoff_index: int = 0,
                 quantize_dropout_multiple_of: int = 1, accept_image_fmap: bool = False, quant_grad_frac: float = 0.0,
                 beam_size: int | None = None, eval_beam_size: int | None = None,
                 beam_score_quantizer_weights: list[float] | None = None, diveq: bool = False,
                 implicit_neural_codebook: bool = False, mlp_kwargs: dict | None = None, **vector_quantize_kwargs):
        number("quant_grad_frac", quant_grad_frac)
        if implicit_neural_codebook:  # the layers' codes learn by gradient through the MLPs (1.32.0's setup)
            vector_quantize_kwargs.update(learnable_codebook=True, ema_update=False)
        if mlp_kwargs is not None and not isinstance(mlp_kwargs, dict):
            raise TypeError(f"mlp_kwargs must be a dict of ImplicitCodebookMLP arguments, got {mlp_kwargs!r}")
        if diveq:  # the codebooks learn through the reparameterised sum (DiVeQ), as 1.32.0 sets them up
            vector_quantize_kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                                          commitment_weight=0.0)
            quant_grad_frac = 1.0
        codebook_sizes = _layer_codebook_sizes(codebook_size, num_quantizers)
        for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
            if value is not None:
                positive_int(name, value)
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size (1.32.0's rule); pass beam_size=1 to search only in eval")
        weights = [1.0] * len(codebook_sizes) if beam_score_quantizer_weights is None \
            else list(beam_score_quantizer_weights)
        if len(weights) != len(codebook_sizes):
            raise ValueError(f"beam_score_quantizer_weights needs one weight per quantizer ({len(codebook_sizes)}), "
                             f"got {beam_score_quantizer_weights!r}")
        for weight in weights:
            number("each beam_score_quantizer_weights entry", weight)
        if shared_codebook and len(set(codebook_sizes)) > 1:
            raise ValueError(f"shared_codebook needs one codebook_size for every layer, got {codebook_size!r}")
        if heads != 1:
            raise ValueError(f"ResidualVQ quantizes with one head (heads=1), got heads={heads!r}")
        codebook_dim = dim if codebook_dim is None else codebook_dim
        positive_int("codebook_dim", codebook_dim)
        channel_last = vector_quantize_kwargs.pop("channel_last", True)
        vector_quantize_kwargs.pop("accept_image_fmap", None)
        release = release_for(vector_quantize_kwargs.get("defaults"))
        if shared_codebook and behaves_as_latest(release, "ResidualVQ", "updates of a shared codebook"):
            vector_quantize_kwargs.setdefault("manual_ema_update", True)
        layers = [VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                                 **vector_quantize_kwargs) for size in codebook_sizes]
        super().__init__(dim, codebook_dim, layers, quantize_dropout, quantize_dropout_cutoff_index,
                         quantize_dropout_multiple_of, accept_image_fmap, channel_last)
        self.shared_codebook = shared_codebook
        self.quant_grad_frac = float(quant_grad_frac)
        self.diveq = bool(diveq)
        self.implicit_neural_codebook = bool(implicit_neural_codebook)
        self.mlps = nn.ModuleList([
            ImplicitCodebookMLP(codebook_dim, l2norm_output=self.layers[0]._codebook.config.use_cosine_sim,
                                **(mlp_kwargs or {})) for _ in range(len(codebook_sizes) - 1)
        ]) if implicit_neural_codebook else None
        if implicit_neural_codebook and beam_size is not None:
            raise ValueError("beam search with implicit_neural_codebook is not supported")
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        self.register_buffer("beam_score_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        if shared_codebook:
            self._share_first_codebook(vector_quantize_kwargs.get("in_place_codebook_optimizer"))

    def _share_first_codebook(self, optimizer_factory) -> None:
        """Every layer uses (and updates) the first layer's codebook module, as in the reference."""
        shared = self.layers[0]._codebook
        for layer in self.layers[1:]:
            layer._codebook = shared
            if optimizer_factory is not None:  # the layer's optimizer must step the codebook it now uses
                layer.in_place_codebook_optimizer = optimizer_factory(shared.parameters())

    # ------------------------------------------------------------------ implicit neural codebook (QINCo)

    def layer_arguments(self, index: int, quantized_so_far: torch.Tensor | None) -> dict:
        if self.mlps is None or index == 0:
            return {}
        return {"codebook_transform_fn": functools.partial(self.mlps[index - 1], condition=quantized_so_far)}

    def layer_codes(self, index: int, codes: torch.Tensor, earlier: list[torch.Tensor]) -> torch.Tensor:
        """With an implicit neural codebook, a chosen code goes through its layer's MLP, conditioned on the sum
        of the codes before it."""
        if self.mlps is None or index == 0:
            return super().layer_codes(index, codes, earlier)
        return self.mlps[index - 1].transform(codes, functools.reduce(operator.add, earlier))

    def reparameterize(self, projected: torch.Tensor, quantized: torch.Tensor,
                       token_weights: torch.Tensor | None = None) -> torch.Tensor:
        """With ``diveq``, in training: the input plus the summed codes' error along its noisy direction (DiVeQ;
        1.32.0 applies it in eval too, where its output then is neither the codes nor deterministic).  Masked
        tokens stay as the layers left them (zeros), with no gradient to the input."""
        if not (self.diveq and self.training):
            return quantized
        uniform = draw_uniform({"diveq": (2, *quantized.shape)}, quantized.device)["diveq"]
        out = directional_reparam(projected, quantized, normal_from_uniform(uniform), DIVEQ_VARIANCE)
        return out if token_weights is None else torch.where(token_weights.unsqueeze(-1) > 0, out, quantized)

    def residual_gradient(self, quantized: torch.Tensor) -> torch.Tensor:
        """With ``quant_grad_frac`` > 0, that fraction of a layer's gradient also passes to the layers before it."""
        fraction = self.quant_grad_frac
        return quantized.detach() if fraction <= 0 else fraction * quantized + (1.0 - fraction) * quantized.detach()

    # ------------------------------------------------------------------ beam search

    def beam_for_call(self, beam_size: int | None) -> int | None:
        if beam_size is not None:
            positive_int("beam_size", beam_size)
        beam = beam_size if beam_size is not None else (self.beam_size if self.training else self.eval_beam_size)
        return beam if beam is not None and beam > 1 else None

    def beam_search_tokens(self, tokens, token_weights, beam_size, sample_codebook_temp, freeze_codebook,
                           num_quantizers, active_count) -> ResidualOutput:
        """``forward`` with a beam: the chosen path's codes, outputs and losses (a mean over kept tokens); in
        training the codebooks then learn from the chosen path's inputs and codes."""
        quantized, indices, losses, inputs = beam_search(self, tokens, token_weights, beam_size, sample_codebook_temp,
                                                         freeze_codebook, num_quantizers, active_count)
        if self.training and not freeze_codebook:
            for i, (layer, layer_input) in enumerate(zip(self.layers, inputs)):
                weights = token_weights
                if active_count is not None:
                    gate = (active_count > i).to(tokens.dtype)
                    weights = gate.expand(tokens.shape[:2]) if weights is None else weights * gate
                layer.update_from_token_indices_(layer_input, indices[..., i], weights, count_skipped=False)
            self.end_of_step_(inputs, token_weights, active_count)
        out = self.project_out(quantized)
        if token_weights is not None:
            out = self.layers[0].restore_padding(out, tokens, token_weights.unsqueeze(-1) > 0)
        return ResidualOutput(out, indices, masked_token_mean(losses, token_weights))

    def encode_tokens(self, tokens: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """Indices (b, n, q), greedy or with ``eval_beam_size`` (the export encoder searches the same beam)."""
        if self.eval_beam_size is None or self.eval_beam_size < 2:
            return super().encode_tokens(tokens, num_quantizers)
        return beam_search(self, tokens, None, self.eval_beam_size, num_quantizers=num_quantizers,
                           training=False)[1]

    def end_of_step_(self, layer_inputs, token_weights, active_count) -> None:
        """A shared codebook whose layers only track statistics (1.32.0's): the codes move once, after every
        layer, and codes still dead are replaced by rows of any kept layer."""
        codebook = self.layers[0]._codebook
        if not (self.shared_codebook and codebook.config.manual_ema_update and codebook.config.ema_update):
            return
        rows, weights = [], []
        for i, layer_input in enumerate(layer_inputs):
            rows.append(codebook.transform_input(layer_input.reshape(1, -1, layer_input.shape[-1])).float())
            weight = torch.ones(rows[-1].shape[:2], device=rows[-1].device) if token_weights is None \
                else token_weights.reshape(1, -1).float()
            weights.append(weight if active_count is None else weight * (active_count > i).float())
        rows, weights = torch.cat(rows, dim=1), torch.cat(weights, dim=1)
        codebook.end_of_shared_step_(rows, weights, codebook.dead_code_noise(rows.shape[1], rows.device))

    @property
    def codebooks(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """(q, codebook_size, codebook_dim); a tuple of each layer's (codebook_size, codebook_dim) when the
        layers' sizes differ (as the reference)."""
        codebooks = tuple(layer.codebook for layer in self.layers)
        return torch.stack(codebooks) if len(set(self.codebook_sizes)) == 1 else codebooks


def _layer_codebook_sizes(codebook_size, num_quantizers) -> tuple[int, ...]:
    """``codebook_size`` (an int, or a tuple/list of one per layer) -> one size per layer, checked."""
    if num_quantizers is not None:
        positive_int("num_quantizers", num_quantizers)
    if isinstance(codebook_size, (tuple, list)):
        sizes = tuple(codebook_size)
        if not sizes or num_quantizers not in (None, len(sizes)):
            raise ValueError(f"codebook_size must give one size per quantizer ({num_quantizers}), got {codebook_size!r}")
        for size in sizes:
            positive_int("each codebook_size", size)
        return sizes
    if num_quantizers is None:
        raise TypeError("ResidualVQ needs num_quantizers, or codebook_size as a tuple of one size per layer")
    positive_int("codebook_size", codebook_size)
    return (codebook_size,) * num_quantizers


@records_config
class GroupedResidualVQ(GroupedResidualQuantizer):
    """ResidualVQ over ``groups`` slices of the features; ``kwargs`` go to each group's ResidualVQ."""

    def __init__(self, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        channel_last = kwargs.get("channel_last", True)

        def make_group(dim_per_group: int) -> ResidualVQ:
            return ResidualVQ(dim=dim_per_group, accept_image_fmap=accept_image_fmap, **kwargs)

        super().__init__(dim, groups, make_group, accept_image_fmap, channel_last)

    @property
    def codebooks(self) -> torch.Tensor:
        """(groups, q, codebook_size, codebook_dim)."""
        return torch.stack([rvq.codebooks for rvq in self.rvqs])
