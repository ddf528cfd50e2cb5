"""The bundle format: file names and the manifest, written and read as untrusted input (below export, codestream).

A bundle is a directory: ``encoder.onnx``, ``decoder.onnx`` (not for encoder-only quantizers), ``weights.safetensors``
and ``manifest.json``; optionally the code frequencies of entropy-coded streams and, for graphs holding user networks,
the reference outputs PyTorch gave at export (so that the graphs can be verified without the networks' PyTorch code).
The manifest names the class and its constructor config, the graphs' inputs and outputs, the sha256 of every file and
the versions that wrote it.  Reading a manifest imports no torch (``vqdeploy info`` stays fast).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .registry import EXPORTED, load_class

FORMAT = "vqdeploy-bundle"
# 2: optional code frequencies and audio entry; 3: optional reference outputs.  A bundle is written with the
# lowest version that describes what it holds (1 without any of them).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
WEIGHTS_FILE = "weights.safetensors"
FREQUENCIES_FILE = "code_frequencies.safetensors"  # per-layer code counts for entropy-coded streams (optional)
REFERENCE_FILE = "reference_outputs.safetensors"  # PyTorch's outputs at export, for wrapped bundles (optional)
OPTIONAL_FILES = (FREQUENCIES_FILE, REFERENCE_FILE)
QUANTIZER_CLASS_NAMES = EXPORTED  # the registry's classes with an export family


class BundleError(ValueError):
    """A bundle that cannot be trusted or read: a changed or missing file, an unknown class, a newer format."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_sha256(directory: str | Path) -> str:
    """A bundle's identity: the sha256 of its manifest.json, which hashes every other file.  Code streams carry
    it, so a stream is only ever decoded by the bundle that wrote it."""
    return hashlib.sha256((Path(directory) / MANIFEST).read_bytes()).hexdigest()


def quantizer_classes() -> dict[str, type]:
    """The classes a bundle may name; nothing else is ever constructed from a manifest (imports them, and torch)."""
    return {name: load_class(name) for name in QUANTIZER_CLASS_NAMES}


def write_manifest(directory: Path, manifest: dict) -> None:
    """Hash every file the manifest lists, then write it."""
    manifest["files"] = {name: sha256(directory / name) for name in manifest["files"]}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


REQUIRED_KEYS = {"config": dict, "files": dict, "encoder": dict, "index_dtype": str, "codebook_size": int,
                 "wrapped": bool, "encoder_network": bool, "decoder_network": bool, "float16": bool}
GRAPH_KEYS = ("file", "input", "output", "dynamic_axes", "example_shape")


def read_manifest(directory: str | Path, check_files: bool = True) -> dict:
    """The manifest of a bundle, after checking its format, its fields and (by default) every file's sha256.

    The hashes catch changed, truncated or mixed-up files; the manifest itself is not signed, so they are no
    defence against someone who rewrites it too."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise BundleError(f"no bundle at {directory}: the directory does not exist")
    if not directory.is_dir():
        raise BundleError(f"{directory} is not a vqdeploy bundle: a bundle is a directory, this is a file")
    if not path.is_file():
        raise BundleError(f"{directory} is not a vqdeploy bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise BundleError(f"{path} is nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(f"{path} has format version {version!r}; this vqdeploy reads up to {FORMAT_VERSION} "
                          "(upgrade vqdeploy to read it)")
    if manifest.get("class") not in QUANTIZER_CLASS_NAMES:
        raise BundleError(f"{path} names an unknown quantizer class {manifest.get('class')!r}; "
                          f"known: {', '.join(QUANTIZER_CLASS_NAMES)}")
    _check_fields(path, manifest)
    if check_files:
        for name, expected in manifest["files"].items():
            file = directory / name
            if not file.is_file():
                raise BundleError(f"bundle file {file} is missing")
            if sha256(file) != expected:
                raise BundleError(f"bundle file {file} has changed since export (sha256 mismatch)")
    return manifest


def _check_fields(path: Path, manifest: dict) -> None:
    """Every field the loaders read, of the right type; the hashed files exactly the bundle's own."""
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise BundleError(f"{path}: field {key!r} is missing or not a {kind.__name__}")
    graphs = {"encoder": ENCODER_FILE, "decoder": DECODER_FILE}
    for graph, file in graphs.items():
        if graph in manifest:
            entry = manifest[graph]
            if not isinstance(entry, dict) or any(key not in entry for key in GRAPH_KEYS) or entry["file"] != file:
                raise BundleError(f"{path}: the {graph} entry must name {file} and hold {', '.join(GRAPH_KEYS)}")
    expected = {ENCODER_FILE, WEIGHTS_FILE} | ({DECODER_FILE} if "decoder" in manifest else set())
    listed = set(manifest["files"]) - set(OPTIONAL_FILES)
    if listed != expected or not all(isinstance(v, str) for v in manifest["files"].values()):
        raise BundleError(f"{path}: 'files' must hash exactly {sorted(expected)} (and optionally "
                          f"{' and '.join(OPTIONAL_FILES)}), got {sorted(manifest['files'])}")
    if REFERENCE_FILE in manifest["files"] and not manifest["wrapped"]:
        raise BundleError(f"{path}: {REFERENCE_FILE} belongs to bundles whose graphs hold user networks only")
    if "audio" in manifest:
        _check_audio(path, manifest["audio"])


MAX_CONTEXT_TOKENS = 1 << 20


def _check_audio(path: Path, audio) -> None:
    """The audio entry a codec runtime reads: positive sizes, contexts of two bounded counts or null."""
    def positive(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    def context(value):
        return value is None or (isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_CONTEXT_TOKENS for v in value))

    fine = isinstance(audio, dict) and all(positive(audio.get(k)) for k in ("sample_rate", "channels", "hop")) \
        and isinstance(audio.get("frame_rate"), (int, float)) and context(audio.get("encoder_context")) \
        and context(audio.get("decoder_context", None))
    if not fine:
        raise BundleError(f"{path}: the 'audio' entry must hold positive ints sample_rate, channels, hop, a "
                          "frame_rate and encoder/decoder contexts of [left, right] tokens (or null)")
    rate = audio["frame_rate"]
    if isinstance(rate, bool) or not (math.isfinite(rate) and math.isclose(rate, audio["sample_rate"] / audio["hop"],
                                                                             rel_tol=1e-9)):
        raise BundleError(f"{path}: the audio entry's frame_rate {rate!r} is not its sample_rate / hop "
                          f"({audio['sample_rate']} / {audio['hop']})")


def build_quantizer(manifest: dict) -> torch.nn.Module:
    """An untrained quantizer of the manifest's class and config (check the config first: ``consistency``)."""
    from .config import config_from_json

    cls = quantizer_classes()[manifest["class"]]
    return cls(**config_from_json(manifest["config"]))
