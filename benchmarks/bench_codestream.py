"""Code streams and the audio codec runtime: bits per second packed vs entropy-coded at every bandwidth, and
compress/decompress speed and peak memory on long audio, onnxruntime and PyTorch side by side.

    python benchmarks/bench_codestream.py [--steps 300] [--minutes 1 60] [--threads 2]

Trains the codec recipe's ConvCodec (export/codec.py) for --steps compiled steps, exports it as an audio bundle
with calibration frequencies, then:
1. bitrates: 64 s of held-out synthetic audio (other seeds than training and calibration) compressed at every
   bandwidth, packed and entropy-coded, with the saving, and the speed of the stream coding alone (indices to
   bytes and back, no networks), packed against entropy-coded;
2. long inputs: a WAV of each --minutes length (written block by block), compressed and decompressed by
   ``vqdeploy.audio`` (10 s chunks) with onnxruntime and with the PyTorch modules, each run in a fresh process:
   wall time as a multiple of real time, and the process's peak RSS (bounded memory: the same for 1 and 60 min);
   for the first length, the chunked indices against one whole-input call (identical tokens and near-ties, as
   export verification counts them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "export"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import peak_rss, reset_peak_rss  # noqa: E402


def _codec_module():
    import codec  # export/codec.py: the recipe's model and data

    return codec


class TorchEngine:
    """The PyTorch codec behind the same encode/decode calls as a vqdeploy.runtime.Session."""

    def __init__(self, model):
        self.model = model.eval()

    def encode(self, waveform):
        return self.model.quantizer.encode(self.model.encoder(waveform))

    def decode(self, indices):
        return self.model.decoder(self.model.quantizer.decode(indices))


def child(args) -> None:
    """One compress or decompress in this fresh process; prints its figures as JSON (peak RSS since the
    process started, in MiB, and its growth during the run itself)."""
    reset_peak_rss()  # the peak a child inherits from its parent across exec is the parent's
    import torch

    torch.set_num_threads(args.threads)
    from vqdeploy.audio import compress, decompress
    from vqdeploy.runtime import Session

    if args.engine == "torch":
        from safetensors.torch import load_model

        model = _codec_module().ConvCodec()
        load_model(model, args.weights)
        engine = TorchEngine(model)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        engine = Session(args.bundle, provider="cpu", session_options=options)
    before = reset_peak_rss()
    with torch.no_grad():
        if args.child == "compress":
            run = compress(args.bundle, args.input, args.output, session=engine, entropy_coding=True)
        else:
            run = decompress(args.bundle, args.input, args.output, session=engine)
    peak = peak_rss()
    print(json.dumps({"seconds": run.seconds, "elapsed": run.elapsed, "peak_mb": peak / 1024,
                      "growth_mb": (peak - before) / 1024, "bytes": run.stream_bytes}))


def write_long_wav(path: Path, minutes: float, rate: int) -> None:
    """Synthetic audio (the recipe's generator, new seeds), written 8 s at a time."""
    import soundfile
    import torch

    codec = _codec_module()
    total = int(minutes * 60 * rate)
    generator = torch.Generator().manual_seed(99)
    with soundfile.SoundFile(str(path), "w", rate, 1, subtype="PCM_16") as out:
        written = 0
        while written < total:
            block = codec.synthetic_audio(8, rate, generator).reshape(-1)[:total - written]
            out.write(block.clamp(-1, 1).numpy())
            written += len(block)


def run_child(mode: str, engine: str, bundle: Path, weights: Path, source: Path, target: Path, threads: int) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--engine", engine, "--bundle", str(bundle), "--weights",
               str(weights), "--input", str(source), "--output", str(target), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode:
        raise SystemExit(f"{mode} with {engine} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def coding_speed(bundle: Path, stream: Path, seconds: float) -> None:
    """Indices -> bytes -> indices with the stream coder alone, packed and entropy-coded (median of 5)."""
    import statistics

    from vqdeploy.codestream import StreamSpec

    spec = StreamSpec.from_bundle(bundle)
    indices = spec.loads(stream.read_bytes())
    print(f"\nstream coding alone, {seconds:.0f} s of indices ({indices.numel():,} codes), seconds of audio per "
          "second of CPU:")
    for entropy_coding in (False, True):
        data = spec.dumps(indices, entropy_coding=entropy_coding)
        times = {"write": [], "read": []}
        for _ in range(5):
            started = time.perf_counter()
            spec.dumps(indices, entropy_coding=entropy_coding)
            times["write"].append(time.perf_counter() - started)
            started = time.perf_counter()
            spec.loads(data)
            times["read"].append(time.perf_counter() - started)
        name = "entropy-coded" if entropy_coding else "packed"
        print(f"  {name:>13}: write {seconds / statistics.median(times['write']):8,.0f}x, read "
              f"{seconds / statistics.median(times['read']):8,.0f}x")


def chunked_against_whole(model, session, bundle: Path, wav: Path, work: Path) -> None:
    """The stream compress wrote in 10 s chunks against one whole-input encoder call on the same audio."""
    import soundfile
    import torch

    from vqdeploy.codestream import StreamSpec
    from vqdeploy.export.ties import compare_indices

    audio, _ = soundfile.read(str(wav), dtype="float32")
    whole_input = torch.nn.functional.pad(torch.from_numpy(audio)[None, None], (0, -len(audio) % 8))
    spec = StreamSpec.from_bundle(bundle)
    with torch.no_grad():
        features = model.encoder(whole_input)
        for engine, whole in (("onnxruntime", session.encode(whole_input)),
                              ("torch", model.quantizer.encode(features))):
            chunked = spec.loads((work / f"{wav.stem.removesuffix('min')}-{engine}.vqc").read_bytes())
            agreement = compare_indices(model.quantizer, features, whole, chunked, wrapped=True)
            print(f"  {wav.stem} chunked vs whole input, {engine}: tokens identical {agreement.identical:,} of "
                  f"{agreement.tokens:,}, near-ties {agreement.near_ties}, real disagreements {agreement.real}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--minutes", type=float, nargs="+", default=[1.0, 60.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["compress", "decompress"], help=argparse.SUPPRESS)
    for name in ("engine", "bundle", "weights", "input", "output"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    import soundfile
    import torch
    from safetensors.torch import save_model

    from vqdeploy.audio import compress
    from vqdeploy.export import export
    from vqdeploy.runtime import Session

    codec = _codec_module()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    model = codec.ConvCodec()
    train_args = argparse.Namespace(steps=args.steps, batch=16, eager=False)
    codec.train(model, codec.endless(lambda: codec.synthetic_audio(16, 2048, generator)), train_args,
                "ConvCodec", codec.codec_loss, log_every=max(args.steps, 1))
    work = Path(tempfile.mkdtemp(prefix="bench_codestream_"))
    bundle, weights = work / "bundle", work / "codec.safetensors"
    export(model.quantizer, bundle, encoder=model.encoder, decoder=model.decoder,
           example=codec.synthetic_audio(2, 2048, generator), calibration=codec.synthetic_audio(16, 16000, generator),
           audio={"sample_rate": codec.SAMPLE_RATE, "channels": 1}, verify=False)
    save_model(model, str(weights))
    print(f"torch {torch.__version__}, {args.threads} threads; bundle in {bundle}")

    held_out = codec.synthetic_audio(64, codec.SAMPLE_RATE, torch.Generator().manual_seed(2)).reshape(-1)
    source = work / "held_out.wav"
    soundfile.write(str(source), held_out.numpy(), codec.SAMPLE_RATE, subtype="FLOAT")
    session = Session(bundle, provider="cpu")
    print("\n1. bitrate of 64 s of held-out audio (frames of 1 s; header and checksums included)")
    print(f"{'layers':>6} {'packed kbit/s':>14} {'entropy kbit/s':>15} {'saving':>7}")
    for layers in range(1, model.quantizer.num_quantizers + 1):
        packed = compress(bundle, source, work / "p.vqc", layers=layers, session=session)
        coded = compress(bundle, source, work / "e.vqc", layers=layers, entropy_coding=True, session=session)
        print(f"{layers:>6} {packed.kbps:14.2f} {coded.kbps:15.2f} {1 - coded.stream_bytes / packed.stream_bytes:7.1%}")
    coding_speed(bundle, work / "p.vqc", len(held_out) / codec.SAMPLE_RATE)

    print("\n2. long inputs: compress (entropy-coded, all layers) and decompress in 10 s chunks, each run in a "
          "fresh process")
    print(f"{'audio':>8} {'engine':>11} {'step':>10} {'x real time':>12} {'peak RSS MB':>12} {'RSS growth MB':>14}")
    for minutes in args.minutes:
        wav = work / f"{minutes:g}min.wav"
        started = time.perf_counter()
        write_long_wav(wav, minutes, codec.SAMPLE_RATE)
        print(f"  (wrote {minutes:g} min of audio in {time.perf_counter() - started:.0f} s)", flush=True)
        for engine in ("onnxruntime", "torch"):
            stream, out = work / f"{minutes:g}-{engine}.vqc", work / f"{minutes:g}-{engine}.wav"
            for mode, src, dst in (("compress", wav, stream), ("decompress", stream, out)):
                figures = run_child(mode, engine, bundle, weights, src, dst, args.threads)
                print(f"{minutes:>6g} m {engine:>11} {mode:>10} {figures['seconds'] / figures['elapsed']:11.0f}x "
                      f"{figures['peak_mb']:12.0f} {figures['growth_mb']:14.0f}", flush=True)
            out.unlink()
        if minutes == args.minutes[0]:
            chunked_against_whole(model, session, bundle, wav, work)
        wav.unlink()


if __name__ == "__main__":
    main()
