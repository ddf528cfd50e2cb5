"""Downstream packages, unedited, side by side on vector-quantize-pytorch 1.32.0 and on vqdeploy.

For audiolm-pytorch 2.4.0's SoundStream, meshgpt-pytorch 1.7.2's MeshAutoencoder (with ResidualVQ, and with its
default ResidualLFQ) and magvit2-pytorch 0.5.1's VideoTokenizer (spherical LFQ, and FSQ) (small configurations,
see tests/downstream_worker.py) this trains the same seeded model N steps with each library, then loads the
reference's trained checkpoint into the vqdeploy model and compares held-out tokens, and exports vqdeploy's
quantizer with onnxruntime verification on the features the model feeds it.  Each run is a subprocess (the two
libraries share the package name); the table gives losses, held-out reconstruction and time per step, and
the ratio of vqdeploy's time to the reference's.

    bash tests/install-downstream.sh && bash tests/install-references.sh
    python benchmarks/downstream.py [--soundstream-steps 30] [--meshgpt-steps 300] [--magvit2-steps 100]
        [--packages soundstream meshgpt meshgpt_lfq magvit2_bsq magvit2_fsq]

The two runs draw different random numbers (k-means sampling, quantize dropout, stochastic code sampling), so
their losses follow each other without being equal; the tokens from one checkpoint are compared exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "downstream_worker.py"
REFERENCE = ROOT / ".reference" / "vqp-1.32.0"


def run(package: str, backend: str, out: Path, *arguments: str) -> dict:
    first = REFERENCE if backend == "reference" else ROOT
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(first), os.environ.get("PYTHONPATH", "")]))
    print(f"[downstream] {package} on {backend} ...", flush=True)
    done = subprocess.run([sys.executable, str(WORKER), package, backend, str(out), *arguments], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{package} on {backend} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads((out / "result.json").read_text())


def _tokens_agree(folder: Path) -> str:
    from safetensors.torch import load_file

    expected = load_file(folder / "reference" / "trained.safetensors")["tokens"]
    got = load_file(folder / "from-reference" / "loaded.safetensors")["tokens"]
    return f"{int((got == expected).sum())}/{expected.numel()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soundstream-steps", type=int, default=30)
    parser.add_argument("--meshgpt-steps", type=int, default=300, help="also meshgpt_lfq's")
    parser.add_argument("--magvit2-steps", type=int, default=100)
    parser.add_argument("--packages", nargs="+", default=["soundstream", "meshgpt", "meshgpt_lfq", "magvit2_bsq",
                                                          "magvit2_fsq"])
    args = parser.parse_args(argv)
    steps_of = {"soundstream": args.soundstream_steps, "meshgpt": args.meshgpt_steps,
                "meshgpt_lfq": args.meshgpt_steps, "magvit2_bsq": args.magvit2_steps,
                "magvit2_fsq": args.magvit2_steps}
    if not (REFERENCE / "vector_quantize_pytorch").is_dir():
        raise SystemExit("vector-quantize-pytorch 1.32.0 is missing: run `bash tests/install-references.sh`")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for package in args.packages:
            steps = steps_of[package]
            folder = Path(work) / package
            reference = run(package, "reference", folder / "reference", "--steps", str(steps))
            ours = run(package, "vqdeploy", folder / "vqdeploy", "--steps", str(steps), "--export")
            loaded = run(package, "vqdeploy", folder / "from-reference", "--steps", "0",
                         "--load", str(folder / "reference" / "state.safetensors"))
            rows.append((package, steps, reference, ours, loaded, _tokens_agree(folder)))
    print()
    for package, steps, reference, ours, loaded, agree in rows:
        print(f"{package}: {steps} training steps, quantizer {ours['quantizer']}")
        last = max(1, steps // 10)
        print(f"  {'':40} {'vector-quantize-pytorch 1.32.0':>31} {'vqdeploy':>12}")
        for label, pick in (("loss, first step", lambda r: r["losses"][0]),
                            (f"loss, mean of the last {last}", lambda r: sum(r["losses"][-last:]) / last)):
            print(f"  {label:40} {pick(reference):>31.4f} {pick(ours):>12.4f}")
        for metric in reference["trained"]:
            print(f"  {metric:40} {reference['trained'][metric]:>31.4f} {ours['trained'][metric]:>12.4f}")
        ratio = ours["seconds per step"] / reference["seconds per step"]
        print(f"  {'seconds per training step':40} {reference['seconds per step']:>31.4f} "
              f"{ours['seconds per step']:>12.4f}  (ratio {ratio:.2f})")
        print(f"  the reference's checkpoint on vqdeploy: held-out tokens identical {agree}, "
              f"held-out figures {'identical' if loaded['loaded'] == reference['trained'] else 'DIFFERENT'}")
        export = ours["export"]
        print(f"  export of vqdeploy's quantizer: {export['tokens']} tokens, {export['real']} real disagreements, "
              f"{export['near ties']} near-ties, decoder max |error| {export['max abs error']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
