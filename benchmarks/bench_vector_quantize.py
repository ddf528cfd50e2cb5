"""vqdeploy vs vector-quantize-pytorch 1.14.17, side by side in one run.

    python benchmarks/bench_vector_quantize.py [--device cpu|cuda] [--codebook-sizes 1024 8192]
        [--batch 8 --tokens 1024] [--iters 20] [--json out.json]

For each codebook size it times the eval forward and a training step (forward, backward with the EMA update)
of both libraries, eagerly and under torch.compile (vqdeploy with fullgraph=True; the reference without it,
since it has graph breaks), and reports the median time, the peak memory and the reference/vqdeploy ratios.
Every case runs in a fresh process so compile caches and memory peaks do not leak between cases.
Peak memory is torch.cuda.max_memory_allocated on CUDA and the growth of the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings

DEFAULT_DIM = 256


def _build(impl: str, dim: int, codebook_size: int):
    if impl == "reference":
        from vector_quantize_pytorch import VectorQuantize
    else:
        from vqdeploy import VectorQuantize
    return VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.8, commitment_weight=1.0)


def _run_case(impl, mode, compiled, dim, codebook_size, batch, tokens, device, iters, queue):
    warnings.filterwarnings("ignore")
    import torch

    torch.manual_seed(0)
    try:
        vq = _build(impl, dim, codebook_size).to(device)
        vq.train(mode == "train")
        model = vq
        if compiled:
            model = torch.compile(vq, fullgraph=(impl == "vqdeploy"))
        x = torch.randn(batch, tokens, dim, device=device)

        def step():
            if mode == "eval":
                with torch.no_grad():
                    return model(x)
            inp = x.detach().requires_grad_()
            quantized, _, loss = model(inp)
            (quantized.square().mean() + loss.sum()).backward()
            return loss

        def sync():
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(3):  # warm-up, compile
            step()
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            sync()
            times.append((time.perf_counter() - start) * 1000)
        if device.startswith("cuda"):
            peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        queue.put(dict(ms=statistics.median(times), peak_mb=peak_mb))
    except Exception as error:  # a library that cannot run a case is reported, not fatal
        queue.put(dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"))


def run_case(**kwargs) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_run_case, kwargs=dict(kwargs, queue=queue))
    process.start()
    process.join()
    return queue.get() if not queue.empty() else dict(error=f"exit code {process.exitcode}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    batch = args.batch or (64 if on_cuda else 8)
    sizes = args.codebook_sizes or ([1024, 8192] if on_cuda else [1024])
    iters = args.iters or (50 if on_cuda else 10)
    hardware = torch.cuda.get_device_name() if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {hardware}; dim {args.dim}, {batch} x {args.tokens} tokens, "
          f"median of {iters}")

    rows = []
    header = f"{'codes':>6} {'mode':>5} {'exec':>8} | {'reference ms':>12} {'vqdeploy ms':>11} {'speed-up':>8} | " \
             f"{'ref peak MB':>11} {'vqd peak MB':>11} {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for codebook_size in sizes:
        for mode in ("eval", "train"):
            for compiled in (False, True):
                results = {}
                for impl in ("reference", "vqdeploy"):
                    results[impl] = run_case(impl=impl, mode=mode, compiled=compiled, dim=args.dim,
                                             codebook_size=codebook_size, batch=batch, tokens=args.tokens,
                                             device=device, iters=iters)
                ref, ours = results["reference"], results["vqdeploy"]
                row = dict(codebook_size=codebook_size, mode=mode, compiled=compiled, reference=ref, vqdeploy=ours)
                rows.append(row)

                def fmt(r, key):
                    return f"{r[key]:.2f}" if key in r else "n/a"

                speedup = f"{ref['ms'] / ours['ms']:.2f}x" if "ms" in ref and "ms" in ours else "n/a"
                mem = (f"{ref['peak_mb'] / ours['peak_mb']:.2f}x"
                       if "peak_mb" in ref and "peak_mb" in ours and ours["peak_mb"] > 0 else "n/a")
                execution = "compile" if compiled else "eager"
                print(f"{codebook_size:>6} {mode:>5} {execution:>8} | {fmt(ref, 'ms'):>12} {fmt(ours, 'ms'):>11} "
                      f"{speedup:>8} | {fmt(ref, 'peak_mb'):>11} {fmt(ours, 'peak_mb'):>11} {mem:>9}")
                for impl, r in results.items():
                    if "error" in r:
                        print(f"    {impl}: {r['error']}")
                sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=hardware, torch=torch.__version__, batch=batch, tokens=args.tokens,
                           dim=args.dim, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
