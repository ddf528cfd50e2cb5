"""Train a small VQ autoencoder on built-in data with torch.compile and report how the codebook learns.

    python -m vqdeploy.demo [--steps 300] [--eager] [--device cuda]

The data is a fixed mixture of Gaussian clusters (more clusters than codes, so
the codebook has to spread out).  A linear encoder, a VectorQuantize (EMA
codebook, k-means init, dead-code replacement) and a linear decoder train as
one graph; each block of steps prints the reconstruction error, the VQ loss,
the share of codes used and the perplexity of code usage.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from torch import nn

from .vector_quantize import VectorQuantize


class TinyCodec(nn.Module):
    """encoder -> VectorQuantize -> decoder, the shape of a neural codec or tokenizer."""

    def __init__(self, dim: int, latent_dim: int, codebook_size: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, 128), nn.GELU(), nn.Linear(128, latent_dim))
        self.vq = VectorQuantize(dim=latent_dim, codebook_size=codebook_size, decay=0.9, kmeans_init=True,
                                 threshold_ema_dead_code=2, commitment_weight=0.25)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 128), nn.GELU(), nn.Linear(128, dim))

    def forward(self, x):
        quantized, indices, vq_loss = self.vq(self.encoder(x))
        reconstruction = self.decoder(quantized)
        return reconstruction, indices, vq_loss.sum()


def clustered_batches(dim: int, num_clusters: int, batch: int, tokens: int, device: str, seed: int = 0):
    """An endless stream of (batch, tokens, dim) samples around fixed random centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_clusters, dim, generator=generator) * 3
    spread = 0.3 + torch.rand(num_clusters, 1, generator=generator)
    while True:
        which = torch.randint(0, num_clusters, (batch, tokens), generator=generator)
        noise = torch.randn(batch, tokens, dim, generator=generator)
        yield (centres[which] + spread[which] * noise).to(device)


def usage_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(share of codes used, perplexity) from per-code counts."""
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return float((counts > 0).float().mean()), math.exp(float(entropy))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block", type=int, default=50, help="steps per printed line")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--eager", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    codec = TinyCodec(args.dim, args.latent_dim, args.codebook_size).to(args.device)
    model = codec if args.eager else torch.compile(codec, fullgraph=True)
    optimizer = torch.optim.Adam(codec.parameters(), lr=1e-3)
    batches = clustered_batches(args.dim, 4 * args.codebook_size, args.batch, args.tokens, args.device)
    mode = "eager" if args.eager else "torch.compile(fullgraph=True)"
    print(f"TinyCodec: VectorQuantize(dim={args.latent_dim}, codebook_size={args.codebook_size}) "
          f"on {args.device}, {mode}")
    print(f"{'steps':>11} {'recon mse':>10} {'vq loss':>9} {'used':>6} {'perplexity':>10} {'ms/step':>8}")

    counts = torch.zeros(args.codebook_size, device=args.device)
    recon_sum = vq_sum = 0.0
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = next(batches)
        reconstruction, indices, vq_loss = model(x)
        recon = (reconstruction - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        (recon + vq_loss).backward()
        optimizer.step()
        if step == 1:
            codec.train()  # the codebook now knows k-means ran: the next call recompiles without the cond
        counts += torch.bincount(indices.flatten(), minlength=args.codebook_size)
        recon_sum += float(recon.detach())
        vq_sum += float(vq_loss.detach())
        if step % args.block == 0 or step == args.steps:
            n = (step - 1) % args.block + 1
            used, perplexity = usage_stats(counts)
            elapsed = (time.perf_counter() - started) * 1000 / n
            print(f"{step - n + 1:>5}-{step:<5} {recon_sum / n:10.4f} {vq_sum / n:9.4f} {used:6.1%} "
                  f"{perplexity:10.1f} {elapsed:8.1f}")
            counts.zero_()
            recon_sum = vq_sum = 0.0
            started = time.perf_counter()
    print(f"skipped codebook updates (NaN/Inf batches): {int(codec.vq._codebook.skipped_updates)}")


if __name__ == "__main__":
    main()
