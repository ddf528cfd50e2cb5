"""Helpers shared by the test modules."""

import copy

import torch

from tolerances import assert_rounding_close, assert_state_close

DIM = 16
CODEBOOK_SIZE = 32


def input_for(vq: torch.nn.Module, batch: int = 2, tokens: int = 12, requires_grad: bool = False) -> torch.Tensor:
    """A random input in the layout ``vq`` expects."""
    if getattr(vq, "accept_3d_fmap", False):
        shape = (batch, vq.dim, 2, 3, tokens // 6)
    elif vq.accept_image_fmap:
        shape = (batch, vq.dim, 3, tokens // 3)
    elif not vq.channel_last:
        shape = (batch, vq.dim, tokens)
    else:
        shape = (batch, tokens, vq.dim)
    return torch.randn(shape, requires_grad=requires_grad)


def mask_for(quantizer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A bool mask over the tokens of ``x`` (b, *tokens) that drops the second half of the last batch
    element's last token axis."""
    image = getattr(quantizer, "accept_image_fmap", False) or x.ndim >= 4
    channel_first = image or not getattr(quantizer, "channel_last", True)
    tokens = x.shape[2:] if channel_first else x.shape[1:-1]
    mask = torch.ones(x.shape[0], *tokens, dtype=torch.bool)
    mask[-1, ..., tokens[-1] // 2:] = False
    return mask


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with the same parameters and buffers."""
    return copy.deepcopy(module)


def _flat(outputs):
    for out in outputs:
        if isinstance(out, (tuple, list)):
            yield from _flat(out)
        elif isinstance(out, dict):  # FSP's info
            yield from _flat(out.values())
        else:
            yield out


def compare_eager_compiled(eager, compiled, make_input, kwargs_for, steps=3):
    """Run ``steps`` steps of both modules from one seed each step and compare: integer outputs equal;
    float outputs, the input gradient, parameter gradients and every buffer within the rounding bound of
    ``tolerances`` for that many steps (and buffers free of drift)."""
    params_e = dict(eager.named_parameters())
    params_c = dict(compiled._orig_mod.named_parameters())
    for step in range(steps):
        x = make_input()
        kwargs = kwargs_for(x)
        bound = dict(steps=step + 1, n=x.numel(), data=x)
        for p in (*params_e.values(), *params_c.values()):
            p.grad = None
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        out_e = list(_flat([eager(xe, **kwargs)]))
        torch.manual_seed(100 + step)
        out_c = list(_flat([compiled(xc, **kwargs)]))
        assert len(out_e) == len(out_c)
        for i, (a, b) in enumerate(zip(out_e, out_c)):
            if a.dtype.is_floating_point:
                assert_rounding_close(b, a, **bound, msg=f"output {i} at step {step}")
            else:
                assert torch.equal(a, b), f"indices differ at step {step}"
        if torch.is_grad_enabled() and eager.training and any(o.requires_grad for o in out_e):
            sum(o.float().sum() for o in out_e if o.dtype.is_floating_point).backward()
            sum(o.float().sum() for o in out_c if o.dtype.is_floating_point).backward()
            assert_rounding_close(xc.grad, xe.grad, **bound, msg="input gradient")
            for name, p in params_e.items():
                if p.grad is not None or params_c[name].grad is not None:
                    assert_rounding_close(params_c[name].grad, p.grad, **bound, msg=f"{name} gradient")
        assert_state_close(compiled._orig_mod, eager, **bound)


def check_compiled(eager, make_input, kwargs_for=lambda x: {}, steps=2):
    """``compare_eager_compiled`` of ``eager`` against a compiled twin (fullgraph)."""
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, make_input, kwargs_for, steps=steps)
