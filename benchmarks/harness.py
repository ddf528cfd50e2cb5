"""Side-by-side timing of vqdeploy and vector-quantize-pytorch (1.14.17, and 1.32.0 where a script asks for it),
shared by the benchmark scripts.

A case is one library, one mode (eval forward or training step) and one execution (eager, or torch.compile:
vqdeploy with fullgraph=True, the reference without it, since it has graph breaks).  Every case runs in a fresh
process so compile caches and memory peaks do not leak between cases.  Peak memory is
torch.cuda.max_memory_allocated on CUDA and the growth of the process's peak RSS on CPU.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_1_32 = ROOT / ".reference" / "vqp-1.32.0"  # tests/install-references.sh puts 1.32.0 there


def _run_case(builder, params, impl, mode, compiled, shape, device, iters, queue):
    """``impl``: "reference" (1.14.17, the test environment's), "1.32.0" (imported from REFERENCE_1_32 in this
    fresh process) or "vqdeploy"."""
    warnings.filterwarnings("ignore")
    if impl == "1.32.0":
        sys.path.insert(0, str(REFERENCE_1_32))
    import torch

    torch.manual_seed(0)
    try:
        module_name, function_name = builder.split(":")
        model = getattr(importlib.import_module(module_name), function_name)(impl, **params).to(device)
        model.train(mode == "train")
        if compiled:
            model = torch.compile(model, fullgraph=(impl == "vqdeploy"))
        x = torch.randn(shape, device=device)

        def step():
            if mode == "eval":
                with torch.no_grad():
                    return model(x)
            inp = x.detach().requires_grad_()
            out = model(inp)
            loss = out[2].sum() if len(out) > 2 else 0.0  # FSQ has no loss
            (out[0].square().mean() + loss).backward()
            return out

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


def hardware(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"


EXECUTIONS = ("eager", "compile")


def add_execution_arguments(parser) -> None:
    """``--exec`` and ``--reference-exec``: which executions to time for vqdeploy and for the references
    (the GPU check times vqdeploy compiled and the references eager, to keep its device time short)."""
    parser.add_argument("--exec", dest="executions", nargs="*", choices=EXECUTIONS, default=list(EXECUTIONS))
    parser.add_argument("--reference-exec", dest="reference_executions", nargs="*", choices=EXECUTIONS,
                        default=list(EXECUTIONS), help="none (an empty list) times vqdeploy alone")


def compare(builder: str, cases: list[dict], shape: tuple[int, ...], device: str, iters: int,
            label: str, references: tuple[str, ...] = ("reference",), executions=EXECUTIONS,
            reference_executions=EXECUTIONS) -> list[dict]:
    """Time every case (``params`` for the builder plus a ``name``; optionally its own ``shape``, ``modes``, and
    ``skip_reference`` with the reason) in eval/train x eager/compile (those of ``executions`` for vqdeploy,
    ``reference_executions`` for the references), for vqdeploy and each of ``references`` ("reference" is
    1.14.17, "1.32.0" the newest release), print a table of medians, speed-ups and memory ratios (one line per
    reference), and return the rows."""
    rows = []
    header = f"{label:>10} {'mode':>5} {'exec':>8} {'vs':>9} | {'ref ms':>9} {'vqdeploy ms':>11} {'speed-up':>8} | " \
             f"{'ref peak MB':>11} {'vqd peak MB':>11} {'mem ratio':>9}"
    print(header)
    print("-" * len(header))
    for case in cases:
        params = {k: v for k, v in case.items() if k not in ("name", "shape", "skip_reference", "modes")}
        case_shape = case.get("shape", shape)
        for mode in case.get("modes", ("eval", "train")):
            for compiled in (False, True):
                execution = EXECUTIONS[compiled]
                if execution not in executions and execution not in reference_executions:
                    continue
                results = {}
                for impl in (*references, "vqdeploy"):
                    chosen = executions if impl == "vqdeploy" else reference_executions
                    if execution not in chosen:
                        results[impl] = dict(error="not run")
                    elif impl != "vqdeploy" and case.get("skip_reference"):
                        results[impl] = dict(error=case["skip_reference"])
                    else:
                        results[impl] = run_case(builder=builder, params=params, impl=impl, mode=mode,
                                                 compiled=compiled, shape=case_shape, device=device, iters=iters)
                ours = results["vqdeploy"]
                rows.append(dict(case=case["name"], mode=mode, compiled=compiled, **results))
                for impl in references:
                    _print_line(case["name"], mode, compiled, "1.14.17" if impl == "reference" else impl,
                                results[impl], ours)
                for impl, r in results.items():
                    if "error" in r and r["error"] != "not run":
                        print(f"    {impl}: {r['error']}")
                sys.stdout.flush()
    return rows


def _print_line(name: str, mode: str, compiled: bool, release: str, ref: dict, ours: dict) -> None:
    def fmt(r, key):
        return f"{r[key]:.2f}" if key in r else "n/a"

    speedup = f"{ref['ms'] / ours['ms']:.2f}x" if "ms" in ref and "ms" in ours else "n/a"
    mem = (f"{ref['peak_mb'] / ours['peak_mb']:.2f}x"
           if "peak_mb" in ref and "peak_mb" in ours and ours["peak_mb"] > 0 else "n/a")
    execution = "compile" if compiled else "eager"
    print(f"{name:>10} {mode:>5} {execution:>8} {release:>9} | {fmt(ref, 'ms'):>9} {fmt(ours, 'ms'):>11} "
          f"{speedup:>8} | {fmt(ref, 'peak_mb'):>11} {fmt(ours, 'peak_mb'):>11} {mem:>9}")


def write_json(path: str | None, device: str, shape, rows, **extra) -> None:
    if not path:
        return
    import torch

    with open(path, "w") as f:
        json.dump(dict(device=hardware(device), torch=torch.__version__, shape=list(shape), rows=rows, **extra), f,
                  indent=2)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5), so that the peak measured next
    is the steps', not the warm-up's or the compiler's; returns the current RSS in KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return _status_kb("VmRSS")
    except OSError:  # elsewhere: the peak so far (the steps then show no growth beyond the warm-up)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss() -> int:
    try:
        return _status_kb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
