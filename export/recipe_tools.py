"""Helpers the export recipes share: their common options, compiled training with a lazily initialised
codebook, and code usage.

The recipes (codec.py, tokenizer.py) import this file from their own folder: copy the folder as a whole.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from vqdeploy.timing import median_ms

__all__ = ["recipe_parser", "endless", "train", "usage", "index_agreement", "median_ms"]


def recipe_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every recipe takes: training steps, batch, output bundle, eager training."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--eager", action="store_true", help="train without torch.compile")
    return parser


def endless(make_batch):
    """An endless iterator of ``make_batch()``."""
    while True:
        yield make_batch()


def usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(share of codes used, perplexity of code usage) over all indices given (-1 ignored)."""
    counts = torch.bincount(indices[indices >= 0].flatten().long(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return float((counts > 0).float().mean()), math.exp(float(entropy))


def index_agreement(quantizer: torch.nn.Module, features: torch.Tensor, indices: torch.Tensor, ort_indices) -> str:
    """onnxruntime's indices against PyTorch's, token by token, as export verification counts them (a near-tie
    is a token within float32 rounding of a decision boundary; ``features``: the quantizer's input)."""
    from vqdeploy.export.ties import compare_indices

    agreement = compare_indices(quantizer, features, indices, torch.as_tensor(ort_indices), wrapped=True)
    return (f"tokens identical {agreement.identical} of {agreement.tokens}, near-ties {agreement.near_ties}, "
            f"real disagreements {agreement.real}")


def train(model: torch.nn.Module, batches, args: argparse.Namespace, name: str, loss_fn, lr: float = 2e-3,
          log_every: int = 50) -> torch.nn.Module:
    """``args.steps`` Adam steps on ``loss_fn(model, batch) -> (loss, log dict)``, under
    torch.compile(fullgraph=True) unless ``args.eager``.

    The first step runs eagerly so that k-means initialises the codebooks outside the graph; the compiled steps
    then carry no k-means branch (see the compile notes in docs/compile.md)."""
    print(f"training {name} for {args.steps} steps, {'eager' if args.eager else 'torch.compile(fullgraph=True)'}")
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    step_fn = model if args.eager else torch.compile(model, fullgraph=True)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss, logs = loss_fn(model if step == 1 else step_fn, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            print(f"  step {step:4d}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in logs.items())
                  + f"  ({elapsed:.0f} s)", flush=True)
    return model.eval()
