"""The fused nearest-code search (vqdeploy.search): its error bound, its results in Triton's interpreter
against float64 on adversarial data, its place in a compiled graph, its dispatch, and its build for the GPU.

The kernel's GPU runs are in test_cuda.py; here it runs on the CPU in Triton's interpreter (a subprocess with
TRITON_INTERPRET=1, which Triton reads when it is imported), with tensor-core rounding emulated."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import search_cases
from vqdeploy.primitives import nearest_codes, nearest_codes_torch
from vqdeploy.search import (SCORE_PRECISIONS, fused_search_settings, fused_search_used, round_operand,
                             score_error)
from vqdeploy.search.bounds import check_precision

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------- the bound


def _bound_data(name: str, g: torch.Generator):
    if name == "aligned":  # rows parallel to codes: Cauchy-Schwarz is tight, rounding errors add up
        codes = torch.rand(1, 64, 256, generator=g) + 0.5
        return codes[:, :48] * 1.5, codes
    if name == "offset":  # data far from the origin: only the centering keeps the bound useful
        return (torch.randn(1, 48, 64, generator=g) + 300.0, torch.randn(1, 64, 64, generator=g) + 300.0)
    return torch.randn(1, 48, 128, generator=g) * 10, torch.randn(1, 64, 128, generator=g) * 10


@pytest.mark.parametrize("precision", sorted(SCORE_PRECISIONS))
@pytest.mark.parametrize("data", ["gaussian", "aligned", "offset"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_bound_covers_tensor_core_scores(precision, data, cosine):
    """Scores from operands rounded as tensor cores round them, summed in float32, stay within E_j of the exact
    ones (float64); on spread-out data the bound is below the spread of the scores (data in one narrow cone:
    aligned rows, or offset ones once normalized, is where it is not, and where the kernel falls back)."""
    x, codes = _bound_data(data, torch.Generator().manual_seed(1))
    if cosine:
        x, codes = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(codes, dim=-1)
        x, codes = x[0], codes[0]
        approx = -(round_operand(x, precision) @ round_operand(codes, precision).t())
        exact = -(x.double() @ codes.double().t())
        bound = score_error(x, round_operand(x, precision), codes, round_operand(codes, precision), True)
    else:
        center = codes.mean(dim=1, keepdim=True)
        xc, cc = (x - center)[0], (codes - center)[0]
        approx = cc.square().sum(dim=-1) - 2 * (round_operand(xc, precision) @ round_operand(cc, precision).t())
        exact = (x[0].double().unsqueeze(1) - codes[0].double().unsqueeze(0)).square().sum(dim=-1) \
            - xc.double().square().sum(dim=-1, keepdim=True)
        bound = score_error(xc, round_operand(xc, precision), cc, round_operand(cc, precision))
    error = (approx.double() - exact).abs()
    assert (error <= bound.double()).all(), (error / bound).max().item()
    if data == "gaussian" or (data == "offset" and not cosine):
        assert bound.max() < exact.std(), (bound.max().item(), exact.std().item())


def test_bound_is_far_below_the_unit_roundoff_bound_on_gaussian_data():
    """Measured rounding residuals, not the worst case: on Gaussian rows and codes of dimension 256, E_j for
    bf16 scores is well under half of what the unit roundoff (2^-8 on both operands) would give."""
    g = torch.Generator().manual_seed(2)
    x, codes = torch.randn(64, 256, generator=g), torch.randn(128, 256, generator=g)
    bound = score_error(x, round_operand(x, "bf16"), codes, round_operand(codes, "bf16"))
    worst_case = 2 * 2 * (2 * 2.0 ** -8) * x.norm(dim=-1, keepdim=True) * codes.norm(dim=-1)
    assert (bound < 0.5 * worst_case).all()


def test_bound_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        check_precision("fp8")


# ------------------------------------------------------------------------------- the kernel, interpreted


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(HERE / "search_worker.py")], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


RUNS = [f"{name}-bf16-16" for name in search_cases.CASES] + [
    "gaussian-tf32-8", "large_norms-tf32-8", "cosine-tf32-8", "near_ties-bf16-1", "exact_duplicates-bf16-1"]


@pytest.mark.parametrize("run", RUNS)
def test_fused_search_equals_float64(interpreted, run):
    result = interpreted["searches"][run]
    assert result["exact"] == 1.0, result


def test_fallback_is_taken_where_candidates_cannot_be_certified(interpreted):
    """Clusters of near-duplicates larger than the kept candidates, or one candidate among exact duplicates:
    nothing is certified, every row goes through the float64 search, and the answer is still exact (where
    float32 torch is wrong for most rows of the first)."""
    searches = interpreted["searches"]
    assert searches["near_duplicates-bf16-16"]["certified"] == 0.0
    assert searches["near_duplicates-bf16-16"]["torch_float32"] < 0.5
    assert searches["exact_duplicates-bf16-1"]["certified"] == 0.0


def test_fast_path_certifies_ordinary_and_offset_data(interpreted):
    """Gaussian data, and data offset by 1000 (where float32 torch errs on about half of the rows), are
    certified from the kept candidates: the fallback stays the rare path."""
    searches = interpreted["searches"]
    for run in ("gaussian-bf16-16", "gaussian-tf32-8", "large_norms-bf16-16", "cosine-bf16-16"):
        assert searches[run]["certified"] >= 0.95, (run, searches[run])
    assert searches["large_norms-bf16-16"]["torch_float32"] < 0.9


def test_fused_search_compiles_into_one_graph(interpreted):
    assert interpreted["compiled"] == dict(equal=True, exact=1.0)


def test_prepared_codes_match_torch(interpreted):
    """Codes rounded by the kernel's integer arithmetic equal torch's round-to-nearest-even casts, bit for bit."""
    assert interpreted["prepared"] == dict(bf16=True, tf32=True, ieee=True)


def test_quantizer_with_fused_search_matches_torch_path(interpreted):
    assert interpreted["quantizer"] == dict(eval=True, train=True, input_grad=True, codebook=True)


# ------------------------------------------------------------------------------------------ dispatch


def test_cpu_keeps_the_torch_path():
    x, codes = torch.randn(2, 30, 16), torch.randn(2, 20, 16)
    assert not fused_search_used(x, codes)
    assert torch.equal(nearest_codes(x, codes), nearest_codes_torch(x, codes))


def test_settings_are_checked_and_restored():
    with pytest.raises(TypeError, match="unknown"):
        with fused_search_settings(speed="max"):
            pass
    with pytest.raises(ValueError, match="precision"):
        with fused_search_settings(precision="fp8"):
            pass
    with fused_search_settings(precision="tf32", candidates=8) as settings:
        assert (settings.precision, settings.candidates) == ("tf32", 8)
    with fused_search_settings() as settings:
        assert (settings.precision, settings.candidates) == ("bf16", 16)


def test_kernel_rejects_bad_input():
    from vqdeploy.search.kernel import fused_nearest

    with pytest.raises(ValueError, match="expected rows"):
        fused_nearest(torch.randn(4, 8), torch.randn(1, 4, 8))
    with pytest.raises(TypeError, match="float32"):
        fused_nearest(torch.randn(1, 4, 8, dtype=torch.float64), torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="empty"):
        fused_nearest(torch.randn(1, 4, 8), torch.randn(1, 0, 8))
    with pytest.raises(ValueError, match="CUDA"):  # the interpreter is not on in this process
        fused_nearest(torch.randn(1, 4, 8), torch.randn(1, 4, 8))


# ------------------------------------------------------------------------------- the build for the GPU


def test_kernel_builds_for_hopper():
    """The default tile configuration compiles to a cubin for sm_90 on this CPU-only machine (type errors that
    the interpreter does not see show up here) and fits the shared memory of a block; 2 kept candidates instead
    of 16 unroll less and build faster, the rest is the same code.  ``python -m vqdeploy.search.build`` builds
    every configuration the autotuner tries, cosine included, with 16."""
    from vqdeploy.search.build import SHARED_MEMORY_LIMIT, build, build_prepare
    from vqdeploy.search.kernel import TUNING_CONFIGS

    kernel = build("bf16", False, dim=256, candidates=2, config=TUNING_CONFIGS["bf16"][0], arch=90)
    assert kernel.asm["cubin"]
    assert 0 < kernel.metadata.shared <= SHARED_MEMORY_LIMIT
    assert build_prepare("bf16", False, dim=256, arch=90).asm["cubin"]
