"""ResidualVQ: vqdeploy vs vector-quantize-pytorch 1.14.17, side by side in one run.

    python benchmarks/bench_residual_vq.py [--device cpu|cuda] [--num-quantizers 8] [--codebook-size 1024]
        [--batch 4 --tokens 1024] [--iters 10] [--quantize-dropout] [--json out.json]

Times the eval forward and a training step (forward, backward, EMA updates of every layer) of a ResidualVQ
with dim 256 and 8 quantizers of 1024 codes (the SoundStream/EnCodec shape), eagerly and under
torch.compile, and reports medians, peak memory and reference/vqdeploy ratios (see harness.py).
Defaults: 4 x 1024 tokens on CPU, 64 x 1024 on CUDA.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import add_execution_arguments, compare, hardware, write_json  # noqa: E402


def build(impl: str, dim: int, num_quantizers: int, codebook_size: int, quantize_dropout: bool):
    if impl == "reference":
        from vector_quantize_pytorch import ResidualVQ
    else:  # the reference's (1.14.17's) defaults: the same computation (straight-through, not the rotation trick)
        from vqdeploy import ResidualVQ

        ResidualVQ = functools.partial(ResidualVQ, defaults="1.14.17")
    return ResidualVQ(dim=dim, num_quantizers=num_quantizers, codebook_size=codebook_size, decay=0.8,
                      commitment_weight=1.0, quantize_dropout=quantize_dropout)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-quantizers", type=int, default=8)
    parser.add_argument("--codebook-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--quantize-dropout", action="store_true", help="also time a case with quantize dropout")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    add_execution_arguments(parser)
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    batch = args.batch or (64 if on_cuda else 4)
    iters = args.iters or (50 if on_cuda else 10)
    shape = (batch, args.tokens, args.dim)
    print(f"# ResidualVQ, {args.num_quantizers} x {args.codebook_size} codes; torch {torch.__version__}, "
          f"{hardware(device)}; dim {args.dim}, {batch} x {args.tokens} tokens, median of {iters}")
    base = dict(dim=args.dim, num_quantizers=args.num_quantizers, codebook_size=args.codebook_size)
    cases = [dict(name="plain", quantize_dropout=False, **base)]
    if args.quantize_dropout:
        cases.append(dict(name="dropout", quantize_dropout=True, **base))
    rows = compare("bench_residual_vq:build", cases, shape, device, iters, label="case",
                    executions=args.executions, reference_executions=args.reference_executions)
    write_json(args.json, device, shape, rows, num_quantizers=args.num_quantizers, codebook_size=args.codebook_size)


if __name__ == "__main__":
    main()
