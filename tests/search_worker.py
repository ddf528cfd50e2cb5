"""Runs the fused search in Triton's interpreter (TRITON_INTERPRET=1, set by the parent before anything imports
Triton) and prints one JSON object of results for tests/test_search.py.

Each entry: the share of rows whose index equals the float64 argmin, the share the kernel certified without
its float64 fallback, and the float32 torch path's share for comparison."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import search_cases  # noqa: E402

from vqdeploy.primitives import nearest_codes_torch  # noqa: E402
from vqdeploy.search.kernel import fused_nearest  # noqa: E402

RUNS = [(name, "bf16", 16) for name in search_cases.CASES] + [
    ("gaussian", "tf32", 8), ("large_norms", "tf32", 8), ("cosine", "tf32", 8),
    ("near_ties", "bf16", 1), ("exact_duplicates", "bf16", 1)]


def _share(a, b):
    return (a == b).double().mean().item()


def searches() -> dict:
    results = {}
    for name, precision, candidates in RUNS:
        x, codes, cosine = search_cases.build(name)
        truth = search_cases.float64_nearest(x, codes, cosine)
        indices, certified = fused_nearest(x, codes, cosine, precision, candidates)
        results[f"{name}-{precision}-{candidates}"] = dict(
            exact=_share(indices, truth), certified=certified.double().mean().item(),
            torch_float32=_share(nearest_codes_torch(x, codes, cosine), truth))
    return results


def compiled_graph() -> dict:
    """The custom op inside torch.compile(fullgraph=True): one graph (dynamo and AOT autograd through its fake
    registration; inductor only adds an extern call), the same indices as eager."""
    from vqdeploy.search.dispatch import search_nearest

    def match(x, codes):
        return search_nearest(x * 1.0, codes, False) + 0

    x, codes, _ = search_cases.build("tiny_shapes")
    eager = match(x, codes)
    compiled = torch.compile(match, fullgraph=True, backend="aot_eager")(x, codes)  # the trace is the point
    return dict(equal=bool(torch.equal(eager, compiled)),
                exact=_share(compiled, search_cases.float64_nearest(x, codes, False)))


def quantizer_steps() -> dict:
    """A VectorQuantize eval forward and training step with the fused search forced on (CPU: interpreter)
    give the indices and codebook of the float32 torch path on well-separated data."""
    import vqdeploy.primitives as primitives
    from vqdeploy import VectorQuantize

    torch.manual_seed(0)
    reference = VectorQuantize(dim=32, codebook_size=64, decay=0.8)
    fused = VectorQuantize(dim=32, codebook_size=64, decay=0.8)
    fused.load_state_dict(reference.state_dict())
    x = torch.randn(2, 40, 32)
    results = {}
    for mode in ("eval", "train"):
        reference.train(mode == "train")
        fused.train(mode == "train")
        training = mode == "train"
        ref_out, ref_indices, ref_loss = reference(x.clone().requires_grad_(training))
        original = primitives.fused_search_used
        primitives.fused_search_used = lambda rows, codes: True
        try:
            inp = x.clone().requires_grad_(training)
            out, fused_indices, loss = fused(inp)
        finally:
            primitives.fused_search_used = original
        if training:  # the op takes inputs that need gradients, and the backward runs around it
            (out.sum() + loss.sum()).backward()
            results["input_grad"] = bool(inp.grad is not None and inp.grad.isfinite().all())
        results[mode] = bool(torch.equal(ref_indices, fused_indices))
    embed = "_codebook.embed"
    results["codebook"] = bool(torch.equal(reference.state_dict()[embed], fused.state_dict()[embed]))
    return results


def prepared_codes() -> dict:
    """The preparing kernel against torch: the centered codes rounded as tensor cores take them (bit for bit)
    and the bound's per-code terms, for each precision."""
    from vqdeploy.search.bounds import round_operand
    from vqdeploy.search.kernel import prepare_codes

    codes = search_cases.build("gaussian")[1] * 30.0
    results = {}
    for precision in ("bf16", "tf32", "ieee"):
        center, score_codes, stats = prepare_codes(codes, False, precision)
        centered = codes - codes.mean(dim=1, keepdim=True)
        rounded = round_operand(centered, precision)
        expected = torch.stack([centered.square().sum(dim=-1), centered.norm(dim=-1),
                                (rounded - centered).norm(dim=-1), rounded.norm(dim=-1)], dim=1)
        results[precision] = bool(torch.equal(center, codes.mean(dim=1)) and torch.equal(score_codes, rounded)
                                  and torch.allclose(stats, expected, rtol=1e-5, atol=1e-6))
    return results


if __name__ == "__main__":
    print(json.dumps(dict(searches=searches(), compiled=compiled_graph(), quantizer=quantizer_steps(),
                          prepared=prepared_codes())))
