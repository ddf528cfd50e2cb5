"""Recipe: a small convolutional image tokenizer with FSQ or LFQ, trained compiled, exported to ONNX and verified.

    python export/tokenizer.py [--quantizer fsq|lfq] [--steps 300] [--out tokenizer_bundle]

Trains image -> conv encoder -> FSQ (levels 8,5,5,5: 1000 codes) or LFQ (2^10 codes) -> conv decoder -> image on
built-in synthetic images (coloured rectangles and discs on gradients, 32 x 32) with torch.compile(fullgraph=True),
exports it with both networks inside the ONNX graphs (encoder.onnx: image -> token grid, decoder.onnx: tokens ->
image; any image size divisible by 4), checks onnxruntime against PyTorch, and prints a report: reconstruction
PSNR, codebook usage, tokens and bits per image, and torch vs onnxruntime timings.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipe_tools import endless, index_agreement, median_ms, recipe_parser, train, usage  # noqa: E402

import vqdeploy  # noqa: E402
from vqdeploy.export import export  # noqa: E402
from vqdeploy.runtime import Session  # noqa: E402


def synthetic_images(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 3, size, size) images in [-1, 1]: a colour gradient with two rectangles and a disc."""
    coords = torch.linspace(0, 1, size)
    y, x = coords[:, None], coords[None, :]
    images = []
    for _ in range(batch):
        r = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
        image = r(3, 1, 1) * x + r(3, 1, 1) * y
        for _ in range(2):
            x0, y0 = r(2) * 0.7
            w, h = 0.15 + r(2) * 0.3
            inside = (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)
            image = torch.where(inside, r(3, 1, 1), image)
        cx, cy, radius = r(3) * torch.tensor([1.0, 1.0, 0.3])
        image = torch.where((x - cx) ** 2 + (y - cy) ** 2 < radius ** 2, r(3, 1, 1), image)
        images.append(image)
    return torch.stack(images) * 2 - 1


class ConvTokenizer(nn.Module):
    """image (b, 3, h, w) -> latents (b, dim, h / 4, w / 4) -> FSQ or LFQ -> image."""

    def __init__(self, quantizer: str = "fsq", channels: int = 64, dim: int = 16):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(c, c, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(c, dim, 1))
        if quantizer == "fsq":
            self.quantizer = vqdeploy.FSQ(levels=[8, 5, 5, 5], dim=dim)
        else:
            self.quantizer = vqdeploy.LFQ(dim=dim, codebook_size=2**10, entropy_loss_weight=0.02,
                                          diversity_gamma=1.0)
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, c, 3, padding=1), nn.ELU(),
            nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.ELU(),
            nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1))

    def forward(self, images: torch.Tensor):
        out = self.quantizer(self.encoder(images))
        loss = out[2] if len(out) > 2 else torch.zeros((), device=images.device)  # FSQ has no loss
        return self.decoder(out[0]), out[1], loss


def tokenizer_loss(model, images):
    reconstruction, _, aux_loss = model(images)
    recon = (reconstruction - images).pow(2).mean()
    return recon + aux_loss, {"recon": recon.detach(), "aux": aux_loss.detach()}


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    mse = (reference - estimate).pow(2).mean().clamp(min=1e-12)
    return float(10 * torch.log10(4 / mse))  # images span [-1, 1]: peak-to-peak 2


def main(argv=None) -> None:
    parser = recipe_parser(__doc__, "tokenizer_bundle")
    parser.add_argument("--quantizer", choices=["fsq", "lfq"], default="fsq")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    tokenizer = ConvTokenizer(args.quantizer)
    q = tokenizer.quantizer
    train(tokenizer, endless(lambda: synthetic_images(args.batch, args.size, generator)), args,
          f"ConvTokenizer ({type(q).__name__}, {q.codebook_size} codes)", tokenizer_loss)

    print(f"exporting to {args.out}/ with the encoder and decoder networks inside the graphs")
    example = synthetic_images(2, args.size, generator)
    result = export(q, args.out, encoder=tokenizer.encoder, decoder=tokenizer.decoder, example=example,
                    overwrite=True)
    print(result.report.table())

    held_out = synthetic_images(16, 64, torch.Generator().manual_seed(1))  # larger than the training images
    session = Session(args.out, provider="cpu")
    with torch.no_grad():
        reconstruction, indices, _ = tokenizer.eval()(held_out)
        features = tokenizer.encoder(held_out)
        ort_indices = session.encode(held_out)
        ort_reconstruction = session.decode(ort_indices)
    used, perplexity = usage(indices, q.codebook_size)
    tokens = indices[0].numel()
    print("\nreport (16 held-out 64 x 64 images)")
    print(f"  reconstruction PSNR         torch {psnr(held_out, reconstruction):6.2f} dB, "
          f"onnxruntime {psnr(held_out, ort_reconstruction):6.2f} dB")
    print(f"  onnxruntime vs torch        {index_agreement(q, features, indices, ort_indices)}, "
          f"max |pixel difference| {float((ort_reconstruction - reconstruction).abs().max()):.2e}")
    print(f"  codebook usage              codes used {used:6.1%}, perplexity {perplexity:6.1f} of {q.codebook_size}")
    print(f"  tokens per image            {tokens} ({tokens * math.log2(q.codebook_size):.0f} bits)")
    with torch.no_grad():
        rows = [("encode", median_ms(lambda: q.encode(tokenizer.encoder(held_out))),
                 median_ms(lambda: session.encode(held_out))),
                ("decode", median_ms(lambda: tokenizer.decoder(q.decode(indices))),
                 median_ms(lambda: session.decode(indices)))]
    for name, torch_ms, ort_ms in rows:
        print(f"  {name} 16 images           torch eager {torch_ms:6.2f} ms, onnxruntime (CPU) {ort_ms:6.2f} ms")
    print(f"done in {time.perf_counter() - started:.0f} s; bundle in {args.out}/")


if __name__ == "__main__":
    main()
