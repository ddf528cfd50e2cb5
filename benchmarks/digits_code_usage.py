"""Code usage of VectorQuantize with each library's defaults, trained the same way: vqdeploy against
vector-quantize-pytorch 1.32.0 on UCI digits (8x8 images, shipped inside scikit-learn, so nothing is downloaded).

A small convolutional autoencoder (8x8 -> 4x4 tokens of dimension 16 -> 8x8) with ``VectorQuantize(dim=16,
codebook_size=64)`` at each library's defaults trains for ``--steps`` Adam steps on batches of 64 images; then the
whole dataset is encoded in eval mode and the code perplexity (exp of the entropy of the code histogram) and the
reconstruction error are measured.  Every (library, seed) runs in a fresh process; a seed gives both libraries
the same network initialisation, codebook and batches.  One seed's difference is mostly the seed's: the table
gives each library's mean and spread over ``--seeds`` seeds, and the ratio of the means.

    pip install -e ".[bench]" && bash tests/install-references.sh
    python benchmarks/digits_code_usage.py [--seeds 5] [--steps 600]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import warnings
from pathlib import Path

REFERENCE_1_32 = Path(__file__).resolve().parents[1] / ".reference" / "vqp-1.32.0"
LIBRARIES = ("vqdeploy", "1.32.0")


def _train(library: str, seed: int, steps: int, queue) -> None:
    warnings.filterwarnings("ignore")
    if library == "1.32.0":
        sys.path.insert(0, str(REFERENCE_1_32))
        from vector_quantize_pytorch import VectorQuantize
    else:
        from vqdeploy import VectorQuantize
    import torch
    from einops import rearrange
    from sklearn.datasets import load_digits
    from torch import nn

    torch.set_num_threads(1)
    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 4, stride=2, padding=1),
                            nn.ReLU(), nn.Conv2d(32, 16, 1))
    decoder = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                            nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 3, padding=1))
    quantizer = VectorQuantize(dim=16, codebook_size=64)

    def run(x):
        tokens = rearrange(encoder(x), "b d h w -> b (h w) d")
        quantized, indices, loss = quantizer(tokens)[:3]
        return decoder(rearrange(quantized, "b (h w) d -> b d h w", h=4)), indices, loss.sum()

    parameters = [*encoder.parameters(), *decoder.parameters(), *quantizer.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    batches = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = images[torch.randint(0, len(images), (64,), generator=batches)]
        reconstructed, _, loss = run(x)
        (nn.functional.mse_loss(reconstructed, x) + loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    for module in (encoder, decoder, quantizer):
        module.eval()
    with torch.no_grad():
        reconstructed, indices, _ = run(images)
    counts = torch.bincount(indices.flatten(), minlength=64).double()
    p = counts[counts > 0] / counts.sum()
    queue.put((float(torch.exp(-(p * p.log()).sum())), float(nn.functional.mse_loss(reconstructed, images))))


def measure(library: str, seed: int, steps: int) -> tuple[float, float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_train, args=(library, seed, steps, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    if not (REFERENCE_1_32 / "vector_quantize_pytorch").is_dir():
        sys.exit(f"error: vector-quantize-pytorch 1.32.0 is not in {REFERENCE_1_32}: run bash tests/install-references.sh")
    results = {library: [] for library in LIBRARIES}
    for seed in range(args.seeds):
        for library in LIBRARIES:
            results[library].append(measure(library, seed, args.steps))
        print(f"seed {seed}: " + ", ".join(f"{library} perplexity {results[library][-1][0]:.1f} mse "
                                           f"{results[library][-1][1]:.4f}" for library in LIBRARIES), flush=True)
    print(f"\n{args.seeds} seeds, {args.steps} steps | perplexity (mean +- sd) | reconstruction mse (mean +- sd)")
    means = {}
    for library in LIBRARIES:
        perplexity, error = zip(*results[library])
        means[library] = (statistics.mean(perplexity), statistics.mean(error))
        spread = lambda values: statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{library:>9} | {means[library][0]:.1f} +- {spread(perplexity):.1f} | "
              f"{means[library][1]:.4f} +- {spread(error):.4f}")
    print(f"vqdeploy / 1.32.0: perplexity {means['vqdeploy'][0] / means['1.32.0'][0]:.3f}, "
          f"mse {means['vqdeploy'][1] / means['1.32.0'][1]:.3f}")


if __name__ == "__main__":
    main()
