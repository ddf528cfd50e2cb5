"""The tolerances of tolerances.py catch wrong updates: an EMA with its decay swapped (decay <-> 1 - decay) fails
the compile, parity and distributed comparisons, and an EMA biased by one ulp per step fails the compile
comparison through its drift check, while the same comparisons pass the correct updates (the compile and
parity suites).  Each injected error touches the compiled (or vqdeploy's) side only."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import vector_quantize_pytorch as vqp  # the reference, a test dependency

import vqdeploy.codebooks as codebooks
from vqdeploy import ResidualVQ, VectorQuantize

from helpers import CODEBOOK_SIZE, DIM, compare_eager_compiled, input_for, twin
from tolerances import assert_state_close

CASES = {
    "default": (VectorQuantize, {}),
    "kmeans_cosine": (VectorQuantize, dict(kmeans_init=True, kmeans_iters=2, use_cosine_sim=True)),
    "affine": (VectorQuantize, dict(affine_param=True)),
    "residual": (ResidualVQ, dict(num_quantizers=2)),
}


def _build(name, **overrides):
    cls, options = CASES[name]
    return cls(dim=DIM, codebook_size=CODEBOOK_SIZE, **{**options, **overrides})


def _compiled_twin(eager, name, **overrides):
    other = _build(name, **overrides)
    other.load_state_dict(eager.state_dict())
    return torch.compile(other, fullgraph=True)


@pytest.mark.parametrize("name", ["default", "affine"])
def test_a_swapped_decay_fails_the_compile_comparison(name):
    torch.manual_seed(0)
    eager = _build(name, decay=0.8)
    with pytest.raises(AssertionError):
        compare_eager_compiled(eager, _compiled_twin(eager, name, decay=0.2), lambda: input_for(eager, tokens=24),
                               lambda x: {})


def _biased_ema(monkeypatch):
    """The EMA one ulp high on every element, in compiled graphs only (eager runs stay correct)."""
    correct = codebooks.ema

    def ema(old, new, decay, weight=None):
        value = correct(old, new, decay, weight)
        if torch.compiler.is_compiling():
            return torch.nextafter(value, torch.full_like(value, float("inf")))
        return value

    monkeypatch.setattr(codebooks, "ema", ema)


@pytest.mark.parametrize("name", list(CASES))
def test_a_one_ulp_per_step_bias_fails_the_compile_comparison(name, monkeypatch):
    torch.manual_seed(0)
    eager = _build(name)
    compiled = torch.compile(twin(eager), fullgraph=True)
    _biased_ema(monkeypatch)
    with pytest.raises(AssertionError, match="drifts"):
        compare_eager_compiled(eager, compiled, lambda: input_for(eager, tokens=24), lambda x: {})


def test_a_swapped_decay_fails_the_parity_and_distributed_comparisons(tmp_path):
    """One EMA step from a reference checkpoint: vqdeploy with decay 0.8 agrees with the reference up to
    rounding, with decay 0.2 it fails the comparison the parity and distributed suites use."""
    torch.manual_seed(0)
    ref = vqp.VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, decay=0.8)
    ref(torch.randn(2, 24, DIM))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "ref.safetensors"))
    x = torch.randn(2, 24, DIM)
    states = {}
    for decay in (0.8, 0.2):
        ours = VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, decay=decay)
        ours.load_state_dict(load_file(str(tmp_path / "ref.safetensors")))
        ours(x)
        states[decay] = {k: v for k, v in ours.state_dict().items() if k in ref.state_dict()}
    ref(x)
    assert_state_close(states[0.8], ref.state_dict(), n=x.numel(), data=x)
    with pytest.raises(AssertionError):
        assert_state_close(states[0.2], ref.state_dict(), n=x.numel(), data=x)
