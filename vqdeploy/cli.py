"""The ``vqdeploy`` command: export | verify | info | bench | compress | decompress.

    vqdeploy export --class ResidualVQ --config '{"dim": 256, "codebook_size": 1024, "num_quantizers": 8}' \\
        --weights rvq.safetensors --out bundle/      # a state_dict from vqdeploy or vector-quantize-pytorch 1.14.17
    vqdeploy verify bundle/ [--provider cuda]
    vqdeploy info bundle/
    vqdeploy bench bundle/ [--batch 16 --tokens 1024]
    vqdeploy compress codec_bundle/ in.wav out.vqc [--bandwidth 2 | --bandwidth 12kbps] [--entropy-coding]
    vqdeploy decompress codec_bundle/ in.vqc out.wav [--bandwidth 1]

Weights are read from safetensors only (nothing is unpickled); a reference checkpoint saved with torch.save
converts with ``safetensors.torch.save_file(state_dict, "rvq.safetensors")`` where it was trained.

An error is one line, ``vqdeploy <command>: error: <message>``, with exit status 2 (130 when interrupted); set
VQDEPLOY_DEBUG=1 for the traceback of an unexpected one.  Only the commands that need them import torch and
onnxruntime: ``--help`` and ``info`` are quick.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

DEFAULT_CHUNK_SECONDS = 10.0  # vqdeploy.audio.files.DEFAULT_CHUNK_SECONDS, not imported: it would import torch


class CommandError(Exception):
    """A mistake the user can fix, said in the command line's terms (an option's name, a path)."""


def _progress(message: str) -> None:
    print(f"[vqdeploy] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ export


def _export(args) -> int:
    from .bundle_format import QUANTIZER_CLASS_NAMES

    if args.cls not in QUANTIZER_CLASS_NAMES:
        raise CommandError(f"unknown class {args.cls!r}; known: {', '.join(QUANTIZER_CLASS_NAMES)}")
    config = _parse_config(args.config)
    shape = _parse_shape(args.example_shape)
    if args.weights is not None and not os.path.isfile(args.weights):
        raise CommandError(f"--weights {args.weights}: no such file")
    from .export.exporter import check_target

    with _option_terms(FileExistsError, "overwrite=True", "--overwrite", "--out "):
        check_target(Path(args.out), args.overwrite)  # before any work: an --out that is taken fails at once
    quantizer = _build(args.cls, config)
    if args.weights:
        _load_weights(quantizer, args.weights, args.cls)
    example = None
    if shape is not None:
        import torch

        example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    _progress(f"exporting to {args.out} (encoder, decoder, onnxruntime check)")
    from .export import export

    with _option_terms(FileExistsError, "overwrite=True", "--overwrite", "--out "):
        result = export(quantizer, args.out, example=example, index_dtype=args.index_dtype,
                        num_quantizers=args.num_quantizers, opset=args.opset, overwrite=args.overwrite)
    print(result.report.table())
    print(f"bundle written to {result.path}")
    return 0


@contextlib.contextmanager
def _option_terms(kind: type, keyword: str, option: str, prefix: str = ""):
    """Errors of ``kind`` from the Python API name its keyword (``overwrite=True``); the command line's user knows
    the option (``--overwrite``)."""
    try:
        yield
    except kind as error:
        raise CommandError(prefix + _message(error).replace(keyword, option)) from None


def _parse_config(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"--config is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CommandError(f"--config must be a JSON object of constructor arguments, e.g. '{{\"dim\": 256}}', "
                           f"got {text!r}")
    return config


def _parse_shape(text: str | None) -> list[int] | None:
    """--example-shape "2,1024,256" -> [2, 1024, 256]."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch("[0-9]+", part) and int(part) >= 1 for part in parts):
        raise CommandError(f"--example-shape {text}: expected positive sizes separated by commas, e.g. 2,1024,256")
    return [int(part) for part in parts]


def _build(name: str, config: dict):
    from .bundle_format import quantizer_classes

    try:
        return quantizer_classes()[name](**config)
    except (TypeError, ValueError, AssertionError) as error:
        raise CommandError(f"--config does not build a {name}: {error}") from None


def _load_weights(quantizer, path: str, name: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .bundle_format import BundleError

    _progress(f"loading {path}")
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as error:
        raise CommandError(f"--weights {path}: not a readable safetensors file ({error})") from None
    try:
        quantizer.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise BundleError(f"{path} does not fit {name}: {error}") from None


# ------------------------------------------------------------------------------------------------ verify, info


def _verify(args) -> int:
    from .export import read_manifest

    read_manifest(args.bundle, check_files=False)  # a path that is no bundle fails before the progress line
    from .export import verify

    _progress(f"verifying {args.bundle} with onnxruntime ({args.provider})")
    print(verify(args.bundle, provider=args.provider, seed=args.seed).table())
    return 0


def _info(args) -> int:
    from .bundle_format import FREQUENCIES_FILE, REFERENCE_FILE, manifest_sha256, read_manifest

    manifest = read_manifest(args.bundle)
    rows = [("class", manifest["class"]), ("config", json.dumps(manifest["config"])),
            ("user networks", f"encoder {manifest['encoder_network']}, decoder {manifest['decoder_network']}"),
            ("index dtype", manifest["index_dtype"]), ("layers encoded", layers_encoded(manifest)),
            ("codebook size", manifest["codebook_size"]), ("opset", manifest["opset"])]
    if "audio" in manifest:
        audio = manifest["audio"]
        rows.append(("audio", f"{audio['sample_rate']} Hz, {audio['channels']} channel(s), {audio['hop']} samples a "
                              f"token, context (tokens) encoder {audio['encoder_context']}, decoder "
                              f"{audio.get('decoder_context')}"))
    for graph in ("encoder", "decoder"):
        if graph in manifest:
            spec = manifest[graph]
            rows.append((graph, f"{spec['input']['name']} {spec['input']['dtype']}{spec['input']['shape']} -> "
                                f"{spec['output']['name']} {spec['output']['dtype']}{spec['output']['shape']}"))
    rows += [(f"sha256 {name}", digest[:16] + "...") for name, digest in manifest["files"].items()]
    rows.append(("code streams", "entropy-coded or packed (code frequencies stored)" if FREQUENCIES_FILE in
                 manifest["files"] else "packed (no code frequencies: export with calibration= to entropy-code)"))
    if manifest["wrapped"]:
        rows.append(("verification", "against reference outputs recorded at export (no networks needed)"
                     if REFERENCE_FILE in manifest["files"] else
                     "needs the networks: verify(bundle, encoder=..., decoder=...) in Python (no reference outputs)"))
    rows.append(("stream id (sha256 manifest.json)", manifest_sha256(args.bundle)[:16] + "..."))
    rows += [(f"{package} version", version) for package, version in manifest["versions"].items()]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def layers_encoded(manifest: dict) -> str:
    """How many residual layers the graphs encode: the bandwidth set at export, or all the quantizer has
    (per group x groups for grouped classes)."""
    sizes = manifest.get("codebook_sizes")
    if not isinstance(sizes, list) or not sizes:
        return "1 (not a residual quantizer)"
    full, chosen = len(sizes), manifest.get("num_quantizers")
    groups = manifest["config"].get("groups", 1) if manifest["class"].startswith("Grouped") else 1
    groups = groups if isinstance(groups, int) and groups >= 1 else 1
    if not isinstance(chosen, int) or chosen >= full:
        return f"{full} (all)" if groups == 1 else f"{groups * full} (all: {groups} groups x {full})"
    if groups == 1:
        return f"{chosen} of {full} (bandwidth set at export)"
    return f"{groups * chosen} of {groups * full} ({groups} groups x {chosen} of {full}: bandwidth set at export)"


# ------------------------------------------------------------------------------------------------ bench


def _bench(args) -> int:
    import torch

    from .runtime import Session
    from .timing import median_ms

    session = Session(args.bundle, provider=args.provider)
    manifest = session.manifest
    device = "cuda" if session.on_cuda else "cpu"
    shape = bench_shape(manifest, args.batch, args.tokens)
    x = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    quantizer, kwargs = None, {}
    if not manifest["wrapped"]:  # PyTorch eager needs the quantizer alone; user networks live only in ONNX
        from .export import load

        quantizer = load(args.bundle).to(device)
        kwargs = {} if manifest["num_quantizers"] is None else {"num_quantizers": manifest["num_quantizers"]}

    def timed(call):
        return None if call is None else median_ms(call, args.iters, sync=sync)

    eager = quantizer is not None
    rows = []
    with torch.no_grad():
        indices = session.encode(x)
        _progress(f"timing encode on {tuple(shape)} ({device}, median of {args.iters})")
        rows.append(("encode", timed((lambda: quantizer.encode(x, **kwargs)) if eager else None),
                     timed(lambda: session.encode(x))))
        if "decoder" in manifest:
            _progress("timing decode")
            rows.append(("decode", timed((lambda: quantizer.decode(indices.long(), **kwargs)) if eager else None),
                         timed(lambda: session.decode(indices))))
    print(f"{'graph':8} {'torch eager ms':>15} {'onnxruntime ms':>15} {'speed-up':>9}")
    for graph, torch_ms, ort_ms in rows:
        eager_ms, speed_up = ("-", "-") if torch_ms is None else (f"{torch_ms:.3f}", f"{torch_ms / ort_ms:.2f}x")
        print(f"{graph:8} {eager_ms:>15} {ort_ms:15.3f} {speed_up:>9}")
    if not eager:
        print("torch eager: not timed (the graphs hold user networks, which the bundle holds only as ONNX)")
    return 0


def bench_shape(manifest: dict, batch: int, tokens: int) -> list[int]:
    """The export example's shape with ``batch`` and ``tokens`` on its first token axis (samples: tokens x hop
    for an audio bundle)."""
    shape = list(manifest["encoder"]["example_shape"])
    token_axes = [axis for axis in manifest["encoder"]["dynamic_axes"] if axis != 0]
    shape[0] = batch
    if token_axes:  # the first token axis (sequence, or image height) gets --tokens; others keep the example's
        shape[token_axes[0]] = tokens * manifest.get("audio", {}).get("hop", 1)
    return shape


# ------------------------------------------------------------------------------------------------ audio


def parse_bandwidth(value: str | None, spec) -> int | None:
    """--bandwidth: a layer count ("2"), or a bitrate ("12kbps": the most layers whose packed rate fits)."""
    if value is None:
        return None
    layers = spec.layout.layers
    text = value.strip().lower()
    if text.endswith("kbps"):
        return _layers_for_bitrate(value, text[:-4], spec)
    if re.fullmatch("[+-]?[0-9]+", text):
        if not 1 <= int(text) <= layers:
            raise ValueError(f"--bandwidth {value}: this bundle has {layers} layer(s); give {_choices(spec)}")
        return int(text)
    raise ValueError(f"--bandwidth {value}: must be a layer count (e.g. 2) or a bitrate (e.g. 12kbps); this bundle "
                     f"takes {_choices(spec)}")


def _layers_for_bitrate(value: str, number: str, spec) -> int:
    try:
        limit = float(number)
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"--bandwidth {value}: a bitrate must be a positive number of kbit/s, e.g. "
                         f"{_full_rate(spec) or '12kbps'}")
    if not spec.frame_rate:
        raise ValueError(f"--bandwidth {value}: this bundle records no frame rate, so a bitrate says nothing; give "
                         f"a layer count in 1..{spec.layout.layers}")
    fitting = [k for k in range(1, spec.layout.layers + 1)
               if spec.frame_rate * spec.bits_per_frame_token(k) / 1000 <= limit + 1e-9]
    if not fitting:
        lowest = spec.frame_rate * spec.bits_per_frame_token(1) / 1000
        raise ValueError(f"--bandwidth {value}: one layer already takes {lowest:g} kbit/s")
    return fitting[-1]


def _full_rate(spec) -> str | None:
    """The packed bitrate of every layer, as an example of the bitrate form ("36kbps"), if the bundle has one."""
    if not spec.frame_rate:
        return None
    return f"{spec.frame_rate * spec.bits_per_frame_token(spec.layout.layers) / 1000:g}kbps"


def _choices(spec) -> str:
    """What --bandwidth takes for this bundle, in words."""
    rate = _full_rate(spec)
    return f"a layer count in 1..{spec.layout.layers}" + (
        f" or a bitrate such as {rate} (all layers, packed)" if rate else " (no bitrate: it records no frame rate)")


def _codec_run(args, run) -> int:
    """compress/decompress: a bad bundle, file, stream or --bandwidth is one line (main prints it)."""
    import soundfile

    from .runtime import OpenedBundle

    bundle = OpenedBundle.open(args.bundle)  # read and hashed once, here
    layers = parse_bandwidth(args.bandwidth, bundle.spec)
    try:
        result = run(bundle, layers)
    except (soundfile.SoundFileError, RuntimeError) as error:  # libsndfile's and onnxruntime's failures
        raise CommandError(str(error)) from None
    print(codec_summary(args.command, result))
    return 0


def codec_summary(command: str, result) -> str:
    """One line: audio seconds, layers, stream bytes, the bitrate (compress; not below one second, where the
    stream's fixed header dominates) and the real-time factor (neither for empty audio)."""
    size = f"{result.stream_bytes:,} stream bytes"
    if result.seconds == 0:  # an empty file round-trips to an empty stream: no rate or speed to speak of
        return f"{command}: no audio (0 samples), {result.layers} layer(s), {size}"
    if command == "compress":
        size += f", {result.kbps:.2f} kbit/s" if result.seconds >= 1 else " (too short for a bitrate)"
    return (f"{command}: {result.seconds:.2f} s of audio, {result.layers} layer(s), {size}, "
            f"{result.real_time_factor:.1f}x real time (audio seconds per wall-clock second, loading included)")


def _compress(args) -> int:
    from .audio import compress

    return _codec_run(args, lambda bundle, layers: compress(
        bundle, args.input, args.output, layers=layers, entropy_coding=args.entropy_coding,
        chunk_seconds=args.chunk_seconds, provider=args.provider, progress=not args.quiet))


def _decompress(args) -> int:
    from .audio import decompress

    with _option_terms(ValueError, "keep_partial", "--keep-partial"):
        return _codec_run(args, lambda bundle, layers: decompress(
            bundle, args.input, args.output, layers=layers, chunk_seconds=args.chunk_seconds,
            provider=args.provider, progress=not args.quiet, subtype=args.subtype, keep_partial=args.keep_partial))


# ------------------------------------------------------------------------------------------------ parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except absent ones (None, False), whose help says what leaving the option out means."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _subcommand(commands, name: str, summary: str, description: str):
    return commands.add_parser(name, help=summary, description=description, formatter_class=_HelpFormatter)


BUNDLE_HELP = "the bundle directory (as export writes it: manifest.json, encoder.onnx, ...)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqdeploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_export(commands)
    p = _subcommand(commands, "verify", "check a bundle with onnxruntime against PyTorch",
                    "Run the bundle's graphs under onnxruntime and compare with PyTorch: with the quantizer rebuilt "
                    "from the bundle on seeded random inputs, or, for a bundle whose graphs hold user networks, "
                    "with the outputs PyTorch gave on the input recorded at export.  Indices must agree up to "
                    "near-ties (float32 rounding), decoder outputs within 1e-5.")
    p.add_argument("bundle", help=BUNDLE_HELP)
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"],
                   help="onnxruntime execution provider to check (cuda fails rather than fall back to the CPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs (a bundle with user networks is checked on its recorded input)")
    p.set_defaults(run=_verify)
    p = _subcommand(commands, "info", "print a bundle's manifest",
                    "Print what a bundle holds: class, config, layers, graphs, file hashes, versions (reads JSON and "
                    "hashes files only).")
    p.add_argument("bundle", help=BUNDLE_HELP)
    p.set_defaults(run=_info)
    _add_bench(commands)
    _add_codec(commands)
    return parser


def _add_export(commands) -> None:
    p = _subcommand(commands, "export", "export a quantizer (from a safetensors state_dict) to a bundle",
                    "Build a quantizer from --class and --config, load --weights, export its encoder and decoder "
                    "graphs to ONNX and check them with onnxruntime.  The bundle is written beside --out and "
                    "renamed into place when complete.")
    p.add_argument("--class", dest="cls", required=True, help="quantizer class, e.g. ResidualVQ")
    p.add_argument("--config", default="{}", help="constructor arguments as a JSON object")
    p.add_argument("--weights", help="a state_dict in safetensors (vqdeploy or vector-quantize-pytorch 1.14.17); "
                                     "none: the untrained quantizer")
    p.add_argument("--out", required=True, help="bundle directory to write (new, empty, or a bundle with --overwrite)")
    p.add_argument("--example-shape", help="export example shape, e.g. 2,1024,256; none: a small input of the "
                                           "quantizer's layout")
    p.add_argument("--index-dtype", default="int64", choices=["int64", "int32"], help="dtype of the indices")
    p.add_argument("--num-quantizers", type=_positive_int,
                   help="residual bandwidth: encode and decode with the first k layers; none: all layers")
    p.add_argument("--opset", type=_positive_int, default=20, help="ONNX opset version")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the bundle at --out (only once the new one is complete; never a non-bundle)")
    p.set_defaults(run=_export)


def _add_bench(commands) -> None:
    p = _subcommand(commands, "bench", "time onnxruntime against PyTorch eager on a bundle",
                    "Median times of the encoder and decoder under onnxruntime and, for a bundle of a quantizer "
                    "alone, of the quantizer in PyTorch eager.  A bundle whose graphs hold user networks is timed "
                    "under onnxruntime only (the networks are not in it as PyTorch code).")
    p.add_argument("bundle", help=BUNDLE_HELP)
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when torch and onnxruntime see a GPU, else CPU")
    p.add_argument("--batch", type=_positive_int, default=4, help="batch size of the timed input")
    p.add_argument("--tokens", type=_positive_int, default=1024,
                   help="size of the input's first token axis (tokens; for a bundle with user networks, the "
                        "network's input units: samples, tokens x hop for an audio bundle)")
    p.add_argument("--iters", type=_positive_int, default=20, help="timed calls per graph (the median is printed)")
    p.set_defaults(run=_bench)


def _add_codec(commands) -> None:
    for name, run, summary, description in (
            ("compress", _compress, "an audio file -> a code stream, through an audio bundle",
             "Encode an audio file (WAV, FLAC, OGG, ...: its sample rate and channels must be the bundle's) into "
             "a code stream, a chunk at a time."),
            ("decompress", _decompress, "a code stream -> an audio file",
             "Decode a code stream written by compress with the same bundle into an audio file (format from its "
             "extension), a chunk at a time.")):
        p = _subcommand(commands, name, summary, description)
        p.add_argument("bundle", help="the audio bundle directory (exported with audio=...)")
        p.add_argument("input", help="audio file to read" if name == "compress" else "code stream to read")
        p.add_argument("output", help="code stream to write" if name == "compress" else "audio file to write")
        p.add_argument("--bandwidth", default=None,
                       help="residual layers to write/read (e.g. 2), or a bitrate (e.g. 12kbps: the most layers "
                            "that fit, packed) (default: all layers the stream/bundle holds)")
        if name == "compress":
            p.add_argument("--entropy-coding", action="store_true",
                           help="range-code with the bundle's code frequencies (else fixed-width packing)")
        else:
            p.add_argument("--subtype", help="audio sample format, e.g. PCM_16 or FLOAT; none: the format's default")
            p.add_argument("--keep-partial", action="store_true",
                           help="on a damaged stream, keep the audio decoded before the damage (the file is renamed "
                                "into place and the command still exits 2)")
        p.add_argument("--chunk-seconds", type=_positive_float, default=DEFAULT_CHUNK_SECONDS,
                       help="audio per network call (bounds memory)")
        p.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"],
                       help="onnxruntime execution provider (auto: CUDA when available)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(run=run)


# ------------------------------------------------------------------------------------------------ main


def _expected_errors() -> tuple[type, ...]:
    """What a user's input causes: our own, ValueError (BundleError, StreamError), OSError, and a parity failure
    (its module is only looked up: importing it would import torch)."""
    checks = sys.modules.get("vqdeploy.export.checks")
    return (CommandError, ValueError, OSError) + ((checks.ExportParityError,) if checks else ())


def _message(error: BaseException) -> str:
    """An error's message in one line; a parity failure's table goes to stdout first."""
    report = getattr(error, "report", None)
    if report is not None:
        print(report.table())
        return f"{str(error).splitlines()[0].rstrip(':')}: {report.first_problem} (table above)"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prefix = f"vqdeploy {args.command}: error:"
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"vqdeploy {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, _expected_errors()):
            print(f"{prefix} {_message(error)}", file=sys.stderr)
            return 2
        if os.environ.get("VQDEPLOY_DEBUG") == "1":
            raise
        print(f"{prefix} unexpected {type(error).__name__}: {_message(error)} (set VQDEPLOY_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
