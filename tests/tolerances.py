"""Every float tolerance of the compile, parity and distributed suites, derived in one place.

Compiled and eager runs (and vqdeploy and the reference library, and one rank and two) compute the same
float32 values in other orders: a reordered or vectorised sum, an FMA for a multiply-add, a sum over ranks.
Only rounding separates them, and rounding grows in a known way:

- one float32 operation rounds by at most u = 2**-24 of the magnitudes it combines;
- a sum of n terms in two different blocked or pairwise orders (ATen's and inductor's CPU reductions, gloo's
  all-reduce) differs by a few u times (1 + log2 n) times the size of the terms, not of the result: a code
  near zero averaged from rows of size 3 rounds like the rows (Higham, Accuracy and Stability of Numerical
  Algorithms, 2002, section 4.2);
- an EMA step keeps ``decay`` of the old state and mixes in ``1 - decay`` of new statistics, and no other
  step amplifies state, so after k steps the error is at most k times one step's.

So a value compared after k training steps may differ by

    atol = ULPS_PER_OP * k * (1 + ceil(log2 n)) * u * S

where n bounds the longest reduction of a step (the batch's element count) and S is the size of what the
value is computed from: the largest magnitude of the compared tensor and of the batch.  ``ULPS_PER_OP = 2``
allows for the few operations a value passes through per step (a sum, the EMA, a division by the smoothed
count, an affine rescaling), each rounding once.  Measured on 2-core AMD EPYC (the machine where a fixed
1e-5 failed, on an embed element of 3.3 in a tensor reaching 400): compiled and eager differ by at most
4 u S after 3 steps of any compile-suite option, against this bound's 2 * 3 * 10 = 60 u S.

An elementwise bound cannot see an update that is slightly wrong everywhere, so every state tensor of at
least ``DRIFT_MIN_ELEMENTS`` significant elements (those above 1/8 of its largest) is also checked for
drift: the mean of its signed differences, in units of each element's own ulp.  Correct reorderings round
either way and keep it near 0 (at most 0.3 measured); an EMA biased by one ulp per step lifts it to 1 after
one step and past 1.7 after two (``tests/test_tolerances.py`` injects that bias, and a swapped decay, and
shows that the checks fail).  Dead-code replacement resets the codes it replaces, so with
``threshold_ema_dead_code`` the bias shows less; the swapped decay is caught there.

Tolerances that are not rounding are named here too, with their cause.
"""

from __future__ import annotations

import math

import torch

U = 2.0 ** -24
ULPS_PER_OP = 2
DRIFT_LIMIT = 1.0
DRIFT_MIN_ELEMENTS = 64

# Not rounding: the reference clamps each code's probability at 1e-5 inside the per-sample entropy of LFQ's
# aux loss, vqdeploy computes it exactly (README, LFQ); the two losses, and their input gradients, agree within
# this relative tolerance at the temperatures the parity suite uses.
LFQ_ENTROPY_RTOL = 1e-4


def rounding_atol(size: float, steps: int = 1, n: int = 1) -> float:
    """The bound above for values of size ``size`` after ``steps`` steps with reductions of up to ``n`` terms."""
    return ULPS_PER_OP * steps * (1 + math.ceil(math.log2(max(n, 1)))) * U * size


def size_of(*tensors) -> float:
    """The largest finite magnitude among tensors (or numbers)."""
    size = 0.0
    for t in tensors:
        t = torch.as_tensor(t).detach().double()
        t = t[torch.isfinite(t)]
        if t.numel():
            size = max(size, float(t.abs().max()))
    return size


def assert_rounding_close(actual, expected, steps: int = 1, n: int = 1, data=None, msg: str = "",
                          rtol: float = 0.0) -> None:
    """``actual`` equals ``expected`` up to rounding: within ``rounding_atol`` of the size of ``expected`` and
    of ``data`` (the inputs it was computed from), plus ``rtol`` where a known difference is relative (LFQ's
    entropy).  NaN must match NaN."""
    expected = torch.as_tensor(expected)
    actual = torch.as_tensor(actual)
    atol = rounding_atol(size_of(expected, *(() if data is None else (data,))), steps, n)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True,
                               msg=lambda m: f"{msg}: {m} (rounding bound after {steps} step(s), n={n})")


def _ulp(t: torch.Tensor) -> torch.Tensor:
    t = t.float().abs()
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).double()


def drift_ulps(actual: torch.Tensor, expected: torch.Tensor) -> float | None:
    """The mean signed difference over the significant elements of ``expected``, in their own ulps; None when
    there are fewer than ``DRIFT_MIN_ELEMENTS`` of them."""
    expected, actual = expected.detach().float(), actual.detach().float()
    finite = torch.isfinite(expected) & torch.isfinite(actual)
    if not bool(finite.any()):
        return None
    significant = finite & (expected.abs() >= expected[finite].abs().max() / 8) & (expected != 0)
    if int(significant.sum()) < DRIFT_MIN_ELEMENTS:
        return None
    return float(((actual.double() - expected.double()) / _ulp(expected))[significant].mean())


def assert_no_drift(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    drift = drift_ulps(actual, expected)
    assert drift is None or abs(drift) <= DRIFT_LIMIT, \
        f"{msg}: drifts by {drift:+.2f} ulp on average (at most {DRIFT_LIMIT} for rounding): a biased update"


def assert_state_close(actual: torch.nn.Module | dict, expected: torch.nn.Module | dict, steps: int = 1,
                       n: int = 1, data=None) -> None:
    """Every buffer and parameter: integers equal, floats within the rounding bound and free of drift."""
    actual = actual.state_dict() if isinstance(actual, torch.nn.Module) else actual
    expected = expected.state_dict() if isinstance(expected, torch.nn.Module) else expected
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    for key, value in expected.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(actual[key], value), key
            continue
        assert_rounding_close(actual[key], value, steps, n, data, msg=key)
        assert_no_drift(actual[key], value, msg=key)
