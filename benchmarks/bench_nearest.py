"""Nearest-code search on CUDA: the fused kernel (vqdeploy.search) beside the float32 torch search and the
matrix-product floors, in one run.

    python benchmarks/bench_nearest.py [--codebook-sizes 1024 8192] [--dim 256] [--rows 65536] [--iters 50]
        [--json out.json]

For each codebook size, on two kinds of data (gaussian rows and codes; rows near the codes, as a trained
codebook sees them):
- the float32 torch search (addmm + argmin: what eval ran before the kernel, and what export holds);
- the fused kernel with bf16 scores and 16 candidates (the default), and with TF32 scores and 8 candidates;
- the floors: float32, TF32 and bf16 matrix products of the same size (torch.mm alone);
with the median time, the share of rows whose index equals the float64 argmin, and for the kernel the share
certified without its float64 fallback.  Then a VectorQuantize (dim 256, 1024 codes) eval forward and training
step, compiled, with the fused search and with the torch search; and a profile of fused calls.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import hardware, write_json  # noqa: E402


def float64_nearest(x, codes, chunk: int = 4096):
    import torch

    c64 = codes.double()
    return torch.cat([torch.cdist(x[start:start + chunk].double(), c64).argmin(dim=-1)
                      for start in range(0, x.shape[0], chunk)])


def data(kind: str, rows: int, codes: int, dim: int):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    book = torch.randn(codes, dim, device="cuda", generator=g)
    if kind == "gaussian":
        return torch.randn(rows, dim, device="cuda", generator=g), book
    picks = torch.randint(0, codes, (rows,), device="cuda", generator=g)
    return book[picks] + 0.3 * torch.randn(rows, dim, device="cuda", generator=g), book


def search_rows(sizes, dim: int, rows: int, iters: int) -> list[dict]:
    import torch

    from vqdeploy.primitives import nearest_codes_torch
    from vqdeploy.search.kernel import fused_nearest
    from vqdeploy.timing import median_ms

    sync = torch.cuda.synchronize
    out = []
    print(f"{'codes':>6} {'data':>9} {'search':>16} | {'ms':>7} | {'= float64':>9} {'certified':>9}")
    for size in sizes:
        for kind in ("gaussian", "near"):
            x, book = data(kind, rows, size, dim)
            truth = float64_nearest(x, book)
            x3, book3 = x.unsqueeze(0), book.unsqueeze(0)
            searches = {
                "torch float32": lambda: (nearest_codes_torch(x3, book3), None),
                "fused bf16 x16": lambda: fused_nearest(x3, book3, False, "bf16", 16),
                "fused tf32 x8": lambda: fused_nearest(x3, book3, False, "tf32", 8),
            }
            for name, call in searches.items():
                indices, certified = call()
                ms = median_ms(call, iters, warmup=3, sync=sync)
                row = dict(codes=size, data=kind, search=name, ms=ms,
                           exact=(indices[0] == truth).double().mean().item(),
                           certified=None if certified is None else certified.double().mean().item())
                out.append(row)
                cert = "" if row["certified"] is None else f"{row['certified']:9.4f}"
                print(f"{size:>6} {kind:>9} {name:>16} | {ms:7.3f} | {row['exact']:9.5f} {cert:>9}", flush=True)
        a = torch.randn(rows, dim, device="cuda")
        b = torch.randn(dim, size, device="cuda")
        for name, left, right, tf32 in (("mm float32", a, b, False), ("mm tf32", a, b, True),
                                        ("mm bf16", a.bfloat16(), b.bfloat16(), False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ms = median_ms(lambda: left @ right, iters, warmup=3, sync=sync)
            out.append(dict(codes=size, data="-", search=name, ms=ms))
            print(f"{size:>6} {'-':>9} {name:>16} | {ms:7.3f} |", flush=True)
        torch.backends.cuda.matmul.allow_tf32 = False
    return out


def quantizer_rows(dim: int, rows: int, iters: int) -> list[dict]:
    """VectorQuantize eval and training step, compiled (fullgraph), fused search on and off."""
    import torch

    from vqdeploy import VectorQuantize
    from vqdeploy.search import fused_search_settings
    from vqdeploy.timing import median_ms

    out = []
    x = torch.randn(rows // 1024, 1024, dim, device="cuda")
    for fused in (True, False):
        with fused_search_settings(enabled=fused):
            for mode in ("eval", "train"):
                torch._dynamo.reset()
                torch.manual_seed(0)
                vq = VectorQuantize(dim=dim, codebook_size=1024).cuda().train(mode == "train")
                compiled = torch.compile(vq, fullgraph=True)
                if mode == "eval":
                    def step():
                        with torch.no_grad():
                            return compiled(x)
                else:
                    def step():
                        inp = x.detach().requires_grad_()
                        out_, _, loss = compiled(inp)
                        (out_.square().mean() + loss.sum()).backward()
                torch.cuda.reset_peak_memory_stats()
                ms = median_ms(step, iters, warmup=3, sync=torch.cuda.synchronize)
                peak = torch.cuda.max_memory_allocated() / 2**20
                out.append(dict(quantizer="VectorQuantize 1024", mode=mode, fused=fused, ms=ms, peak_mb=peak))
                print(f"VectorQuantize 1024 codes {mode:>5} compiled, {'fused' if fused else 'torch'} search: "
                      f"{ms:.3f} ms, peak {peak:.0f} MB", flush=True)
    return out


def profile(dim: int, rows: int, size: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from vqdeploy.search.kernel import fused_nearest

    x, book = data("gaussian", rows, size, dim)
    fused_nearest(x[None], book[None])
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fused_nearest(x[None], book[None])
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=10)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=10)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64 * 1024)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_nearest.py times the fused CUDA kernel: it needs a CUDA device "
                         "(tests/test_search.py checks the kernel on a CPU, in Triton's interpreter)")
    import triton

    print(f"# nearest-code search; torch {torch.__version__}, triton {triton.__version__}, {hardware('cuda')}; "
          f"dim {args.dim}, {args.rows} rows, median of {args.iters}")
    rows = search_rows(args.codebook_sizes, args.dim, args.rows, args.iters)
    rows += quantizer_rows(args.dim, args.rows, max(10, args.iters // 2))
    table = profile(args.dim, args.rows, args.codebook_sizes[0])
    print(f"# profile: 5 fused calls, {args.codebook_sizes[0]} codes\n{table}")
    write_json(args.json, "cuda", (args.rows, args.dim), rows, profile=table)


if __name__ == "__main__":
    main()
