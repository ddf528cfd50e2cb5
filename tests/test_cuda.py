"""CUDA-only checks: a compiled training step (quantize dropout and the scalar quantizers included) makes no
host-device sync, and matches eager on the GPU; the fused nearest-code kernel equals float64 on adversarial data
and at benchmark size, and is the search nearest_codes takes on CUDA.

These need a CUDA device (the project's GPU machine); on CPU-only machines they are skipped.
"""

import pytest
import torch

from vqdeploy import LFQ, GroupedResidualVQ, LatentQuantize, ResidualFSQ, ResidualLFQ, ResidualVQ, VectorQuantize

import search_cases
from tolerances import assert_rounding_close, assert_state_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIONS = {
    "default": {},
    "cosine_dead_codes": dict(use_cosine_sim=True, threshold_ema_dead_code=2),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True, codebook_dim=32),
    "kmeans_initialised": dict(kmeans_init=True),
    "residual_dropout": dict(quantizer=ResidualVQ, num_quantizers=4, quantize_dropout=True,
                             threshold_ema_dead_code=2),
    "grouped_dropout": dict(quantizer=GroupedResidualVQ, groups=2, num_quantizers=3, quantize_dropout=True),
    "residual_fsq_dropout": dict(quantizer=ResidualFSQ, levels=[8, 5, 5, 5], num_quantizers=3, quantize_dropout=True),
    "lfq_fraction": dict(quantizer=LFQ, codebook_size=2**12, frac_per_sample_entropy=0.5),
    "residual_lfq": dict(quantizer=ResidualLFQ, codebook_size=2**10, num_quantizers=2),
    "latent": dict(quantizer=LatentQuantize, levels=[5, 5, 8]),
}


def _build(name):
    options = dict(OPTIONS[name])
    quantizer = options.pop("quantizer", VectorQuantize)
    if quantizer is VectorQuantize or quantizer.__name__.endswith("VQ"):
        options["codebook_size"] = 256
    return quantizer(dim=64, **options).cuda()


def _kmeans_init(module) -> bool:
    return any(getattr(m, "config", None) is not None and m.config.kmeans_init for m in module.modules())


def _step(model, x):
    out = model(x)
    loss = out[2].sum() if len(out) > 2 else 0.0  # FSQ has no loss
    (out[0].square().mean() + loss).backward()
    return out[1]


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
        out_e = eager(x)
        torch.manual_seed(step)
        out_c = compiled(x)
        assert torch.equal(out_e[1], out_c[1])
        for a, b in zip(out_e[::2], out_c[::2]):  # quantized, and the loss where there is one
            assert_rounding_close(b.cpu(), a.cpu(), steps=step + 1, n=x.numel(), data=x.cpu())
    assert_state_close({k: v.cpu() for k, v in compiled_module.state_dict().items()},
                       {k: v.cpu() for k, v in eager.state_dict().items()}, steps=3, n=x.numel(), data=x.cpu())


def test_runtime_binds_cuda_tensors_and_runs_argmin_on_the_gpu(tmp_path):
    """onnxruntime's CUDA provider: torch CUDA tensors in and out (IO binding), indices equal to PyTorch with TF32
    off, and the data ops (ArgMin, MatMul, ...) placed on the GPU (shape ops may stay on the CPU by design)."""
    import json

    import onnxruntime as ort

    from vqdeploy.export import export
    from vqdeploy.runtime import Session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider (install onnxruntime-gpu)")
    torch.manual_seed(0)
    rvq = ResidualVQ(dim=64, codebook_size=256, num_quantizers=3).eval()
    export(rvq, tmp_path / "rvq")
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = Session(tmp_path / "rvq", provider="cuda", session_options=options)
    assert session.on_cuda
    x = torch.randn(4, 256, 64, device="cuda")
    indices = session.encode(x)
    assert indices.is_cuda and torch.equal(indices, rvq.cuda().encode(x))
    decoded = session.decode(indices)
    assert decoded.is_cuda
    torch.testing.assert_close(decoded, rvq.decode(indices), atol=1e-5, rtol=0)
    placement = {}
    for name in ("encoder", "decoder"):
        events = json.load(open(session.sessions[name].end_profiling()))
        for event in events:
            args = event.get("args", {})
            if event.get("cat") == "Node" and "op_name" in args:
                placement.setdefault(args["op_name"], set()).add(args.get("provider"))
    for op in ("ArgMin", "MatMul", "Where"):
        if op in placement:
            assert placement[op] == {"CUDAExecutionProvider"}, (op, placement[op])
    assert "ArgMin" in placement


@pytest.mark.parametrize("precision,candidates", [("bf16", 16), ("tf32", 8), ("bf16", 1)])
@pytest.mark.parametrize("name", list(search_cases.CASES))
def test_fused_search_on_cuda_equals_float64(name, precision, candidates):
    """The kernel on tensor cores (one fixed configuration, no autotuning) against float64: the rounding of the
    real hardware must stay within the bound the certification relies on."""
    from vqdeploy.search.kernel import TUNING_CONFIGS, fused_nearest

    x, codes, cosine = search_cases.build(name)
    indices, _ = fused_nearest(x.cuda(), codes.cuda(), cosine, precision, candidates,
                               config=TUNING_CONFIGS[precision][0])
    assert torch.equal(indices.cpu(), search_cases.float64_nearest(x, codes, cosine))


@pytest.mark.parametrize("data", ["gaussian", "near"])
def test_fused_search_at_benchmark_size_equals_float64(data):
    """16 x 1024 rows, 1024 codes of dim 256, autotuned: every index equals float64's, and most rows are
    certified without the fallback."""
    from vqdeploy.search.kernel import fused_nearest

    g = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randn(1, 1024, 256, device="cuda", generator=g)
    if data == "gaussian":
        x = torch.randn(1, 16 * 1024, 256, device="cuda", generator=g)
    else:
        picks = torch.randint(0, 1024, (16 * 1024,), device="cuda", generator=g)
        x = codes[:, picks] + 0.3 * torch.randn(1, 16 * 1024, 256, device="cuda", generator=g)
    indices, certified = fused_nearest(x, codes)
    truth = torch.cdist(x.double(), codes.double()).argmin(dim=-1)
    assert torch.equal(indices, truth)
    assert certified.double().mean().item() > 0.99


def test_nearest_codes_takes_the_fused_kernel_on_cuda():
    from vqdeploy.primitives import nearest_codes
    from vqdeploy.search import dispatch

    x, codes, _ = search_cases.build("gaussian")
    x, codes = x.cuda(), codes.cuda()
    assert dispatch.fused_search_used(x, codes)
    indices = nearest_codes(x, codes)
    assert not dispatch._BROKEN, dispatch._BROKEN  # the kernel built and ran (no silent torch fallback)
    assert torch.equal(indices.cpu(), search_cases.float64_nearest(x.cpu(), codes.cpu(), False))
    assert not dispatch.fused_search_used(x.half(), codes.half())
    wide = torch.randn(1, 8, 512, device="cuda")  # above MAX_FUSED_DIM: the torch path
    assert not dispatch.fused_search_used(wide, wide)
