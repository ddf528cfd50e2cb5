"""Helpers shared by the test modules."""

import copy

import torch

from vqdeploy import VectorQuantize

DIM = 16
CODEBOOK_SIZE = 32


def input_for(vq: VectorQuantize, batch: int = 2, tokens: int = 12, requires_grad: bool = False) -> torch.Tensor:
    """A random input in the layout ``vq`` expects."""
    if vq.accept_image_fmap:
        shape = (batch, vq.dim, 3, 4)
    elif not vq.channel_last:
        shape = (batch, vq.dim, tokens)
    else:
        shape = (batch, tokens, vq.dim)
    return torch.randn(shape, requires_grad=requires_grad)


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with the same parameters and buffers."""
    return copy.deepcopy(module)


def assert_state_close(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Every buffer and parameter equal within atol + rtol * |value| (dead codes can grow large)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
