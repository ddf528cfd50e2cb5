"""A large codebook (SimVQ, image tokenizers): one VectorQuantize training step with 65,536 codes of dim 256 on
16 x 1024 tokens, vqdeploy (eager and compiled) beside vector-quantize-pytorch 1.14.17 and 1.32.0, in one run;
with ``--quantizer simvq``, one SimVQ training step beside 1.32.0's (the release that has it).

    python benchmarks/bench_large_codebook.py [--quantizer vq|simvq] [--codebook-size 65536] [--dim 256]
        [--batches 4 16] [--tokens 1024] [--iters 2] [--json out.json]

Every implementation runs in a fresh process from the same codebook (1.14.17's initial state, saved as
safetensors) and the same input: one warm-up step (the compile, for vqdeploy compiled), then ``--iters`` timed
steps from the same starting state.  Reported: the median step time, the peak RSS during the timed steps above
the RSS before them (the memory a step needs beyond the model and the input; Linux resets the peak first), their ratios to 1.14.17's, and how many of
the step's indices differ from 1.14.17's (float32 near-ties aside, none).  The references build the tokens x codes distance matrix and a one-hot of the
same size; vqdeploy matches rows block by block (``search/torch_path.SCORE_BLOCK_ELEMENTS``) and sums per code with an
index_add.  1.32.0 comes from tests/install-references.sh (``.reference/vqp-1.32.0``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import peak_rss, reset_peak_rss  # noqa: E402

IMPLEMENTATIONS = {"vq": ("1.14.17", "1.32.0", "vqdeploy", "vqdeploy compiled"),
                   "simvq": ("1.32.0", "vqdeploy", "vqdeploy compiled")}


def _step(impl: str, work: str, args: dict, queue) -> None:
    warnings.filterwarnings("ignore")
    if impl == "1.32.0":
        sys.path.insert(0, str(ROOT / ".reference" / "vqp-1.32.0"))
    import torch
    from safetensors.torch import load_file, save_file

    try:
        config = dict(dim=args["dim"], codebook_size=args["codebook_size"], decay=0.8, commitment_weight=1.0)
        if args["quantizer"] == "simvq":
            import vector_quantize_pytorch
            import vqdeploy

            library = vqdeploy if impl.startswith("vqdeploy") else vector_quantize_pytorch
            model = library.SimVQ(dim=args["dim"], codebook_size=args["codebook_size"])
        elif impl.startswith("vqdeploy"):
            from vqdeploy import VectorQuantize

            model = VectorQuantize(**config, defaults="1.14.17")
        else:
            import vector_quantize_pytorch

            assert vector_quantize_pytorch.__file__.startswith(str(ROOT)) == (impl == "1.32.0")
            extra = dict(rotation_trick=False) if impl == "1.32.0" else {}  # the same gradient as 1.14.17's
            model = vector_quantize_pytorch.VectorQuantize(**config, **extra)
        state = load_file(os.path.join(work, "state.safetensors"))
        model.load_state_dict({k: v.reshape(model.state_dict()[k].shape).to(model.state_dict()[k].dtype)
                               for k, v in state.items()})
        start_state = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        step = torch.compile(model, fullgraph=True) if impl == "vqdeploy compiled" else model
        x = load_file(os.path.join(work, "x.safetensors"))["x"]

        def run():
            model.load_state_dict(start_state)
            inp = x.detach().requires_grad_()
            quantized, indices, loss = step(inp)
            (quantized.square().mean() + loss.sum()).backward()
            return indices

        run()  # warm-up (and compile)
        model.zero_grad(set_to_none=True)
        rss_before = reset_peak_rss()
        times = []
        for _ in range(args["iters"]):
            begin = time.perf_counter()
            indices = run()
            times.append(time.perf_counter() - begin)
        peak_mb = (peak_rss() - rss_before) / 1024
        save_file({"indices": indices.contiguous()}, os.path.join(work, f"{impl.replace(' ', '_')}.safetensors"))
        queue.put(dict(seconds=statistics.median(times), peak_mb=peak_mb))
    except Exception as error:  # reported, not fatal
        queue.put(dict(error=f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"))


def _run(impl: str, work: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_step, args=(impl, work, args, queue))
    process.start()
    process.join()
    return queue.get() if not queue.empty() else dict(error=f"exit code {process.exitcode}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantizer", choices=sorted(IMPLEMENTATIONS), default="vq")
    parser.add_argument("--codebook-size", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16],
                        help="batch sizes to run (each a table); the references need ~20 GB at 16")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = vars(parser.parse_args(argv))

    import torch

    # 1.14.17 decorates with the deprecated torch.cuda.amp.autocast: its FutureWarnings are not this run's news
    warnings.filterwarnings("ignore", category=FutureWarning, module="vector_quantize_pytorch")
    name = "SimVQ" if args["quantizer"] == "simvq" else "VectorQuantize"
    print(f"# one {name} training step: {args['codebook_size']:,} codes of dim {args['dim']}, "
          f"batch x {args['tokens']} tokens; torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; "
          f"median of {args['iters']} steps after one warm-up")
    tables = {batch: _table(dict(args, batch=batch)) for batch in args["batches"]}
    if args["json"]:
        with open(args["json"], "w") as file:
            json.dump({str(batch): rows for batch, rows in tables.items()}, file, indent=2)


def _table(args: dict) -> dict:
    """One batch size: every implementation, then the table (ratios to 1.14.17 where it ran)."""
    import torch
    from safetensors.torch import load_file, save_file
    from vector_quantize_pytorch import VectorQuantize

    rows, indices = {}, {}
    implementations = IMPLEMENTATIONS[args["quantizer"]]
    with tempfile.TemporaryDirectory() as work:
        torch.manual_seed(0)
        if args["quantizer"] == "simvq":  # the same state keys in both libraries
            from vqdeploy import SimVQ

            reference = SimVQ(dim=args["dim"], codebook_size=args["codebook_size"])
        else:
            reference = VectorQuantize(dim=args["dim"], codebook_size=args["codebook_size"])
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, os.path.join(work, "state.safetensors"))
        save_file({"x": torch.randn(args["batch"], args["tokens"], args["dim"])}, os.path.join(work, "x.safetensors"))
        del reference
        for impl in implementations:
            print(f"[large codebook] batch {args['batch']}: {impl} ...", flush=True)
            rows[impl] = _run(impl, work, args)
            path = os.path.join(work, f"{impl.replace(' ', '_')}.safetensors")
            if "error" not in rows[impl] and os.path.exists(path):
                indices[impl] = load_file(path)["indices"]
    base_name = implementations[0]
    base = rows[base_name]
    header = (f"{'batch ' + str(args['batch']):>8} {'implementation':>18} | {'step s':>7} {'speed-up':>8} | "
              f"{'peak MB':>8} {'memory':>7} | indices against {base_name}")
    print(header)
    print("-" * len(header))
    for impl, row in rows.items():
        if "error" in row:
            reason = "killed: out of memory" if row["error"] == "exit code -9" else row["error"]
            print(f"{'':>8} {impl:>18} | {reason}")
            continue
        speedup = f"{base['seconds'] / row['seconds']:7.2f}x" if "seconds" in base else f"{'n/a':>8}"
        memory = f"{row['peak_mb'] / base['peak_mb']:6.2f}x" if base.get("peak_mb") else f"{'n/a':>7}"
        same = f"n/a ({base_name} did not run)"
        if base_name in indices:
            row["indices_differing"] = int((indices[impl] != indices[base_name]).sum())
            differ = row["indices_differing"]
            same = "identical" if differ == 0 else f"{differ} of {indices[impl].numel()} differ"
        print(f"{'':>8} {impl:>18} | {row['seconds']:7.2f} {speedup} | {row['peak_mb']:8.0f} {memory} | {same}")
    return rows


if __name__ == "__main__":
    main()
