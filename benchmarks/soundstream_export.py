"""A downstream case for export verification: audiolm-pytorch's SoundStream with a GroupedResidualFSQ.

SoundStream (audiolm-pytorch 2.0.7) with levels [8, 5, 5, 5], 4 quantizers and one group is trained a few steps
on synthetic audio with vector-quantize-pytorch's quantizer, as its users do; its trained quantizer then loads
into vqdeploy's GroupedResidualFSQ and is exported with the default call, ``example`` being one second of
audio (two clips) through SoundStream's encoder.  The script prints the export report, then verifies the
bundle over eight seeds and on held-out encoder features, and prints how many tokens each check found
identical, near-ties and real disagreements (the old all-identical rule failed on near-ties).

Needs audiolm-pytorch 2.0.7 and its audio stack beside vqdeploy, which this project does not install
(torchaudio pins its own torch build; see docs/benchmarks.md):

    python -m venv venv-alm && . venv-alm/bin/activate
    pip install "torch==2.9.1" "torchaudio==2.9.*" local-attention gateloop-transformer beartype \\
        "vector-quantize-pytorch==1.14.17" && pip install --no-deps audiolm-pytorch==2.0.7 && pip install -e .
    python benchmarks/soundstream_export.py [--steps 10] [--out /tmp/soundstream_rq]

Only SoundStream's module is imported (audiolm-pytorch's package imports its transformers, fairseq and
trainer stack, none of which SoundStream needs).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import tempfile
import types
import warnings
from pathlib import Path

import torch


def _soundstream_class():
    """audiolm_pytorch.soundstream.SoundStream without running the package's __init__."""
    spec = importlib.util.find_spec("audiolm_pytorch")
    if spec is None:
        raise SystemExit("audiolm-pytorch is not installed (see this script's docstring)")
    package = types.ModuleType("audiolm_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["audiolm_pytorch"] = package
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the reference's torch.cuda.amp notices
        from audiolm_pytorch.soundstream import SoundStream
    return SoundStream


def synthetic_audio(batch: int, seconds: float, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Harmonic tones with a decaying envelope and a little noise: (batch, samples)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * sample_rate)) / sample_rate
    base = 80 + 400 * torch.rand(batch, 1, generator=generator)
    wave = sum(torch.sin(2 * math.pi * k * base * t + torch.rand(batch, 1, generator=generator) * 6.28) / k
               for k in range(1, 5))
    envelope = torch.exp(-t * (1 + 3 * torch.rand(batch, 1, generator=generator)))
    return 0.3 * wave * envelope + 0.01 * torch.randn(batch, t.numel(), generator=generator)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="SoundStream training steps")
    parser.add_argument("--out", default=None, help="bundle directory (default: a temporary one)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="vector_quantize_pytorch")  # torch.cuda.amp

    import vqdeploy as V
    from vqdeploy.export import export, verify

    torch.manual_seed(0)
    SoundStream = _soundstream_class()
    soundstream = SoundStream(codebook_dim=32, channels=16, strides=(2, 4), channel_mults=(2, 4),
                              use_finite_scalar_quantizer=True, finite_scalar_quantizer_levels=[8, 5, 5, 5],
                              rq_num_quantizers=4, rq_groups=1, use_local_attn=False, target_sample_hz=16000)
    optimizer = torch.optim.Adam(soundstream.parameters(), lr=3e-4)
    for step in range(args.steps):
        loss = soundstream(synthetic_audio(4, 0.5, seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"[soundstream] step {step + 1}/{args.steps}: generator loss {loss.item():.3f}", flush=True)

    def features(seconds_of_audio: torch.Tensor) -> torch.Tensor:
        """The quantizer's input: SoundStream's encoder output (batch, frames, codebook_dim)."""
        with torch.no_grad():
            return soundstream.encoder(seconds_of_audio.unsqueeze(1)).transpose(1, 2)

    quantizer = V.GroupedResidualFSQ(dim=32, levels=[8, 5, 5, 5], num_quantizers=4, groups=1, quantize_dropout=True,
                                     quantize_dropout_cutoff_index=1)
    quantizer.load_state_dict(soundstream.rq.state_dict(), strict=True)
    example = features(synthetic_audio(2, 1.0, seed=1000))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp()) / "soundstream_rq"
    print(f"[soundstream] exporting soundstream.rq with example {tuple(example.shape)} to {out}", flush=True)
    result = export(quantizer, out, example=example, overwrite=True)
    print(result.report.table())

    rows = []
    for seed in range(8):
        rows.append((f"seed {seed}", verify(out, seed=seed)))
    held_out = [features(synthetic_audio(4, 3.0, seed=2000 + i)) for i in range(4)]
    rows.append(("held-out features", verify(out, inputs=held_out)))
    print(f"\n{'verify':18} {'tokens':>8} {'identical':>10} {'near-tie':>9} {'real':>5} {'worst margin':>13}")
    for label, report in rows:
        agreements = [c.agreement for c in report.checks if c.agreement is not None]
        counts = [sum(getattr(a, field) for a in agreements) for field in ("tokens", "identical", "near_ties", "real")]
        worst = max(a.worst for a in agreements)  # margin / tolerance of the worst differing token
        print(f"{label:18} {counts[0]:>8} {counts[1]:>10} {counts[2]:>9} {counts[3]:>5} {worst:>13.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
