"""onnxruntime encode/decode next to PyTorch eager and compiled, on exported bundles, in one run.

    python benchmarks/bench_export.py [--device cpu|cuda] [--batch 4 --tokens 1024] [--iters 20]
        [--cases vq rvq] [--json out.json]

Cases: VectorQuantize (dim 256, 1024 codes) and ResidualVQ (dim 256, 8 x 1024 codes). Each is exported (and
verified) to a temporary bundle; then PyTorch eager, PyTorch compiled (fullgraph) and onnxruntime (CPU provider,
or CUDA with IO binding of torch tensors) time encode (features -> indices) and decode (indices -> features),
median of --iters calls after warm-up. Indices from onnxruntime are compared with PyTorch's on the same input.
On CUDA the compiled encoder is also timed with the float32 torch search in place of the fused kernel
(vqdeploy.search), the computation the ONNX graph holds.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import hardware, write_json  # noqa: E402


def build(name: str):
    import vqdeploy

    if name == "vq":
        return vqdeploy.VectorQuantize(dim=256, codebook_size=1024)
    return vqdeploy.ResidualVQ(dim=256, codebook_size=1024, num_quantizers=8)


def run_case(name: str, device: str, batch: int, tokens: int, iters: int) -> list[dict]:
    import torch

    from vqdeploy.export import export
    from vqdeploy.export.graphs import DecoderGraph, EncoderGraph
    from vqdeploy.export.ties import compare_indices
    from vqdeploy.runtime import Session
    from vqdeploy.search import fused_search_settings
    from vqdeploy.timing import median_ms

    torch.manual_seed(0)
    quantizer = build(name).eval()
    with tempfile.TemporaryDirectory() as directory:
        export(quantizer, directory, overwrite=True)
        session = Session(directory, provider="cuda" if device == "cuda" else "cpu")
        quantizer = quantizer.to(device)
        encoder, decoder = EncoderGraph(quantizer).to(device), DecoderGraph(quantizer).to(device)
        compiled_encoder = torch.compile(encoder, fullgraph=True)
        compiled_decoder = torch.compile(decoder, fullgraph=True)
        x = torch.randn(batch, tokens, 256, device=device)
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        feed = x if device == "cuda" else x.numpy()  # CUDA: IO binding of torch tensors; CPU: numpy
        with torch.no_grad():
            indices = encoder(x)
            ort_indices = torch.as_tensor(session.encode(feed), device=device)
            agreement = compare_indices(quantizer, x, indices, ort_indices)
            agreement_counts = f"{agreement.identical}/{agreement.near_ties}/{agreement.real}"
            index_feed = indices if device == "cuda" else indices.cpu().numpy()
            rows = []
            if device == "cuda":  # the compiled encoder again, with the float32 torch search instead of the fused one
                with fused_search_settings(enabled=False):
                    torch_search_encoder = torch.compile(EncoderGraph(quantizer).to(device), fullgraph=True)
                    torch_search_ms = median_ms(lambda: torch_search_encoder(x), iters, warmup=3, sync=sync)
            for graph, eager, compiled, ort_call in (
                    ("encode", lambda: encoder(x), lambda: compiled_encoder(x), lambda: session.encode(feed)),
                    ("decode", lambda: decoder(indices), lambda: compiled_decoder(indices),
                     lambda: session.decode(index_feed))):
                eager_ms = median_ms(eager, iters, warmup=3, sync=sync)  # warm-up includes compiling
                compiled_ms = median_ms(compiled, iters, warmup=3, sync=sync)
                ort_ms = median_ms(ort_call, iters, warmup=3, sync=sync)
                rows.append(dict(case=name, graph=graph, eager_ms=eager_ms, compiled_ms=compiled_ms, ort_ms=ort_ms,
                                 providers=session.providers[0], tokens_identical_near_tie_real=agreement_counts))
                if graph == "encode" and device == "cuda":
                    rows[-1]["compiled_torch_search_ms"] = torch_search_ms
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--cases", nargs="+", default=["vq", "rvq"], choices=["vq", "rvq"])
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (64 if device == "cuda" else 4)
    print(f"# export: torch {torch.__version__}, {hardware(device)}; {batch} x {args.tokens} tokens of dim 256, "
          f"median of {args.iters}")
    print(f"{'case':>5} {'graph':>7} | {'eager ms':>9} {'compiled ms':>11} {'ort ms':>8} | {'ort/eager':>9} "
          f"{'ort/compiled':>12} | tokens identical/near-tie/real")
    all_rows = []
    for name in args.cases:
        for row in run_case(name, device, batch, args.tokens, args.iters):
            all_rows.append(row)
            print(f"{row['case']:>5} {row['graph']:>7} | {row['eager_ms']:9.2f} {row['compiled_ms']:11.2f} "
                  f"{row['ort_ms']:8.2f} | {row['ort_ms'] / row['eager_ms']:8.2f}x "
                  f"{row['ort_ms'] / row['compiled_ms']:11.2f}x | {row['tokens_identical_near_tie_real']} "
                  f"({row['providers']})",
                  flush=True)
            if "compiled_torch_search_ms" in row:
                print(f"{'':>5} {'':>7} | compiled with the float32 torch search (no fused kernel): "
                      f"{row['compiled_torch_search_ms']:.2f} ms, ort/that "
                      f"{row['ort_ms'] / row['compiled_torch_search_ms']:.2f}x", flush=True)
    write_json(args.json, device, (batch, args.tokens, 256), all_rows)


if __name__ == "__main__":
    main()
