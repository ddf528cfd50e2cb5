"""VectorQuantize: vqdeploy vs vector-quantize-pytorch 1.14.17, side by side in one run.

    python benchmarks/bench_vector_quantize.py [--device cpu|cuda] [--codebook-sizes 1024 8192]
        [--batch 8 --tokens 1024] [--iters 20] [--json out.json]

For each codebook size it times the eval forward and a training step (forward, backward with the EMA update)
of both libraries, eagerly and under torch.compile, and reports the median time, the peak memory and the
reference/vqdeploy ratios (see harness.py for how cases run).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import add_execution_arguments, compare, hardware, write_json  # noqa: E402

DEFAULT_DIM = 256


def build(impl: str, dim: int, codebook_size: int):
    if impl == "reference":
        from vector_quantize_pytorch import VectorQuantize
    else:  # the reference's (1.14.17's) defaults: the same computation (straight-through, not the rotation trick)
        from vqdeploy import VectorQuantize

        VectorQuantize = functools.partial(VectorQuantize, defaults="1.14.17")
    return VectorQuantize(dim=dim, codebook_size=codebook_size, decay=0.8, commitment_weight=1.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM)
    parser.add_argument("--codebook-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    add_execution_arguments(parser)
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    batch = args.batch or (64 if on_cuda else 8)
    sizes = args.codebook_sizes or ([1024, 8192] if on_cuda else [1024])
    iters = args.iters or (50 if on_cuda else 10)
    shape = (batch, args.tokens, args.dim)
    print(f"# VectorQuantize; torch {torch.__version__}, {hardware(device)}; dim {args.dim}, "
          f"{batch} x {args.tokens} tokens, median of {iters}")
    cases = [dict(name=f"{size} codes", dim=args.dim, codebook_size=size) for size in sizes]
    rows = compare("bench_vector_quantize:build", cases, shape, device, iters, label="codebook",
                    executions=args.executions, reference_executions=args.reference_executions)
    write_json(args.json, device, shape, rows)


if __name__ == "__main__":
    main()
