"""Helpers shared by the test modules."""

import copy

import torch

DIM = 16
CODEBOOK_SIZE = 32


def input_for(vq: torch.nn.Module, batch: int = 2, tokens: int = 12, requires_grad: bool = False) -> torch.Tensor:
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


def _flat(outputs):
    for out in outputs:
        if isinstance(out, (tuple, list)):
            yield from _flat(out)
        else:
            yield out


def compare_eager_compiled(eager, compiled, make_input, kwargs_for, steps=3, atol=1e-5, state_rtol=1e-5):
    """Run ``steps`` steps of both modules from one seed each step and compare: integer outputs equal;
    float outputs, the input gradient, parameter gradients and every buffer within ``atol``
    (buffers also within ``state_rtol`` relative: EMA sums of large values accumulate rounding)."""
    params_e = dict(eager.named_parameters())
    params_c = dict(compiled._orig_mod.named_parameters())
    for step in range(steps):
        x = make_input()
        kwargs = kwargs_for(x)
        for p in (*params_e.values(), *params_c.values()):
            p.grad = None
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(100 + step)
        out_e = list(_flat([eager(xe, **kwargs)]))
        torch.manual_seed(100 + step)
        out_c = list(_flat([compiled(xc, **kwargs)]))
        assert len(out_e) == len(out_c)
        for a, b in zip(out_e, out_c):
            if a.dtype.is_floating_point:
                torch.testing.assert_close(a, b, atol=atol, rtol=1e-6)
            else:
                assert torch.equal(a, b), f"indices differ at step {step}"
        if torch.is_grad_enabled() and eager.training and any(o.requires_grad for o in out_e):
            sum(o.float().sum() for o in out_e if o.dtype.is_floating_point).backward()
            sum(o.float().sum() for o in out_c if o.dtype.is_floating_point).backward()
            torch.testing.assert_close(xe.grad, xc.grad, atol=atol, rtol=0)
            for name, p in params_e.items():
                if p.grad is not None or params_c[name].grad is not None:
                    torch.testing.assert_close(p.grad, params_c[name].grad, atol=atol, rtol=atol, msg=name)
        assert_state_close(eager, compiled._orig_mod, rtol=state_rtol)


def assert_state_close(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """Every buffer and parameter equal within atol + rtol * |value| (dead codes can grow large)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
