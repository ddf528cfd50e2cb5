"""FSQ, ResidualFSQ, LFQ and LatentQuantize: vqdeploy vs vector-quantize-pytorch 1.14.17 and 1.32.0, side by side
in one run.

    python benchmarks/bench_scalar.py [--device cpu|cuda] [--batch 4 --tokens 1024] [--iters 10]
        [--cases fsq rfsq lfq16 lfq18 bsq16 latent] [--references reference 1.32.0] [--json out.json]

Times the eval forward and a training step of each quantizer eagerly and under torch.compile, with peak memory
(see harness.py). LFQ's training step is where the two differ most: the reference's entropy loss builds
(tokens x 2^d) tables, vqdeploy's factorised loss does not. The 2^18 case runs 16 x 1024 tokens and vqdeploy
only: the reference's tables would need about 17 GB each.  ``bsq16`` is 1.32.0's spherical LFQ (magvit2-pytorch's),
which 1.14.17 lacks.  Each module is built with its library's own defaults (vqdeploy's are 1.32.0's).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from harness import add_execution_arguments, compare, hardware, write_json  # noqa: E402


def build(impl: str, kind: str, **options):
    import vector_quantize_pytorch as reference

    import vqdeploy

    library = vqdeploy if impl == "vqdeploy" else reference  # 1.14.17, or 1.32.0 on the path (harness.py)
    module = getattr(library, kind)(**options)
    if kind == "LatentQuantize" and impl == "reference":  # 1.14.17 reads (b, n, dim); the others (b, dim, n)
        return ChannelFirst(module)
    return module


class ChannelFirst(torch.nn.Module):
    """Feeds 1.14.17's LatentQuantize the (b, dim, n) input the case uses, as (b, n, dim)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module

    def forward(self, x: torch.Tensor):
        quantized, indices, loss = self.inner(x.transpose(1, 2))
        return quantized.transpose(1, 2), indices, loss


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--cases", nargs="+", default=["fsq", "rfsq", "lfq16", "lfq18", "bsq16", "latent"])
    parser.add_argument("--references", nargs="*", default=["reference", "1.32.0"],
                        help="reference (1.14.17) and/or 1.32.0")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    add_execution_arguments(parser)
    args = parser.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    batch = args.batch or (16 if on_cuda else 4)
    iters = args.iters or (50 if on_cuda else 10)
    print(f"# scalar quantizers; torch {torch.__version__}, {hardware(device)}; {batch} x {args.tokens} tokens "
          f"(lfq18: 16 x {args.tokens}), median of {iters}")
    all_cases = {
        "fsq": dict(name="fsq", kind="FSQ", levels=[8, 5, 5, 5], dim=256, shape=(batch, args.tokens, 256)),
        "rfsq": dict(name="rfsq x8", kind="ResidualFSQ", levels=[8, 5, 5, 5], dim=256, num_quantizers=8,
                     shape=(batch, args.tokens, 256)),
        "lfq16": dict(name="lfq 2^16", kind="LFQ", dim=16, codebook_size=2**16, shape=(batch, args.tokens, 16)),
        "lfq18": dict(name="lfq 2^18", kind="LFQ", dim=18, codebook_size=2**18, shape=(16, args.tokens, 18),
                      modes=("train",), skip_reference="not run: needs ~17 GB per (tokens x 2^18) table"),
        "bsq16": dict(name="bsq 2^16", kind="LFQ", dim=16, codebook_size=2**16, spherical=True,
                      shape=(batch, args.tokens, 16), only=("1.32.0",)),
        "latent": dict(name="latent", kind="LatentQuantize", levels=[8, 5, 5, 5], dim=256,
                       shape=(batch, 256, args.tokens)),  # channel-first, as 1.32.0 reads it
    }
    cases = [all_cases[name] for name in args.cases]
    rows = []
    for case in cases:  # bsq16: 1.32.0 only (1.14.17 has no spherical LFQ)
        references = [r for r in args.references if r in case.pop("only", args.references)]
        rows += compare("bench_scalar:build", [case], (batch, args.tokens, 16), device, iters, label="case",
                        references=tuple(references), executions=args.executions,
                        reference_executions=args.reference_executions)
    write_json(args.json, device, (batch, args.tokens), rows)


if __name__ == "__main__":
    main()
