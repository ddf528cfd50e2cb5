"""Recipe: a small convolutional audio codec with ResidualVQ, trained compiled, exported to ONNX and verified,
then used as a codec: held-out audio compressed to code streams and back at every bandwidth.

    python export/codec.py [--steps 300] [--out codec_bundle]

Trains waveform -> conv encoder -> ResidualVQ (with quantizer dropout, so that every prefix of the layers is a
usable bandwidth) -> conv decoder -> waveform on built-in synthetic audio (harmonic tones with envelopes and noise,
16 kHz) with torch.compile(fullgraph=True), exports it as an audio bundle with both networks inside the ONNX graphs
(encoder.onnx: waveform -> indices, decoder.onnx: indices -> waveform) and code frequencies measured on calibration
audio, checks onnxruntime against PyTorch, and prints a report: reconstruction SNR, codebook usage, bitrate, torch
vs onnxruntime timings, and a table of the code streams at every bandwidth (packed and entropy-coded).
Copy this folder and replace the data and the networks with your own.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from recipe_tools import endless, index_agreement, median_ms, recipe_parser, train, usage  # noqa: E402

import vqdeploy  # noqa: E402
from vqdeploy.audio import compress, decompress  # noqa: E402
from vqdeploy.export import export  # noqa: E402
from vqdeploy.runtime import Session  # noqa: E402

SAMPLE_RATE = 16000
HOP = 8  # encoder stride: one token every 8 samples


def synthetic_audio(batch: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, 1, samples) clips: two harmonic tones (80-800 Hz, decaying harmonics) under attack/decay
    envelopes, plus a little noise."""
    t = torch.arange(samples) / SAMPLE_RATE
    clip = torch.zeros(batch, samples)
    for _ in range(2):
        f0 = 80 * 10 ** torch.rand(batch, 1, generator=generator)
        amplitude = 0.2 + 0.3 * torch.rand(batch, 1, generator=generator)
        onset = torch.rand(batch, 1, generator=generator) * t[-1] / 2
        envelope = ((t - onset) * 40).clamp(0, 1) * torch.exp(-(t - onset).clamp(min=0) * 6)
        tone = sum(torch.sin(2 * math.pi * k * f0 * t) / k ** 1.5 for k in range(1, 5))
        clip += amplitude * envelope * tone
    return (clip + 0.01 * torch.randn(batch, samples, generator=generator)).unsqueeze(1)


class ConvCodec(nn.Module):
    """waveform (b, 1, t) -> latents (b, dim, t / 8) -> ResidualVQ -> waveform."""

    def __init__(self, channels: int = 32, dim: int = 64, codebook_size: int = 256, num_quantizers: int = 4):
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(
            nn.Conv1d(1, c, 7, padding=3), nn.ELU(),
            nn.Conv1d(c, 2 * c, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv1d(2 * c, 2 * c, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv1d(2 * c, dim, 4, stride=2, padding=1))
        self.quantizer = vqdeploy.ResidualVQ(dim=dim, codebook_size=codebook_size, num_quantizers=num_quantizers,
                                             channel_last=False, kmeans_init=True, kmeans_iters=5, decay=0.9,
                                             threshold_ema_dead_code=2, commitment_weight=0.25,
                                             quantize_dropout=True)
        self.decoder = nn.Sequential(
            nn.ConvTranspose1d(dim, 2 * c, 4, stride=2, padding=1), nn.ELU(),
            nn.ConvTranspose1d(2 * c, 2 * c, 4, stride=2, padding=1), nn.ELU(),
            nn.ConvTranspose1d(2 * c, c, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv1d(c, 1, 7, padding=3))

    def forward(self, waveform: torch.Tensor):
        quantized, indices, losses = self.quantizer(self.encoder(waveform))
        return self.decoder(quantized), indices, losses.sum()


def codec_loss(model, waveform):
    reconstruction, _, vq_loss = model(waveform)
    recon = (reconstruction - waveform).abs().mean() + (reconstruction - waveform).pow(2).mean()
    return recon + vq_loss, {"recon": recon.detach(), "vq": vq_loss.detach()}


def snr_db(reference: torch.Tensor, estimate: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - estimate).pow(2).sum().clamp(min=1e-12)))


def main(argv=None) -> None:
    parser = recipe_parser(__doc__, "codec_bundle")
    parser.add_argument("--samples", type=int, default=2048, help="training clip length")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    codec = ConvCodec()
    q = codec.quantizer
    train(codec, endless(lambda: synthetic_audio(args.batch, args.samples, generator)), args,
          f"ConvCodec (ResidualVQ {q.num_quantizers} x {q.codebook_size} codes)", codec_loss)

    print(f"exporting to {args.out}/ with the encoder and decoder networks inside the graphs")
    example = synthetic_audio(2, args.samples, generator)
    calibration = synthetic_audio(16, SAMPLE_RATE, generator)  # code frequencies for entropy-coded streams
    result = export(codec.quantizer, args.out, encoder=codec.encoder, decoder=codec.decoder, example=example,
                    calibration=calibration, audio={"sample_rate": SAMPLE_RATE, "channels": 1}, overwrite=True)
    print(result.report.table())

    held_out = synthetic_audio(8, SAMPLE_RATE, torch.Generator().manual_seed(1))  # 1 s clips
    session = Session(args.out, provider="cpu")
    with torch.no_grad():
        reconstruction, indices, _ = codec(held_out)
        features = codec.encoder(held_out)
        ort_indices = session.encode(held_out)
        ort_reconstruction = session.decode(ort_indices)
    bits_per_second = SAMPLE_RATE / HOP * q.num_quantizers * math.log2(q.codebook_size)
    print("\nreport (8 held-out clips of 1 s)")
    print(f"  reconstruction SNR          torch {snr_db(held_out, reconstruction):6.2f} dB, "
          f"onnxruntime {snr_db(held_out, ort_reconstruction):6.2f} dB")
    print(f"  onnxruntime vs torch        {index_agreement(q, features, indices, ort_indices)}, "
          f"max |waveform difference| {float((ort_reconstruction - reconstruction).abs().max()):.2e}")
    for layer in range(q.num_quantizers):
        used, perplexity = usage(indices[..., layer], q.codebook_size)
        print(f"  quantizer {layer}: codes used {used:6.1%}, perplexity {perplexity:6.1f} of {q.codebook_size}")
    print(f"  bitrate                     {bits_per_second / 1000:.1f} kbit/s "
          f"({SAMPLE_RATE // HOP} tokens/s x {q.num_quantizers} x {int(math.log2(q.codebook_size))} bits)")
    one = held_out[:1]
    with torch.no_grad():
        codes = codec.quantizer.encode(codec.encoder(one))
        rows = [("encode", median_ms(lambda: codec.quantizer.encode(codec.encoder(one))),
                 median_ms(lambda: session.encode(one))),
                ("decode", median_ms(lambda: codec.decoder(codec.quantizer.decode(codes))),
                 median_ms(lambda: session.decode(codes)))]
    for name, torch_ms, ort_ms in rows:
        print(f"  {name} 1 s of audio         torch eager {torch_ms:6.2f} ms, onnxruntime (CPU) {ort_ms:6.2f} ms")
    stream_table(args.out, held_out, session, codec)
    print(f"done in {time.perf_counter() - started:.0f} s; bundle in {args.out}/")


def stream_table(bundle: str, held_out: torch.Tensor, session: Session, codec: ConvCodec) -> None:
    """The held-out clips as one audio file, compressed in 1 s chunks and decompressed at every bandwidth (the
    first k layers), packed and entropy-coded: bitrate, SNR, stream size and speed on this machine's CPU; then
    the chunked indices against one whole-input call."""
    import soundfile

    from vqdeploy.codestream import StreamSpec

    layers = session.manifest["num_quantizers"] or len(session.manifest["codebook_sizes"])
    audio = held_out.reshape(-1).numpy()
    seconds = len(audio) / SAMPLE_RATE
    print(f"\ncode streams of the held-out audio ({seconds:.0f} s as one file, through vqdeploy.audio)")
    print(f"  {'layers':>6} {'packed kbit/s':>13} {'entropy kbit/s':>14} {'saving':>7} {'SNR dB':>7} "
          f"{'stream bytes':>14} {'compress':>9} {'decompress':>10}")
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "held_out.wav"
        soundfile.write(str(source), audio, SAMPLE_RATE, subtype="FLOAT")
        for k in range(1, layers + 1):
            packed = compress(bundle, source, Path(work) / "p.vqc", layers=k, session=session, chunk_seconds=1)
            coded = compress(bundle, source, Path(work) / "e.vqc", layers=k, entropy_coding=True, session=session,
                             chunk_seconds=1)
            decoded = decompress(bundle, Path(work) / "e.vqc", Path(work) / "out.wav", session=session,
                                 subtype="FLOAT", chunk_seconds=1)
            output, _ = soundfile.read(str(Path(work) / "out.wav"), dtype="float32")
            snr = snr_db(torch.from_numpy(audio), torch.from_numpy(output))
            print(f"  {k:>6} {packed.kbps:13.2f} {coded.kbps:14.2f} {1 - coded.stream_bytes / packed.stream_bytes:7.1%} "
                  f"{snr:7.2f} {coded.stream_bytes:>14,} {coded.real_time_factor:8.0f}x {decoded.real_time_factor:9.0f}x")
        chunked = StreamSpec.from_bundle(bundle).loads((Path(work) / "p.vqc").read_bytes())
    whole_input = held_out.reshape(1, 1, -1)
    with torch.no_grad():
        whole = session.encode(whole_input)
        features = codec.encoder(whole_input)
    print("  (speed: seconds of audio per second on this machine's CPU, onnxruntime, chunks of 1 s)")
    print(f"  chunked vs whole input      {index_agreement(codec.quantizer, features, whole, chunked)}")


if __name__ == "__main__":
    main()
