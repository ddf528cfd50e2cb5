"""``Sequential``: modules around exactly one quantizer (1.32.0's ``vector_quantize_pytorch.utils.Sequential``).

Modules before the quantizer transform its input, modules after transform its quantized output; the forward's
keyword arguments go to the quantizer, and its other outputs (indices, losses) pass through:
``Sequential(nn.Linear(512, 64), VectorQuantize(dim=64, codebook_size=1024), nn.Linear(64, 512))(x)`` returns
``(out, indices, loss)``.  ``export`` takes one directly: the modules before become the encoder network of the
bundle and the modules after its decoder network.
"""

from __future__ import annotations

from torch import nn


def is_quantizer(module: nn.Module) -> bool:
    """vqdeploy's quantizer classes (those a bundle can hold, and the hierarchical one)."""
    from .bundle_format import quantizer_classes

    return isinstance(module, tuple(quantizer_classes().values()))


class Sequential(nn.Module):
    """Modules with exactly one vqdeploy quantizer among them (state keys ``fns.{i}``, as the reference's)."""

    def __init__(self, *fns: nn.Module):
        super().__init__()
        for fn in fns:
            if not isinstance(fn, nn.Module):
                raise TypeError(f"Sequential takes modules, got {type(fn).__name__}")
        positions = [i for i, fn in enumerate(fns) if is_quantizer(fn)]
        if len(positions) != 1:
            raise ValueError(f"Sequential must hold exactly one quantizer, got {len(positions)}")
        self.fns = nn.ModuleList(fns)
        self.quantizer_index = positions[0]

    @property
    def quantizer(self) -> nn.Module:
        return self.fns[self.quantizer_index]

    @property
    def before(self) -> nn.Sequential:
        """The modules that feed the quantizer (an encoder network)."""
        return nn.Sequential(*self.fns[:self.quantizer_index])

    @property
    def after(self) -> nn.Sequential:
        """The modules that take the quantized output (a decoder network)."""
        return nn.Sequential(*self.fns[self.quantizer_index + 1:])

    def forward(self, x, **kwargs):
        rest = ()
        for i, fn in enumerate(self.fns):
            if i == self.quantizer_index:
                x, *rest = fn(x, **kwargs)
            else:
                x = fn(x)
        return (x, *rest)
