"""Build the search kernels for a GPU architecture on any machine, GPU or not: does it compile, and what does it
use (shared memory; registers and spills where Triton's ptxas can read the PTX)?

    python -m vqdeploy.search.build [--arch 90] [--dim 256]

Triton's interpreter checks what the kernel computes; this checks what only the GPU compiler sees (types of
loop-carried values, resources).  It builds every configuration the autotuner tries.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

SHARED_MEMORY_LIMIT = 227 * 1024  # per block on sm_90


def _search_arguments(precision: str) -> dict:
    """The search kernel's run-time arguments and their types."""
    pointers = ["x_ptr", "center_ptr", "codes_ptr", "score_codes_ptr", "code_stats_ptr"]
    signature = {name: "*fp32" for name in pointers}
    signature["score_codes_ptr"] = "*bf16" if precision == "bf16" else "*fp32"
    signature.update(out_ptr="*i64", certified_ptr="*i8", n="i32", k="i32", d="i32")
    for name in ("safety", "acc_error", "fp_error", "centering_error", "x_sq_error"):
        signature[name] = "fp32"
    return signature


def _compile(fn, arguments: dict, constants: dict, arch: int, **options):
    """``fn`` compiled for ``sm_{arch}``: ``arguments`` name the run-time argument types, ``constants`` the
    compile-time values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernel import FP_FUSION

    signature = dict(arguments, **{name: "constexpr" for name in constants})
    source = ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(options, enable_fp_fusion=FP_FUSION))


def build(precision: str = "bf16", use_cosine_sim: bool = False, dim: int = 256, candidates: int = 16,
          config: tuple[int, int, int, int] = (64, 32, 4, 3), arch: int = 90):
    """The compiled kernel (Triton's CompiledKernel, with ``asm`` and ``metadata``) for one configuration."""
    from .kernel import _nearest_kernel, search_constants

    block_n, block_k, warps, stages = config
    constants = dict(search_constants(use_cosine_sim, precision, candidates, dim, emulated=False),
                     BLOCK_N=block_n, BLOCK_K=block_k)
    return _compile(_nearest_kernel, _search_arguments(precision), constants, arch, num_warps=warps,
                    num_stages=stages)


def build_prepare(precision: str = "bf16", use_cosine_sim: bool = False, dim: int = 256, arch: int = 90):
    """The compiled preparing kernel (the codes' side of a search) for one precision."""
    from .kernel import _prepare_codes_kernel, prepare_constants

    arguments = dict(codes_ptr="*fp32", center_ptr="*fp32", score_codes_ptr="*bf16" if precision == "bf16" else
                     "*fp32", code_stats_ptr="*fp32", k="i32", d="i32")
    constants = prepare_constants(use_cosine_sim, precision, dim, emulated=False)
    return _compile(_prepare_codes_kernel, arguments, constants, arch, num_warps=4)


def register_report(ptx: str, arch: int) -> str:
    """ptxas -v's registers and spills, from the first ptxas shipped with Triton that reads this PTX."""
    import triton

    tools = sorted((Path(triton.__file__).parent / "backends" / "nvidia" / "bin").glob("ptxas*"), reverse=True)
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "kernel.ptx"
        path.write_text(ptx)
        for tool in tools:
            run = subprocess.run([str(tool), f"-arch=sm_{arch}a", "-v", str(path), "-o", str(Path(work) / "k.o")],
                                 capture_output=True, text=True)
            if run.returncode == 0:
                lines = [line.split("info    :")[-1].strip() for line in run.stderr.splitlines()
                         if "registers" in line or "spill" in line]
                return "; ".join(lines)
    return "no ptxas here reads this PTX"


def main(argv=None) -> None:
    from .kernel import TUNING_CONFIGS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=16)
    args = parser.parse_args(argv)
    failures = 0
    for precision, configs in TUNING_CONFIGS.items():
        for use_cosine_sim in (False, True):
            label = f"{precision:>4} {'cosine' if use_cosine_sim else 'euclid'} preparing kernel"
            try:
                kernel = build_prepare(precision, use_cosine_sim, args.dim, args.arch)
                print(f"{label}: shared {kernel.metadata.shared / 1024:.0f} KiB; "
                      f"{register_report(kernel.asm['ptx'], args.arch)}", flush=True)
            except Exception as error:  # report every kernel, then fail
                failures += 1
                print(f"{label}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
            for config in configs:
                label = f"{precision:>4} {'cosine' if use_cosine_sim else 'euclid'} {config}"
                try:
                    kernel = build(precision, use_cosine_sim, args.dim, args.candidates, config, args.arch)
                except Exception as error:  # report every configuration, then fail
                    failures += 1
                    print(f"{label}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
                    continue
                shared = kernel.metadata.shared
                fits = "ok" if shared <= SHARED_MEMORY_LIMIT else "OVER THE LIMIT"
                failures += shared > SHARED_MEMORY_LIMIT
                print(f"{label}: shared {shared / 1024:.0f} KiB ({fits}); "
                      f"{register_report(kernel.asm['ptx'], args.arch)}", flush=True)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
