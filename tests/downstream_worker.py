"""Train, tokenize and decode a small model of a package built on vector-quantize-pytorch, unedited.

    python tests/downstream_worker.py PACKAGE BACKEND OUT [--steps N] [--load STATE] [--export]

PACKAGE: ``soundstream`` (audiolm-pytorch 2.4.0's SoundStream with GroupedResidualVQ, rotation trick, k-means
init, dead codes, quantize dropout), ``meshgpt`` (meshgpt-pytorch 1.7.2's MeshAutoencoder with a shared-
codebook ResidualVQ, rotation trick, stochastic sampling, masks), ``meshgpt_lfq`` (its default ResidualLFQ:
softplus entropy loss, a soft clamp of 10 halved per layer, quantize dropout, masks), ``magvit2_bsq`` and
``magvit2_fsq`` (magvit2-pytorch 0.5.1's VideoTokenizer with spherical LFQ, or with FSQ).  BACKEND: ``vqdeploy`` (through
``vqdeploy.substitute``) or ``reference`` (whatever ``vector_quantize_pytorch`` the PYTHONPATH gives: the
caller puts 1.32.0 first).  The model (seeded) optionally loads STATE (safetensors, strictly), its held-out
tokens and decoding are written, it trains N steps on synthetic data, and the held-out figures are written again
with the trained state; ``--export`` exports and verifies its quantizer with the features it quantizes.

Only the model's module is imported, not the package's ``__init__`` (which pulls in trainers and text
encoders).  meshgpt's text conditioning (classifier-free-guidance-pytorch: transformers, open-clip) is only used
by its MeshTransformer, and magvit2's torchvision only for its VGG perceptual loss (off here: its weights are a
download), so stand-ins that refuse to build those replace the two packages.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import types
import warnings
from pathlib import Path

HELD_OUT_SEED = 1000


def _import_module_only(package: str, module: str):
    """``package.module`` without running ``package/__init__.py``."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise SystemExit(f"{package} is not installed (tests/install-downstream.sh installs it)")
    stub = types.ModuleType(package)
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules[package] = stub
    return importlib.import_module(f"{package}.{module}")


def _without_text_conditioning() -> None:
    conditioning = types.ModuleType("classifier_free_guidance_pytorch")

    class TextEmbeddingReturner:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("text conditioning (classifier-free-guidance-pytorch) is not installed here")

    conditioning.classifier_free_guidance = lambda function: function
    conditioning.TextEmbeddingReturner = TextEmbeddingReturner
    sys.modules["classifier_free_guidance_pytorch"] = conditioning


class VGG16_Weights:  # noqa: N801 (torchvision's name; at module level, as magvit2 pickles its arguments)
    DEFAULT = None


VGG16_Weights.DEFAULT = VGG16_Weights()


def _without_torchvision() -> None:
    """magvit2-pytorch imports torchvision for its VGG16 perceptual loss only; the cases turn that loss off."""
    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")

    def vgg16(*args, **kwargs):
        raise RuntimeError("torchvision is not installed here: set perceptual_loss_weight=0")

    models.VGG16_Weights, models.vgg16, torchvision.models = VGG16_Weights, vgg16, models
    sys.modules.update({"torchvision": torchvision, "torchvision.models": models})


def synthetic_video(batch: int, seed: int):
    """Moving coloured squares: (batch, 3, 5 frames, 16, 16) in [-1, 1]."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    frames, size = 5, 16
    grid = torch.arange(size, dtype=torch.float32)
    start = torch.randint(0, size // 2, (batch, 2), generator=generator)
    speed = torch.randint(-1, 2, (batch, 2), generator=generator)
    colour = torch.rand(batch, 3, generator=generator) * 2 - 1
    video = torch.full((batch, 3, frames, size, size), -1.0)
    for t in range(frames):
        top, left = (start + speed * t).clamp(0, size - 6).unbind(-1)
        rows = (grid >= top[:, None]) & (grid < top[:, None] + 6)
        cols = (grid >= left[:, None]) & (grid < left[:, None] + 6)
        inside = rows[:, :, None] & cols[:, None, :]
        video[:, :, t] = torch.where(inside[:, None], colour[:, :, None, None], video[:, :, t])
    return video + 0.02 * torch.randn(video.shape, generator=generator)


def synthetic_audio(batch: int, seconds: float, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * 16000)) / 16000
    base = 80 + 400 * torch.rand(batch, 1, generator=generator)
    wave = sum(torch.sin(2 * math.pi * k * base * t + 6.28 * torch.rand(batch, 1, generator=generator)) / k
               for k in range(1, 4))
    return 0.3 * wave + 0.01 * torch.randn(batch, t.numel(), generator=generator)


# a cube's 8 corners (index = 4x + 2y + z) and its 12 triangles, two per side
_CUBE_FACES = [(a, b, c) for a, b, c, d in ((0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4),
                                            (1, 5, 7, 3)) for a, b, c in ((a, b, c), (a, c, d))]


def synthetic_meshes(batch: int, seed: int):
    """Meshes of two boxes each (random centres and sizes, 16 vertices, 24 faces); the second box of the last
    mesh is padding (faces -1), as meshgpt pads meshes of fewer faces."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    corners = torch.tensor([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], dtype=torch.float32) * 2 - 1
    centres = torch.rand(batch, 2, 1, 3, generator=generator) - 0.5
    halves = 0.1 + 0.3 * torch.rand(batch, 2, 1, 3, generator=generator)
    vertices = (centres + halves * corners).reshape(batch, 16, 3)
    cube = torch.tensor(_CUBE_FACES)
    faces = torch.cat([cube, cube + 8]).expand(batch, -1, -1).clone()
    faces[-1, 12:] = -1
    return vertices, faces


class SoundStreamCase:
    """audiolm-pytorch's SoundStream: GroupedResidualVQ (2 groups x 4 layers of 64 codes) as SoundStream builds
    it (rotation trick, k-means init, EMA decay 0.95, dead codes at 2, quantize dropout)."""

    def __init__(self):
        self.module = _import_module_only("audiolm_pytorch", "soundstream")
        self.model = self.module.SoundStream(codebook_size=64, codebook_dim=32, channels=16, strides=(2, 4),
                                             channel_mults=(2, 4), rq_num_quantizers=4, rq_groups=2,
                                             use_local_attn=False, target_sample_hz=16000)
        self.quantizer = self.model.rq

    def parameters(self):
        return self.model.non_discr_parameters()

    def loss(self, step: int):
        return self.model(synthetic_audio(2, 0.25, step))

    def held_out(self) -> dict:
        import torch

        audio = synthetic_audio(2, 0.25, HELD_OUT_SEED)
        self.model.eval()
        with torch.no_grad():
            tokens = self.model.tokenize(audio)
            decoded = self.model.decode_from_codebook_indices(tokens)
            error = (self.model(audio, return_recons_only=True).squeeze(1) - audio).pow(2).mean()
        self.model.train()
        return {"tokens": tokens, "decoded": decoded}, {"held-out reconstruction MSE": error.item()}


class MeshGPTCase:
    """meshgpt-pytorch's MeshAutoencoder with its ResidualVQ path: shared codebook of 64 codes, 2 layers,
    rotation trick, stochastic sampling, k-means init, dead codes at 2, quantize dropout, masked pad vertex."""

    use_residual_lfq = False

    def __init__(self):
        _without_text_conditioning()
        self.module = _import_module_only("meshgpt_pytorch", "meshgpt_pytorch")
        self.model = self.module.MeshAutoencoder(
            num_discrete_coors=32, dim_coor_embed=16, dim_area_embed=8, dim_normal_embed=16, dim_angle_embed=8,
            encoder_dims_through_depth=(32, 64), decoder_dims_through_depth=(32, 32), dim_codebook=32,
            num_quantizers=2, codebook_size=64, use_residual_lfq=self.use_residual_lfq, attn_encoder_depth=1,
            attn_decoder_depth=1, local_attn_kwargs=dict(dim_head=16, heads=2), use_linear_attn=False)
        self.quantizer = self.model.quantizer

    def parameters(self):
        return self.model.parameters()

    def loss(self, step: int):
        vertices, faces = synthetic_meshes(2, step)
        return self.model(vertices=vertices, faces=faces)

    def held_out(self) -> dict:
        import torch

        vertices, faces = synthetic_meshes(2, HELD_OUT_SEED)
        self.model.eval()
        with torch.no_grad():
            tokens = self.model.tokenize(vertices=vertices, faces=faces)
            decoded, decoded_mask = self.model.decode_from_codes_to_faces(tokens)
            _, (recon_loss, _) = self.model(vertices=vertices, faces=faces, return_loss_breakdown=True)
        self.model.train()
        target = vertices.gather(1, faces.clamp(min=0).flatten(1)[..., None].expand(-1, -1, 3)).view(*faces.shape, 3)
        target = self.module.discretize(target, num_discrete=32, continuous_range=(-1.0, 1.0))
        valid = (faces != -1).all(-1)
        error = (decoded - target).abs().float()[valid].mean()
        return ({"tokens": tokens, "decoded": decoded.to(torch.int64), "decoded_mask": decoded_mask},
                {"held-out reconstruction loss": recon_loss.item(),
                 "held-out coordinate error (of 32 bins)": error.item()})


class MeshGPTLFQCase(MeshGPTCase):
    """meshgpt-pytorch's default quantizer: ResidualLFQ of 2 layers of 2^6 codes with its rlfq_kwargs (the
    softplus entropy loss, soft_clamp_input_value=10), commitment weight 1 and quantize dropout."""

    use_residual_lfq = True  # meshgpt's default


class Magvit2Case:
    """magvit2-pytorch's VideoTokenizer (causal 3-d convolutions, a spatial compression): 2^8 codes of spherical
    LFQ (BSQ, its entropy loss with diversity 2.5, commitment 1, soft clamp 10), or FSQ levels (8, 5, 5, 5); no
    VGG or GAN losses."""

    quantizer_options: dict = {}

    def __init__(self):
        _without_torchvision()
        self.module = _import_module_only("magvit2_pytorch", "magvit2_pytorch")
        self.model = self.module.VideoTokenizer(
            image_size=16, init_dim=16, layers=("residual", "compress_space", "residual"), channels=3,
            perceptual_loss_weight=0.0, use_gan=False, flash_attn=False, **self.quantizer_options)
        self.quantizer = self.model.quantizers

    def parameters(self):
        return self.model.parameters()

    def loss(self, step: int):
        loss, _ = self.model(synthetic_video(2, step), return_loss=True)
        return loss

    def held_out(self) -> dict:
        import torch

        video = synthetic_video(2, HELD_OUT_SEED)
        self.model.eval()
        with torch.no_grad():
            tokens = self.model.tokenize(video)
            decoded = self.model.decode_from_code_indices(tokens)
        self.model.train()
        return {"tokens": tokens, "decoded": decoded}, {"held-out reconstruction MSE": (decoded - video).pow(2).mean().item()}


class Magvit2BSQCase(Magvit2Case):
    quantizer_options = dict(codebook_size=2**8, lfq_spherical=True)


class Magvit2FSQCase(Magvit2Case):
    quantizer_options = dict(use_fsq=True, fsq_levels=[8, 5, 5, 5])


CASES = {"soundstream": SoundStreamCase, "meshgpt": MeshGPTCase, "meshgpt_lfq": MeshGPTLFQCase,
         "magvit2_bsq": Magvit2BSQCase, "magvit2_fsq": Magvit2FSQCase}


def _quantizer_input(case):
    """The features the quantizer sees on the held-out data (a forward pre-hook)."""
    captured = []
    handle = case.quantizer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    case.held_out()
    handle.remove()
    return captured[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", choices=sorted(CASES))
    parser.add_argument("backend", choices=("vqdeploy", "reference"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--load", type=Path, default=None, help="a state_dict (safetensors) to start from")
    parser.add_argument("--export", action="store_true", help="export and verify the trained quantizer")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the packages' torch.cuda.amp notices
    if args.backend == "vqdeploy":
        from vqdeploy.substitute import substitute

        substitute()
    import torch
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    case = CASES[args.package]()
    result = {"quantizer": f"{type(case.quantizer).__module__}.{type(case.quantizer).__name__}"}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.load is not None:
        case.model.load_state_dict(load_file(args.load), strict=True)
        tensors, result["loaded"] = case.held_out()
        save_file({k: v.contiguous() for k, v in tensors.items()}, args.out / "loaded.safetensors")
    optimizer = torch.optim.Adam(case.parameters(), lr=1e-3)
    result["losses"] = []
    started = time.perf_counter()
    for step in range(args.steps):
        loss = case.loss(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result["losses"].append(loss.item())
        print(f"[{args.package}/{args.backend}] step {step + 1}/{args.steps}: loss {loss.item():.4f}", flush=True)
    result["seconds per step"] = (time.perf_counter() - started) / max(args.steps, 1)
    tensors, result["trained"] = case.held_out()
    save_file({k: v.contiguous() for k, v in tensors.items()}, args.out / "trained.safetensors")
    save_file({k: v.detach().clone().contiguous() for k, v in case.model.state_dict().items()},
              args.out / "state.safetensors")
    if args.export:
        from vqdeploy.export import export

        features = _quantizer_input(case)
        exported = export(case.quantizer, args.out / "bundle", example=features, overwrite=True)
        report = exported.report
        print(report.table(), flush=True)
        result["export"] = {"tokens": sum(c.agreement.tokens for c in report.checks if c.agreement is not None),
                            "real": sum(c.agreement.real or 0 for c in report.checks if c.agreement is not None),
                            "near ties": report.near_ties, "min indices equal": report.min_indices_equal,
                            "max abs error": report.max_abs_error, "passed": report.passed}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({key: value for key, value in result.items() if key != "losses"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
