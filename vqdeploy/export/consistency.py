"""A bundle's manifest is untrusted input: its config is checked against the bundle's own files before
anything is built from it.

The manifest is not signed, and its hashes only tie the files to it: whoever rewrites it can make its config
ask for anything (a codebook of 10^12 codes, a million layers).  So before a quantizer is constructed,
``check_bundle``:

- accepts only the class's constructor arguments (a config with other keys is refused);
- bounds the arguments that make Python objects rather than tensors (layers, groups, per-channel value
  tables), since even a build on the meta device makes every module;
- builds the quantizer on the meta device, which allocates nothing, and compares every tensor its config
  implies with the safetensors header (read without reading a tensor): names, dtypes and shapes;
- compares the ONNX graphs' inputs and outputs with the manifest and the config (the feature size of a bare
  quantizer; the index dtype; heads, codebooks, layers and groups of the indices), and the graphs' constants
  with the module's tensors;
- bounds the tensors the config makes beyond the weights (an FSQ grid, LFQ's table of codes) by
  ``max_derived_bytes``.

Every failure raises ``BundleError`` naming the field, the file or the tensor.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..config import TRAINING_ONLY_ARGUMENTS, config_from_json
from ..bundle_format import DECODER_FILE, ENCODER_FILE, WEIGHTS_FILE, BundleError, build_quantizer, quantizer_classes
from ..registry import BY_NAME
from .graphs import feature_axis, index_dims, is_residual, value_info

MAX_LAYERS = 1024  # num_quantizers x groups: residual codecs use 4 to 32 layers
MAX_CHANNELS = 1 << 16  # LatentQuantize's per-channel value tables (levels given as one int, repeated dim times)
MAX_DERIVED_BYTES = 1 << 31  # tensors a config makes beyond its weights (FSQ grids, LFQ code tables)
MAX_HEADER_BYTES = 100 << 20  # a safetensors header lists names and shapes: far below this

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def constructor_arguments(name: str) -> set[str]:
    """Every argument a quantizer class (and the classes its **kwargs reach) accepts."""
    parameters = inspect.signature(quantizer_classes()[name].__init__).parameters.values()
    names = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"}
    further = BY_NAME[name].kwargs_go_to  # the class its **kwargs go on to
    return names | (constructor_arguments(further) if further else set())


def check_bundle(directory: Path, manifest: dict, max_derived_bytes: int | None = None) -> nn.Module:
    """Check a read manifest against its bundle's files; returns the quantizer built on the meta device.
    ``max_derived_bytes``: None for ``MAX_DERIVED_BYTES``."""
    max_derived_bytes = MAX_DERIVED_BYTES if max_derived_bytes is None else max_derived_bytes
    config = _checked_config(directory, manifest)
    module = _meta_build(directory, manifest)
    persistent = _check_weights(directory / WEIGHTS_FILE, module, config)
    _check_graphs(directory, manifest, module, config)
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
    derived = sum(t.numel() * t.element_size() for t in tensors) - persistent
    if derived > max_derived_bytes:
        raise BundleError(f"{directory}: the config ({_sizes(config)}) makes {derived:,} bytes of tensors beyond "
                          f"the weights, more than max_derived_bytes={max_derived_bytes:,}")
    if manifest["codebook_size"] != module.codebook_size:
        raise BundleError(f"{directory}: field 'codebook_size' is {manifest['codebook_size']}, the config gives "
                          f"{module.codebook_size}")
    sizes = manifest.get("codebook_sizes")
    if sizes is not None and sizes != list(getattr(module, "codebook_sizes", ())):
        raise BundleError(f"{directory}: field 'codebook_sizes' is {sizes}, the config gives "
                          f"{list(getattr(module, 'codebook_sizes', ()))}")
    return module


# ------------------------------------------------------------------------------------------------ config


def _checked_config(directory: Path, manifest: dict) -> dict:
    stored = manifest["config"]
    allowed = constructor_arguments(manifest["class"]) - set(TRAINING_ONLY_ARGUMENTS)
    unknown = sorted(set(stored) - allowed)
    if unknown:
        raise BundleError(f"{directory}: config field {unknown[0]!r} is not an argument of {manifest['class']}")
    try:
        config = config_from_json(stored)
    except ValueError as error:
        raise BundleError(f"{directory}: config: {error}") from None
    layers = 1
    for field in ("num_quantizers", "groups"):
        value = config.get(field, 1)
        if field == "num_quantizers" and value is None and isinstance(config.get("codebook_size"), list):
            value = len(config["codebook_size"])  # one codebook size per layer
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BundleError(f"{directory}: config field {field!r} must be a positive int, got {value!r}")
        layers *= value
    if layers > MAX_LAYERS:
        raise BundleError(f"{directory}: config fields 'num_quantizers' x 'groups' make {layers:,} layers; a bundle "
                          f"may hold at most {MAX_LAYERS}")
    levels = config.get("levels")
    for field in ("dim", "codebook_dim"):  # LatentQuantize repeats int levels codebook_dim (1.32.0) or dim times
        value = config.get(field)
        if isinstance(levels, int) and isinstance(value, int) and value > MAX_CHANNELS:
            raise BundleError(f"{directory}: config field {field!r} ({value:,}) repeats the levels into more than "
                              f"{MAX_CHANNELS} value tables")
    return config


def _meta_build(directory: Path, manifest: dict) -> nn.Module:
    """The manifest's quantizer with every tensor on the meta device (sizes without memory)."""
    try:
        with torch.device("meta"):
            return build_quantizer(manifest)
    except (ValueError, TypeError, OverflowError, RuntimeError) as error:
        raise BundleError(f"{directory}: the config does not build a {manifest['class']}: {error}") from None


def _sizes(config: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in config.items() if key in _SIZE_FIELDS)


_SIZE_FIELDS = ("dim", "codebook_size", "codebook_dim", "heads", "num_codebooks", "num_quantizers", "groups",
                "levels")


def _fields_behind(config: dict, sizes) -> list[str]:
    """The config fields whose values give any of ``sizes`` (directly, as a log2, or as a product of levels)."""
    found = []
    for key in _SIZE_FIELDS:
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        candidates = {v for v in values if isinstance(v, int)}
        candidates |= {int(math.log2(v)) for v in candidates if v > 0 and v & (v - 1) == 0}
        if isinstance(value, list) and all(isinstance(v, int) for v in value):
            candidates |= {len(value), math.prod(value)}
        if candidates & set(sizes):
            found.append(key)
    return found or [key for key in _SIZE_FIELDS if key in config]


# ------------------------------------------------------------------------------------------------ weights


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Names, dtypes and shapes of a safetensors file, from its header alone; checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
            raise BundleError(f"{path}: not a safetensors file (header length {length} in a {size}-byte file)")
        try:
            header = json.loads(file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BundleError(f"{path}: unreadable safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: unreadable safetensors header")
    tensors, data_size = {}, size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape, dtype = entry.get("shape") if isinstance(entry, dict) else None, None
        if isinstance(entry, dict):
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        valid = (dtype is not None and isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2
                 and all(isinstance(s, int) and s >= 0 for s in shape + offsets) and offsets[1] <= data_size
                 and offsets[1] - offsets[0] == math.prod(shape) * dtype.itemsize)
        if not valid:
            raise BundleError(f"{path}: tensor {name!r} has a malformed header entry {entry!r:.120}")
        tensors[name] = (dtype, tuple(shape))
    return tensors


def _check_weights(path: Path, module: nn.Module, config: dict) -> int:
    """The safetensors header against the module's persistent state; returns the state's bytes.  A tensor that
    several names share (a shared codebook) is stored under one of them."""
    stored = read_safetensors_header(path)
    state = module.state_dict(keep_vars=True)
    names_of = {}
    for name, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(name)
    unexpected = sorted(set(stored) - set(state))
    if unexpected:
        raise BundleError(f"{path} holds {unexpected[0]!r}, which a {type(module).__name__} with this config does "
                          f"not have ({_sizes(config)})")
    persistent = 0
    for names in names_of.values():
        tensor = state[names[0]]
        present = [name for name in names if name in stored]
        if not present:
            raise BundleError(f"{path} lacks {names[0]!r}, which the config ({_sizes(config)}) implies")
        persistent += tensor.numel() * tensor.element_size()
        for name in present:
            dtype, shape = stored[name]
            if shape != tuple(tensor.shape) or dtype != tensor.dtype:
                differing = [want for want, have in zip(tensor.shape, shape) if want != have] or list(tensor.shape)
                fields = ", ".join(repr(f) for f in _fields_behind(config, differing))
                raise BundleError(f"config field {fields} disagrees with {path}: {name!r} is {dtype}{list(shape)} "
                                  f"there, the config implies {tensor.dtype}{list(tensor.shape)}")
    return persistent


# ------------------------------------------------------------------------------------------------ graphs


def _check_graphs(directory: Path, manifest: dict, module: nn.Module, config: dict) -> None:
    import onnx

    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()
    module_elements = sum(t.numel() for t in tensors)
    num_quantizers = manifest.get("num_quantizers")
    if num_quantizers is not None and (not is_residual(module) or not isinstance(num_quantizers, int)
                                       or not 1 <= num_quantizers <= module.num_quantizers):
        raise BundleError(f"{directory}: field 'num_quantizers' ({num_quantizers!r}) is not a bandwidth of this "
                          f"{manifest['class']} (config num_quantizers={config.get('num_quantizers')})")
    leading, trailing = index_dims(module, num_quantizers)
    for graph, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
        if graph not in manifest:
            continue
        model = onnx.load(str(directory / file), load_external_data=False)
        spec = manifest[graph]
        for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
            if len(values) != 1 or value_info(values[0]) != spec[kind]:
                raise BundleError(f"{directory}: field '{graph}.{kind}' ({spec[kind]}) is not what {file} declares "
                                  f"({[value_info(v) for v in values]})")
        indices = spec["output" if graph == "encoder" else "input"]
        if indices["dtype"] != manifest["index_dtype"]:
            raise BundleError(f"{directory}: field 'index_dtype' is {manifest['index_dtype']}, {file} uses "
                              f"{indices['dtype']}")
        shape = indices["shape"]
        if tuple(shape[:len(leading)]) != leading or (trailing and tuple(shape[-len(trailing):]) != trailing):
            raise BundleError(f"{directory}: the config's indices (fixed sizes {list(leading)} before the tokens, "
                              f"{list(trailing)} after; fields {', '.join(_fields_behind(config, leading + trailing))}) "
                              f"disagree with {file}'s {shape}")
        if graph == "encoder" and not manifest["encoder_network"]:
            features = spec["input"]["shape"]
            axis = feature_axis(module, len(features))
            if features[axis] != module.dim:
                raise BundleError(f"{directory}: config field 'dim' ({module.dim}) disagrees with {file}, whose "
                                  f"inputs have {features[axis]} features")
        if not manifest[f"{graph}_network"]:
            constants = sum(math.prod(init.dims) for init in model.graph.initializer)
            if constants > 2 * module_elements + 4096:
                raise BundleError(f"{directory}: {file} holds {constants:,} constants, more than a "
                                  f"{manifest['class']} with this config ({_sizes(config)}) has")
