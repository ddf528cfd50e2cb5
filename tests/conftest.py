"""Shared fixtures: fixed seeds, a fresh dynamo cache per test, eager-compatible RNG in compiled code."""

import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="vector_quantize_pytorch")

# 2 threads, as CI has, or 1 per worker when pytest-xdist runs two (pyproject's addopts), unless OMP_NUM_THREADS
# says otherwise (the suites must pass at any thread count)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1" if "PYTEST_XDIST_WORKER" in os.environ else "2")))


@pytest.fixture(autouse=True)
def _seed_and_reset():
    torch.manual_seed(0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True, scope="session")
def _eager_compatible_random():
    # compiled random ops use eager's generator, so compiled and eager runs from one seed agree
    import torch._inductor.config as inductor_config
    previous = inductor_config.fallback_random
    inductor_config.fallback_random = True
    yield
    inductor_config.fallback_random = previous


@pytest.fixture
def defaults_1_14_17():
    """Modules built in the test take vector-quantize-pytorch 1.14.17's defaults (its parity suites use it)."""
    from vqdeploy import use_defaults

    with use_defaults("1.14.17"):
        yield
