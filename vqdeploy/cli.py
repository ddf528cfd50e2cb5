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
"""

from __future__ import annotations

import argparse
import json
import sys


def _progress(message: str) -> None:
    print(f"[vqdeploy] {message}", file=sys.stderr, flush=True)


def _export(args) -> int:
    import torch
    from safetensors.torch import load_file

    from .export import export
    from .export.bundle import BundleError, quantizer_classes

    classes = quantizer_classes()
    if args.cls not in classes:
        raise SystemExit(f"unknown class {args.cls!r}; known: {', '.join(classes)}")
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--config is not valid JSON: {error}") from None
    _progress(f"building {args.cls}({config})")
    quantizer = classes[args.cls](**config)
    if args.weights:
        _progress(f"loading {args.weights}")
        state = load_file(args.weights)
        try:
            quantizer.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BundleError(f"{args.weights} does not fit {args.cls}: {error}") from None
    example = None
    if args.example_shape:
        example = torch.randn([int(s) for s in args.example_shape.split(",")])
    _progress(f"exporting to {args.out} (encoder, decoder, onnxruntime check)")
    result = export(quantizer, args.out, example=example, index_dtype=args.index_dtype,
                    num_quantizers=args.num_quantizers, opset=args.opset, overwrite=args.overwrite)
    print(result.report.table())
    print(f"bundle written to {result.path}")
    return 0


def _verify(args) -> int:
    from .export import verify

    _progress(f"verifying {args.bundle} with onnxruntime ({args.provider})")
    print(verify(args.bundle, provider=args.provider, seed=args.seed).table())
    return 0


def _info(args) -> int:
    from .export import read_manifest
    from .export.bundle import FREQUENCIES_FILE, manifest_sha256

    manifest = read_manifest(args.bundle)
    rows = [("class", manifest["class"]), ("config", json.dumps(manifest["config"])),
            ("user networks", f"encoder {manifest['encoder_network']}, decoder {manifest['decoder_network']}"), ("index dtype", manifest["index_dtype"]),
            ("num_quantizers", manifest["num_quantizers"]), ("codebook size", manifest["codebook_size"]),
            ("opset", manifest["opset"])]
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
    rows.append(("stream id (sha256 manifest.json)", manifest_sha256(args.bundle)[:16] + "..."))
    rows += [(f"{package} version", version) for package, version in manifest["versions"].items()]
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _bench(args) -> int:
    import torch

    from .export import load
    from .runtime import Session
    from .timing import median_ms

    session = Session(args.bundle, provider=args.provider)
    manifest = session.manifest
    if manifest["wrapped"]:
        raise SystemExit("bench compares with the PyTorch quantizer, which a wrapped bundle does not hold alone")
    quantizer = load(args.bundle)
    shape = list(manifest["encoder"]["example_shape"])
    token_axes = [axis for axis in manifest["encoder"]["dynamic_axes"] if axis != 0]
    shape[0] = args.batch
    if token_axes:  # the first token axis (sequence, or image height) gets --tokens; others keep the example's
        shape[token_axes[0]] = args.tokens
    device = "cuda" if session.on_cuda else "cpu"
    quantizer = quantizer.to(device)
    x = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    kwargs = {} if manifest["num_quantizers"] is None else {"num_quantizers": manifest["num_quantizers"]}
    indices = quantizer.encode(x, **kwargs)
    rows = []
    with torch.no_grad():
        _progress(f"timing encode on {tuple(shape)} ({device}, median of {args.iters})")
        rows.append(("encode", median_ms(lambda: quantizer.encode(x, **kwargs), args.iters, sync=sync),
                     median_ms(lambda: session.encode(x), args.iters, sync=sync)))
        if "decoder" in manifest:
            _progress("timing decode")
            rows.append(("decode", median_ms(lambda: quantizer.decode(indices, **kwargs), args.iters, sync=sync),
                         median_ms(lambda: session.decode(indices), args.iters, sync=sync)))
    print(f"{'graph':8} {'torch eager ms':>15} {'onnxruntime ms':>15} {'speed-up':>9}")
    for graph, torch_ms, ort_ms in rows:
        print(f"{graph:8} {torch_ms:15.3f} {ort_ms:15.3f} {torch_ms / ort_ms:8.2f}x")
    return 0


def parse_bandwidth(value: str | None, spec) -> int | None:
    """--bandwidth: a layer count ("2"), or a bitrate ("12kbps": the most layers whose packed rate fits)."""
    if value is None:
        return None
    text = value.strip().lower()
    if text.isdigit():
        return spec.layers_for(int(text))
    if text.endswith("kbps"):
        try:
            limit = float(text[:-4])
        except ValueError:
            limit = None
        if limit is not None and spec.frame_rate:
            fitting = [k for k in range(1, spec.layout.layers + 1)
                       if spec.frame_rate * spec.bits_per_frame_token(k) / 1000 <= limit + 1e-9]
            if not fitting:
                lowest = spec.frame_rate * spec.bits_per_frame_token(1) / 1000
                raise ValueError(f"--bandwidth {value}: one layer already takes {lowest:g} kbit/s")
            return fitting[-1]
    raise ValueError(f"--bandwidth must be a layer count (e.g. 2) or a bitrate (e.g. 12kbps), got {value!r}")


def _codec_run(args, run) -> int:
    """compress/decompress: errors a user can fix are one line, not a traceback."""
    from .codestream import StreamError, StreamSpec
    from .export.bundle import BundleError

    try:
        spec = StreamSpec.from_bundle(args.bundle)
        layers = parse_bandwidth(args.bandwidth, spec)
        result = run(layers)
    except (ValueError, BundleError, StreamError, OSError, RuntimeError) as error:
        print(f"vqdeploy {args.command}: error: {error}", file=sys.stderr)
        return 2
    kbps = f", {result.kbps:.2f} kbit/s" if args.command == "compress" else ""
    print(f"{args.command}: {result.seconds:.2f} s of audio, {result.layers} layer(s), {result.stream_bytes:,} "
          f"stream bytes{kbps}, {result.real_time_factor:.1f}x real time")
    return 0


def _compress(args) -> int:
    from .audio import compress

    return _codec_run(args, lambda layers: compress(
        args.bundle, args.input, args.output, layers=layers, entropy_coding=args.entropy_coding,
        chunk_seconds=args.chunk_seconds, provider=args.provider, progress=not args.quiet))


def _decompress(args) -> int:
    from .audio import decompress

    return _codec_run(args, lambda layers: decompress(
        args.bundle, args.input, args.output, layers=layers, chunk_seconds=args.chunk_seconds,
        provider=args.provider, progress=not args.quiet, subtype=args.subtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vqdeploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="export a quantizer (from a safetensors state_dict) to a bundle")
    p.add_argument("--class", dest="cls", required=True, help="quantizer class, e.g. ResidualVQ")
    p.add_argument("--config", default="{}", help="constructor arguments as JSON")
    p.add_argument("--weights", help="a state_dict in safetensors (vqdeploy or vector-quantize-pytorch 1.14.17)")
    p.add_argument("--out", required=True, help="bundle directory")
    p.add_argument("--example-shape", help="export example shape, e.g. 2,1024,256 (default: a small input)")
    p.add_argument("--index-dtype", default="int64", choices=["int64", "int32"])
    p.add_argument("--num-quantizers", type=int, help="residual bandwidth: the first k quantizers")
    p.add_argument("--opset", type=int, default=20)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=_export)
    p = commands.add_parser("verify", help="check a bundle with onnxruntime against PyTorch")
    p.add_argument("bundle")
    p.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_verify)
    p = commands.add_parser("info", help="print a bundle's manifest")
    p.add_argument("bundle")
    p.set_defaults(run=_info)
    p = commands.add_parser("bench", help="time onnxruntime against PyTorch eager on a bundle")
    p.add_argument("bundle")
    p.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--iters", type=int, default=20)
    p.set_defaults(run=_bench)
    for name, run, text in (("compress", _compress, "an audio file -> a code stream, through an audio bundle"),
                            ("decompress", _decompress, "a code stream -> an audio file")):
        p = commands.add_parser(name, help=text)
        p.add_argument("bundle")
        p.add_argument("input")
        p.add_argument("output")
        p.add_argument("--bandwidth", help="residual layers to write/read (e.g. 2), or a bitrate (e.g. 12kbps)")
        if name == "compress":
            p.add_argument("--entropy-coding", action="store_true",
                           help="range-code with the bundle's code frequencies (else fixed-width packing)")
        else:
            p.add_argument("--subtype", help="audio sample format, e.g. PCM_16 or FLOAT (default: the format's)")
        p.add_argument("--chunk-seconds", type=float, default=10.0, help="audio per network call (memory bound)")
        p.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
