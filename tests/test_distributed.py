"""2 ranks on gloo (CPU): codebooks stay identical across ranks, and 2 ranks x B equal 1 rank x 2B."""

import warnings

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from vqdeploy import LFQ, VectorQuantize

from dist_worker import lfq_rank, padded_rank, train_rank, unsynced_rank
from tolerances import assert_rounding_close, assert_state_close

WORLD = 2
BASE = dict(dim=8, codebook_size=16)


def _spawn(fn, tmp_path, *args):
    """Run ``fn`` on WORLD ranks and return each rank's saved tensors.

    gloo occasionally aborts a rank of a loaded machine (SIGABRT, seen about once in ten full-suite runs and
    never with the same test run alone); such a crash gets one more try on a fresh store, with the ranks'
    fault tracebacks reported.  A failing assertion inside a rank is never retried."""
    for attempt in range(2):
        store = str(tmp_path / f"store{attempt}")
        try:
            mp.spawn(fn, args=(WORLD, store, str(tmp_path), *args), nprocs=WORLD)
            break
        except mp.ProcessExitedException as crash:
            faults = "\n".join((tmp_path / f"fault{r}.log").read_text() for r in range(WORLD)
                               if (tmp_path / f"fault{r}.log").exists())
            if attempt == 1:
                raise AssertionError(f"a rank crashed twice: {crash}\n{faults}") from crash
            warnings.warn(f"a rank crashed ({crash}); retrying once\n{faults}")
    return [load_file(str(path)) if (path := tmp_path / f"rank{r}.safetensors").exists() else None
            for r in range(WORLD)]


def _run_two_ranks(options, batches, tmp_path, compiled, quantizer="VectorQuantize", micro_batches=1):
    data_path = str(tmp_path / "batches.safetensors")
    save_file({"batches": batches.contiguous()}, data_path)
    return _spawn(train_rank, tmp_path, options, data_path, compiled, quantizer, micro_batches)


def _batches(steps=4, batch=4, tokens=10, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # different statistics in each rank's half, so unsynchronised ranks would drift apart
    batches = torch.randn(steps, batch, tokens, dim, generator=g)
    batches[:, batch // 2:] = batches[:, batch // 2:] * 3 + 1
    return batches


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_ranks_hold_identical_codebooks(tmp_path, compiled):
    """k-means init, dead codes and affine statistics synchronised, in a ResidualVQ whose ranks draw their own
    quantize-dropout depths (seeded by rank): every layer still runs its collectives, so nothing deadlocks, and
    a layer dropped on one rank learns from the ranks that kept it."""
    options = dict(BASE, num_quantizers=3, quantize_dropout=True, kmeans_init=True, kmeans_iters=2,
                   threshold_ema_dead_code=1.5, affine_param=True, sync_affine_param=True)
    batches = _batches(steps=5)
    states = _run_two_ranks(options, batches, tmp_path, compiled, "ResidualVQ")
    assert_state_close(states[1], states[0], steps=batches.shape[0], n=batches[0].numel(), data=batches)
    assert all(float(states[0][f"layers.{i}._codebook.initted"]) == 1.0 for i in range(3))


@pytest.mark.parametrize("cosine, compiled, micro_batches", [(False, False, 1), (True, False, 1), (True, True, 1),
                                                            (False, False, 2)],
                         ids=["euclidean-eager", "cosine-eager", "cosine-compiled", "accumulated-eager"])
def test_two_ranks_equal_one_rank_with_double_batch(tmp_path, compiled, cosine, micro_batches):
    """Also with each rank's share in two micro-batches, the first only accumulating its EMA statistics."""
    options = dict(BASE, use_cosine_sim=cosine)
    batches = _batches()
    states = _run_two_ranks(options, batches, tmp_path, compiled, micro_batches=micro_batches)

    torch.manual_seed(0)
    single = VectorQuantize(**options)
    for step in range(batches.shape[0]):
        single(batches[step])
    for rank in range(WORLD):  # the all-reduced sums differ from one process's by summation order only
        assert_state_close(states[rank], single, steps=batches.shape[0], n=batches[0].numel(), data=batches)


def test_unsynchronised_codebooks_run_no_collectives(tmp_path):
    states = _spawn(unsynced_rank, tmp_path)
    assert float(states[0]["initted"]) == 1.0


def test_replacement_rows_come_from_ranks_with_real_rows(tmp_path):
    states = _spawn(padded_rank, tmp_path)
    torch.testing.assert_close(states[0]["embed"], states[1]["embed"], atol=0, rtol=0)
    real_rows = states[0]["x"].reshape(-1, 8)
    for code in states[0]["embed"]:
        assert (code == real_rows).all(dim=-1).any(), "a replaced code is not one of rank 0's rows"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_lfq_entropy_of_two_ranks_equals_one_rank_with_double_batch(tmp_path, compiled):
    """The batch entropy (and the per-sample one) are of both ranks' kept tokens, which differ in number: each
    rank's aux loss equals one process's on the whole batch, each rank's input gradient is the world size times
    that process's (every rank's loss reads the summed distribution) and the ranks' mean parameter gradient, what
    DDP applies, equals it.  Spherical codes of 2^10 over a cosine-similarity projection."""
    options = dict(dim=8, codebook_size=2**10, spherical=True, cosine_sim_project_in=True)
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(4, 10, 8, generator=g), torch.randn(4, 10, 8, generator=g)
    x[2:] = x[2:] * 3 + 1  # rank 1's tokens differ in distribution
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[3, 4:] = False  # rank 1 keeps fewer tokens than rank 0
    path = str(tmp_path / "data.safetensors")
    save_file({"x": x, "grad": grad, "mask": mask}, path)
    ranks = _spawn(lfq_rank, tmp_path, options, path, compiled)

    torch.manual_seed(0)
    single = LFQ(**options)
    x_single = x.clone().requires_grad_()
    out, breakdown = single(x_single, mask=mask, return_loss_breakdown=True)
    ((out.quantized * grad).sum() + out.entropy_aux_loss).backward()
    bound = dict(n=x.numel(), data=x)
    for rank, result in enumerate(ranks):
        assert_rounding_close(result["loss"], out.entropy_aux_loss, **bound, msg="aux loss")
        assert_rounding_close(result["per_sample_entropy"], breakdown.per_sample_entropy, **bound)
        assert_rounding_close(result["batch_entropy"], breakdown.batch_entropy, **bound)
        rows = slice(rank * 2, rank * 2 + 2)
        assert_rounding_close(result["x_grad"] / WORLD, x_single.grad[rows], **bound, msg="input gradient")
    for name, p in single.named_parameters():
        mean = sum(result[f"grad.{name}"] for result in ranks) / WORLD
        assert_rounding_close(mean, p.grad, **bound, msg=f"{name} gradient")
