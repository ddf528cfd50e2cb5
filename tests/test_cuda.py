"""CUDA-only checks: a compiled training step (quantize dropout included) makes no host-device sync, and
matches eager on the GPU.

These need a CUDA device (the project's GPU machine); on CPU-only machines they are skipped.
"""

import pytest
import torch

from vqdeploy import GroupedResidualVQ, ResidualVQ, VectorQuantize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIONS = {
    "default": {},
    "cosine_dead_codes": dict(use_cosine_sim=True, threshold_ema_dead_code=2),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True, codebook_dim=32),
    "kmeans_initialised": dict(kmeans_init=True),
    "residual_dropout": dict(quantizer=ResidualVQ, num_quantizers=4, quantize_dropout=True,
                             threshold_ema_dead_code=2),
    "grouped_dropout": dict(quantizer=GroupedResidualVQ, groups=2, num_quantizers=3, quantize_dropout=True),
}


def _build(name):
    options = dict(OPTIONS[name])
    return options.pop("quantizer", VectorQuantize)(dim=64, codebook_size=256, **options).cuda()


def _kmeans_init(module) -> bool:
    return any(getattr(m, "config", None) is not None and m.config.kmeans_init for m in module.modules())


def _step(model, x):
    quantized, indices, loss = model(x)
    (quantized.square().mean() + loss.sum()).backward()
    return indices


@pytest.mark.parametrize("name", list(OPTIONS))
def test_compiled_training_step_makes_no_host_sync(name):
    vq = _build(name)
    x = torch.randn(4, 128, 64, device="cuda", requires_grad=True)
    if _kmeans_init(vq):
        vq(x)  # an eager first step runs k-means, so the compiled graph carries no cond (whose predicate syncs)
    compiled = torch.compile(vq, fullgraph=True)
    for _ in range(2):  # compile and warm up
        _step(compiled, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            _step(compiled, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", list(OPTIONS))
def test_compiled_equals_eager_on_cuda(name):
    torch.manual_seed(0)
    eager = _build(name)
    compiled_module = _build(name)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    for step in range(3):
        x = torch.randn(4, 128, 64, device="cuda")
        torch.manual_seed(step)
        q_e, i_e, l_e = eager(x)
        torch.manual_seed(step)
        q_c, i_c, l_c = compiled(x)
        assert torch.equal(i_e, i_c)
        torch.testing.assert_close(q_c, q_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l_c, l_e, atol=1e-5, rtol=1e-5)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[key].float(), value.float(), atol=1e-5, rtol=1e-5)
