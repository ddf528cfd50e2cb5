"""The implicit neural codebook of QINCo (Huijben et al. 2024, arXiv 2401.14732), 1.32.0's
``ResidualVQ(implicit_neural_codebook=True)``: every layer after the first sees its codes through an MLP
conditioned on the sum of the codes chosen so far, so each token gets codes adapted to where it already is.

The MLP's names and shapes are 1.32.0's (state keys ``mlps.{i}.proj_in.*``, ``mlps.{i}.layers.{j}.{0,2}.*``).
``forward(codes, condition=...)`` gives every token its whole transformed codebook (what matching needs);
``transform`` maps codes already paired with tokens, row by row (what decoding needs: the chosen code only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn


class ImplicitCodebookMLP(nn.Module):
    """``proj_in`` of [condition, code] (2 dim -> dim), then ``depth`` residual blocks Linear-SiLU-Linear."""

    def __init__(self, dim: int, dim_hidden: int | None = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim))
                                     for _ in range(depth)])
        self.l2norm_output = l2norm_output

    def transform(self, codes: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Codes (..., dim) with each row's condition (..., dim) -> transformed codes (..., dim)."""
        x = self.proj_in(torch.cat((condition, codes), dim=-1))
        for layer in self.layers:
            x = layer(x) + x
        return F.normalize(x, dim=-1) if self.l2norm_output else x

    def forward(self, codes: torch.Tensor, *, condition: torch.Tensor) -> torch.Tensor:
        """Codes (k, dim) or (h, k, dim) and the running sum (b, n, dim) -> every token's codes (b, n, k, dim) or
        (h, b, n, k, dim), as the reference's MLP."""
        one_headed = codes.ndim == 2
        codes = codes.unsqueeze(0) if one_headed else codes
        condition = condition.reshape(condition.shape[0], -1, condition.shape[-1])
        h, k = codes.shape[:2]
        b, n = condition.shape[:2]
        out = self.transform(repeat(codes, "h k d -> h b n k d", b=b, n=n),
                             repeat(condition, "b n d -> h b n k d", h=h, k=k))
        return out[0] if one_headed else out
