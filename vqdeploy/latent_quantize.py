"""LatentQuantize: latent quantization (Hsu et al., https://arxiv.org/abs/2305.18378).

Every latent channel has its own small scalar codebook ("values"), initialised
to ``levels[i]`` evenly spaced values in [-0.5, 0.5] and learned.  A token is
quantized channel by channel to the nearest value, and its index is the
mixed-radix number of the chosen level indices, as in FSQ.  The API follows
vector-quantize-pytorch 1.32.0 (every input channel-first, values always a
ParameterList, ``codebook_dim``), or 1.14.17 under its defaults; checkpoints of
either load into either.  The gradients follow the paper (see the README's
deliberate differences):

- the commitment term pulls the input towards its quantized value;
- the quantization term pulls the values towards the input, so the values learn
  (in the reference both terms pass through a straight-through estimator and
  the values never receive a gradient);
- indices are the chosen level indices, so decoding gives back the learned
  values ``forward`` returned (the reference recomputes indices from the values
  by truncation and decodes to the initial grid).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .checks import number, positive_int
from .config import records_config
from .defaults import behaves_as_latest, release_for
from .fsq import check_levels
from .grid import GridQuantizer
from .primitives import masked_mse


class LatentQuantizeOutput(NamedTuple):
    """What ``LatentQuantize.forward`` returns; unpacks like the reference's tuple."""

    quantized: torch.Tensor  # the input's shape
    indices: torch.Tensor  # int32 (b, *tokens) or (b, *tokens, num_codebooks)
    loss: torch.Tensor  # 0-d: weighted commitment and quantization terms (0 in eval)


def initial_values(level: int) -> torch.Tensor:
    """The reference's starting values: zero in the middle for odd levels, -0.5 first for all."""
    return torch.linspace(-0.5, 0.5, level) if level % 2 == 1 else torch.arange(level) / level - 0.5


def _straight_through(values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Exactly ``values`` in value (``z - z.detach()`` is zero), with the gradient going to z."""
    return values.detach().to(z.dtype) + (z - z.detach())


class FixedValues(nn.Module):
    """Values of unequal levels that do not train (``optimize_values=False``): buffers that follow
    ``.to()`` but, like the reference's plain list, stay out of checkpoints."""

    def __init__(self, values: Sequence[torch.Tensor]):
        super().__init__()
        for i, value in enumerate(values):
            self.register_buffer(str(i), value, persistent=False)

    def __getitem__(self, i: int) -> torch.Tensor:
        return list(self._buffers.values())[i]

    def __len__(self) -> int:
        return len(self._buffers)

    def __iter__(self):
        return iter(self._buffers.values())


@records_config
class LatentQuantize(GridQuantizer):
    """Per-channel learned scalar codebooks over ``num_codebooks`` groups of ``len(levels)`` channels."""

    def __init__(self, levels: Sequence[int] | int, dim: int | None = None,
                 commitment_loss_weight: float = 0.1, quantization_loss_weight: float = 0.1,
                 num_codebooks: int = 1, keep_num_codebooks_dim: bool | None = None, optimize_values: bool = True,
                 in_place_codebook_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 pad: bool = False, codebook_dim: int = -1, defaults: str | None = None):
        super().__init__()
        self.defaults_release = release = release_for(defaults)
        if not isinstance(codebook_dim, int) or isinstance(codebook_dim, bool) or not (codebook_dim == -1
                                                                                       or codebook_dim > 0):
            raise ValueError(f"codebook_dim must be -1 (the number of levels) or a positive int, got {codebook_dim!r}")
        if isinstance(levels, int) and not isinstance(levels, bool):
            if codebook_dim == -1 and dim is None:
                raise ValueError("levels given as one int needs codebook_dim (1.32.0) or dim (1.14.17 repeats it "
                                 "dim times)")
            count = codebook_dim if codebook_dim > 0 else dim
            positive_int("codebook_dim" if codebook_dim > 0 else "dim", count)
            levels = [levels] * count
        levels = check_levels(levels)
        if codebook_dim > 0 and codebook_dim != len(levels):
            raise ValueError(f"codebook_dim={codebook_dim} must equal the number of levels ({len(levels)})")
        number("commitment_loss_weight", commitment_loss_weight, 0.0)
        number("quantization_loss_weight", quantization_loss_weight, 0.0)
        if in_place_codebook_optimizer is not None and not optimize_values:
            raise ValueError("in_place_codebook_optimizer needs optimize_values=True (fixed values have nothing "
                             "to optimize)")

        self.levels = levels
        self._init_groups(len(levels), num_codebooks, keep_num_codebooks_dim, dim)
        self.codebook_size = math.prod(levels)
        self.commitment_loss_weight = commitment_loss_weight
        self.quantization_loss_weight = quantization_loss_weight
        self.optimize_values = optimize_values
        self.pad = pad  # accepted for 1.14.17's signature; it does not use it either
        # 1.32.0 reads every input channel-first: (b, dim, n) sequences too
        self.channel_first = behaves_as_latest(release, "LatentQuantize", "layout of (b, x, y) input")

        self._init_levels(levels)
        max_level = max(levels)
        self.register_buffer("_level_valid", torch.arange(max_level) < self._levels.unsqueeze(-1), persistent=False)

        # the release's storage: 1.32.0 keeps one tensor per channel (values_per_latent.i); 1.14.17 one
        # (codebook_dim, level) tensor when the levels are equal.  Parameters when they train; fixed values are
        # buffers, saved only as 1.14.17 saved them (equal levels).  _adapt_values loads either form.
        self.equal_levels = len(set(levels)) == 1
        self.values_as_tensor = self.equal_levels and not behaves_as_latest(release, "LatentQuantize",
                                                                            "values of equal levels")
        values = [initial_values(level) for level in levels]
        if self.values_as_tensor:
            table = torch.stack(values)
            if optimize_values:
                self.values_per_latent = nn.Parameter(table)
            else:
                self.register_buffer("values_per_latent", table)
        elif optimize_values:
            self.values_per_latent = nn.ParameterList([nn.Parameter(v) for v in values])
        else:
            self.values_per_latent = FixedValues(values)
        self._register_load_state_dict_pre_hook(self._adapt_values)

        self.in_place_codebook_optimizer = None
        if in_place_codebook_optimizer is not None:
            self.in_place_codebook_optimizer = in_place_codebook_optimizer(self._value_parameters())

    def _adapt_values(self, state_dict: dict, prefix: str, *args) -> None:
        """Checkpoints of either storage load: one (codebook_dim, level) tensor is split into per-channel
        entries, per-channel entries of equal levels are stacked, and fixed values that this module does not
        save are copied in (or, missing from the checkpoint, kept)."""
        one, per_channel = prefix + "values_per_latent", [f"{prefix}values_per_latent.{i}"
                                                           for i in range(self.codebook_dim)]
        if self.values_as_tensor:
            if one not in state_dict and all(key in state_dict for key in per_channel):
                state_dict[one] = torch.stack([state_dict.pop(key) for key in per_channel])
            if one not in state_dict and not self.optimize_values:
                state_dict[one] = self.values_per_latent.detach().clone()
            return
        if one in state_dict and isinstance(state_dict[one], torch.Tensor) and state_dict[one].ndim == 2:
            state_dict.update(zip(per_channel, state_dict.pop(one).unbind(0)))
        if not self.optimize_values:  # FixedValues are not saved: take the checkpoint's, if it has them
            with torch.no_grad():
                for key, value in zip(per_channel, self.values_per_latent):
                    if key in state_dict:
                        value.copy_(state_dict.pop(key))

    def _value_parameters(self) -> list[nn.Parameter]:
        return [self.values_per_latent] if self.values_as_tensor else list(self.values_per_latent)

    # ------------------------------------------------------------------ values and the grid

    def value_table(self) -> torch.Tensor:
        """All channels' values as one (codebook_dim, max level) tensor, zero-padded for unequal levels
        (``_level_valid`` marks the real entries); gradients reach the stored values."""
        if self.values_as_tensor:
            return self.values_per_latent
        width = self._level_valid.shape[-1]
        return torch.stack([F.pad(v, (0, width - v.shape[0])) for v in self.values_per_latent])

    def level_indices(self, z: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Each channel's nearest value: z (..., codebook_dim) -> level indices (..., codebook_dim)."""
        table = self.value_table() if table is None else table
        dtype = torch.promote_types(z.dtype, table.dtype)  # as the reference: half inputs meet float32 values
        distance = (z.unsqueeze(-1).to(dtype) - table.to(dtype)).abs()
        if not self.equal_levels:
            distance = distance.masked_fill(~self._level_valid, float("inf"))
        return distance.argmin(dim=-1)

    def level_values(self, level_indices: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """Level indices (..., codebook_dim) -> the values they select, differentiable in the values.
        A one-hot product over the (few) levels: its backward is a plain reduction, not a scatter."""
        table = self.value_table() if table is None else table
        one_hot = level_indices.unsqueeze(-1) == torch.arange(table.shape[-1], device=table.device)
        return (one_hot.to(table.dtype) * table).sum(dim=-1)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., codebook_dim) -> the nearest values, with a straight-through gradient to z.
        The value is exactly the selected value (``z - z.detach()`` is zero)."""
        return _straight_through(self.level_values(self.level_indices(z)), z)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        """Codes (..., codebook_dim) -> int32 indices of the nearest grid point of the current values."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"codes must end with {self.codebook_dim} channels, got shape {tuple(zhat.shape)}")
        return self.level_indices_to_indices(self.level_indices(zhat))

    def _indices_from_levels(self, level_indices: torch.Tensor) -> torch.Tensor:
        """Level indices (b, n, c, codebook_dim) -> int32 indices (b, n, c), or (b, n) unless c is kept."""
        indices = self.level_indices_to_indices(level_indices)
        return indices if self.keep_num_codebooks_dim else indices[..., 0]

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (..., num_codebooks * codebook_dim) for indices, before ``project_out``."""
        codes = self.level_values(self.indices_to_level_indices(indices))
        return rearrange(codes, "... c d -> ... (c d)") if self.keep_num_codebooks_dim else codes

    @property
    def implicit_codebook(self) -> torch.Tensor:
        """Every code of one codebook (codebook_size, codebook_dim), from the current values."""
        indices = torch.arange(self.codebook_size, device=self._levels.device)
        return self.level_values(self.indices_to_level_indices(indices)).detach()

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """Indices -> the codes ``forward`` returns for them (after ``project_out`` unless told otherwise),
        channel-first (1.32.0), or under 1.14.17's defaults only for images and video."""
        return self._decode_indices(indices, project_out, channel_first=self.channel_first)

    # ------------------------------------------------------------------ forward

    def forward(self, z: torch.Tensor) -> LatentQuantizeOutput:
        """z: channel-first (b, dim, n) or images/video (b, dim, *spatial); under 1.14.17's defaults sequences
        come (b, n, dim).  Returns ``(quantized, indices, loss)``; the loss is 0 in eval."""
        tokens, layout = self._tokens(z)
        if self.training:  # channel-first input: one copy, then the loss's passes read rows in order
            tokens = tokens.contiguous()
        rows = self._split_codebooks(tokens)
        if self.in_place_codebook_optimizer is not None and self.training:
            self._in_place_values_step(rows)
        table = self.value_table()
        level_indices = self.level_indices(rows, table)
        values = self.level_values(level_indices, table)
        codes = _straight_through(values, rows)
        out = self.project_out(rearrange(codes, "b n c d -> b n (c d)"))
        indices = self._indices_from_levels(level_indices)
        loss = self._loss(tokens, values, out.dtype) if self.training else torch.zeros((), device=tokens.device)
        out = layout.restore_features(out.to(tokens.dtype))
        return LatentQuantizeOutput(out, layout.restore_indices(indices), loss)

    def _split_codebooks(self, tokens: torch.Tensor) -> torch.Tensor:
        # the projections run in their own dtype (the reference fails on half input otherwise)
        return rearrange(self._project_in(tokens), "b n (c d) -> b n c d", c=self.num_codebooks)

    def _loss(self, tokens: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Both terms have the reference's value, mse(input, quantized), taken over the tokens free of NaN/Inf
        so that bad tokens cannot reach the values through a gradient.  A token counts as bad when its feature
        sum is not finite (one reduction; a sum that overflows float marks bad data too)."""
        kept = torch.isfinite(tokens.detach().sum(dim=-1, keepdim=True))
        count = (kept.sum() * tokens.shape[-1]).clamp(min=1)
        if self.in_place_codebook_optimizer is not None:  # the values are that optimizer's to move
            values = values.detach()
        # equal to ``out`` in value, but finite for bad tokens and differentiable in the values
        decoded = self.project_out(rearrange(values.to(out_dtype), "b n c d -> b n (c d)"))
        partner = decoded.detach()  # replaces a bad token, so that its error and gradient are exactly 0
        loss = torch.zeros((), device=tokens.device)
        if self.commitment_loss_weight > 0:  # moves the input (the encoder)
            error = F.mse_loss(torch.where(kept, tokens, partner).float(), partner.float(), reduction="sum")
            loss = loss + self.commitment_loss_weight * error / count
        if self.quantization_loss_weight > 0:  # moves the values
            error = F.mse_loss(decoded.float(), torch.where(kept, tokens.detach(), partner).float(), reduction="sum")
            loss = loss + self.quantization_loss_weight * error / count
        return loss

    @torch.compiler.disable
    def _in_place_values_step(self, rows: torch.Tensor) -> None:
        """One step of the user's optimizer on mse(values, z) before quantizing, as VectorQuantize does for
        its codebook.  It runs a user's optimizer, so it stays eager (a graph break under torch.compile)."""
        rows = rows.detach()
        table = self.value_table()
        values = self.level_values(self.level_indices(rows, table), table).to(rows.dtype)
        rows, values = rows.flatten(2), values.flatten(2)  # (b, n, c * d)
        loss = masked_mse(values, rows, torch.isfinite(rows).all(dim=-1).float())
        loss.backward(inputs=self._value_parameters())
        self.in_place_codebook_optimizer.step()
        self.in_place_codebook_optimizer.zero_grad()

    # ------------------------------------------------------------------ pure eval API

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices for z, without touching any state (the export encoder)."""
        tokens, layout = self._tokens(z)
        return layout.restore_indices(self._indices_from_levels(self.level_indices(self._split_codebooks(tokens))))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices_to_codes``: the quantized output for indices (the export decoder)."""
        return self.indices_to_codes(indices)
