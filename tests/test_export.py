"""Export bundles: every quantizer class, bare and wrapped between user networks, parity under onnxruntime
(CPU) at shapes other than the export example, rebuilding without pickle, and tampered bundles."""

import copy
import json
import pickle
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import vqdeploy as V
from vqdeploy.export import BundleError, ExportParityError, export, read_manifest, verify
from vqdeploy.export.folding import fold_code_transforms
from vqdeploy.export.graphs import is_residual

CLASSES = {
    "vq_heads_cosine_image": (lambda: V.VectorQuantize(dim=16, codebook_size=64, heads=2, codebook_dim=8,
                                                       separate_codebook_per_head=True, use_cosine_sim=True,
                                                       accept_image_fmap=True), {}),
    "vq_channel_first_int32": (lambda: V.VectorQuantize(dim=16, codebook_size=64, channel_last=False),
                               dict(index_dtype="int32")),
    "vq_3d_fmap_layernorm_projection": (lambda: V.VectorQuantize(dim=16, codebook_size=64, codebook_dim=8,
                                                                 layernorm_after_project_in=True,
                                                                 accept_3d_fmap=True), {}),
    "rvq_shared_bandwidth": (lambda: V.ResidualVQ(dim=16, codebook_size=64, num_quantizers=3, shared_codebook=True,
                                                  codebook_dim=8), dict(num_quantizers=2)),
    "grouped_rvq_layer_sizes": (lambda: V.GroupedResidualVQ(dim=16, groups=2, codebook_size=(64, 16)), {}),
    "rvq_implicit_neural_codebook": (lambda: V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3,
                                                          implicit_neural_codebook=True), {}),
    "rvq_vq_bridge": (lambda: V.ResidualVQ(dim=16, codebook_size=64, num_quantizers=2,
                                           vq_bridge=torch.nn.Linear(16, 16)), {}),
    "rvq_eval_beam_search": (lambda: V.ResidualVQ(dim=16, codebook_size=64, num_quantizers=3, beam_size=1,
                                                  eval_beam_size=4, beam_score_quantizer_weights=[1.0, 0.5, 2.0]), {}),
    "random_projection": (lambda: V.RandomProjectionQuantizer(dim=16, codebook_size=64, codebook_dim=8,
                                                              num_codebooks=2), {}),
    "fsq_channel_first_projection": (lambda: V.FSQ(levels=[8, 5, 5], dim=8, channel_first=True), {}),
    "fsq_symmetric_hard_clamp_rotation": (lambda: V.FSQ(levels=[2, 2, 2], dim=8, preserve_symmetry=True,
                                                        bound_hard_clamp=True, orthogonal_rotation=True), {}),
    "residual_fsq": (lambda: V.ResidualFSQ(dim=16, levels=[8, 5, 5, 5], num_quantizers=3), {}),
    "grouped_fsq": (lambda: V.GroupedResidualFSQ(dim=16, groups=2, levels=[5, 5, 5], num_quantizers=2), {}),
    "lfq_codebooks_spherical_rotation_cosine": (lambda: V.LFQ(dim=16, codebook_size=2**6, num_codebooks=2,
                                                              spherical=True, orthogonal_rotation=True,
                                                              cosine_sim_project_in=True), dict(index_dtype="int32")),
    "residual_lfq_clamped": (lambda: V.ResidualLFQ(dim=16, codebook_size=2**8, num_quantizers=2,
                                                   soft_clamp_input_value=10), {}),
    "grouped_lfq": (lambda: V.GroupedResidualLFQ(dim=16, groups=2, codebook_size=2**5, num_quantizers=2), {}),
    "latent_trained": (lambda: _trained_latent(), {}),
    "fsp_inverse_cdf_channel_first": (lambda: V.FSP(levels=[8, 5, 5], dim=16, channel_first=True, act_name="normal",
                                                    need_inv_act=True), {}),
    "simvq_mlp_transform": (lambda: V.SimVQ(dim=16, codebook_size=64, frozen_codebook_dim=8, codebook_transform=(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)))), {}),
    "hierarchical_image_levels": (lambda: V.HierarchicalVQ(dim=16, codebook_size=[64, 32, 32], scales=[1, 2, (2, 4)],
                                                           shared_codebook=False, accept_image_fmap=True), {}),
    "residual_simvq_channel_first_bandwidth": (lambda: V.ResidualSimVQ(dim=16, num_quantizers=3, codebook_size=64,
                                                                      channel_first=True), dict(num_quantizers=2)),
}


def _trained_latent():
    """LatentQuantize whose values have moved: the decoder must carry the learned values."""
    lq = V.LatentQuantize(levels=[5, 5, 8], dim=16)
    optimizer = torch.optim.SGD(lq.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        lq(torch.randn(2, 16, 20)).loss.backward()
        optimizer.step()
    return lq


@pytest.mark.parametrize("name", list(CLASSES))
def test_every_class_exports_and_matches_onnxruntime(name, tmp_path):
    make, options = CLASSES[name]
    torch.manual_seed(0)
    quantizer = make()
    result = export(quantizer, tmp_path / "bundle", **options)
    assert result.report.passed and len(result.report.checks) >= 2  # two input shapes unlike the example
    manifest = read_manifest(tmp_path / "bundle")
    assert manifest["class"] == type(quantizer).__name__
    index_dtype = options.get("index_dtype", "int64")
    assert manifest["encoder"]["output"]["dtype"] == index_dtype
    assert isinstance(manifest["encoder"]["input"]["shape"][0], str)  # a dynamic batch axis
    assert ("decoder" in manifest) == (name != "random_projection")
    assert manifest["codebook_sizes"] == (list(quantizer.codebook_sizes) if is_residual(quantizer) else None)

    rebuilt = V.load(tmp_path / "bundle")
    assert type(rebuilt) is type(quantizer) and not rebuilt.training
    exported = fold_code_transforms(copy.deepcopy(quantizer))
    for key, value in exported.state_dict().items():  # SimVQ's transform and vq_bridges are folded into codes
        assert torch.equal(rebuilt.state_dict()[key], value), key
    assert verify(tmp_path / "bundle", seed=1).passed


def test_wrapped_codec_exports_the_networks_inside_the_graphs(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv1d(1, 16, 4, stride=2, padding=1), nn.ELU(), nn.Conv1d(16, 16, 3, padding=1))
    quantizer = V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=2, channel_last=False)
    decoder = nn.Sequential(nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1), nn.ELU(), nn.Conv1d(8, 1, 3, padding=1))
    waveform = torch.randn(2, 1, 64)
    result = export(quantizer, tmp_path / "codec", encoder=encoder, decoder=decoder, example=waveform)
    assert result.report.passed and result.manifest["wrapped"]
    encode = ort.InferenceSession(str(tmp_path / "codec" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decode = ort.InferenceSession(str(tmp_path / "codec" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 96)
    indices = encode.run(None, {"inputs": x.numpy()})[0]
    with torch.no_grad():
        expected = quantizer.eval().encode(encoder(x))
        assert np.array_equal(indices, expected.numpy())
        np.testing.assert_allclose(decode.run(None, {"indices": indices})[0],
                                   decoder(quantizer.decode(expected)).numpy(), atol=1e-5, rtol=0)
    assert verify(tmp_path / "codec").recorded  # against the reference outputs the export recorded
    with pytest.raises(ValueError, match="pass the encoder module"):
        verify(tmp_path / "codec", decoder=decoder)
    with pytest.raises(ValueError, match=r"shape \(\*, 1, \*\)"):
        verify(tmp_path / "codec", encoder=encoder, decoder=decoder, inputs=torch.randn(2, 2, 64))
    with pytest.raises(ValueError, match="finite"):
        verify(tmp_path / "codec", encoder=encoder, decoder=decoder, inputs=torch.full((2, 1, 64), float("nan")))
    with pytest.raises(TypeError, match="floating-point"):
        verify(tmp_path / "codec", encoder=encoder, decoder=decoder, inputs=[torch.zeros(2, 1, 64, dtype=torch.long)])
    assert verify(tmp_path / "codec", encoder=encoder, decoder=decoder).passed


def test_reference_checkpoint_exports_in_one_call(tmp_path):
    """A state_dict trained in vector-quantize-pytorch 1.14.17 loads into the twin and exports; onnxruntime
    gives the reference's own eval indices."""
    import vector_quantize_pytorch as vqp

    torch.manual_seed(0)
    ref = vqp.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, kmeans_init=True, kmeans_iters=2)
    for _ in range(2):
        ref(torch.randn(4, 20, 16))
    twin = V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, kmeans_init=True, kmeans_iters=2)
    twin.load_state_dict(ref.state_dict())
    export(twin, tmp_path / "rvq")
    session = ort.InferenceSession(str(tmp_path / "rvq" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 50, 16)
    assert np.array_equal(session.run(None, {"inputs": x.numpy()})[0], ref.eval()(x)[1].numpy())


@pytest.fixture(scope="module")
def fsq_bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "fsq"
    export(V.FSQ(levels=[8, 5, 5, 5], dim=8), path, verify=False)
    return path


def _tampered(bundle, tmp_path, change):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    change(copy)
    return copy


def _edit_manifest(key, value):
    def change(path):
        manifest = json.loads((path / "manifest.json").read_text())
        manifest[key] = value
        (path / "manifest.json").write_text(json.dumps(manifest))
    return change


@pytest.mark.parametrize("change, match", [
    (lambda p: (p / "encoder.onnx").write_bytes((p / "encoder.onnx").read_bytes() + b"\0"), "encoder.onnx has changed"),
    (lambda p: (p / "weights.safetensors").unlink(), "weights.safetensors is missing"),
    (_edit_manifest("class", "Unpickler"), "unknown quantizer class 'Unpickler'"),
    (_edit_manifest("format_version", 99), "format version 99"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (_edit_manifest("files", {}), "'files' must hash exactly"),
    (_edit_manifest("files", ["encoder.onnx"]), "field 'files' is missing or not a dict"),
    (_edit_manifest("encoder", {"file": "../elsewhere.onnx", "input": {}, "output": {}, "dynamic_axes": [],
                                "example_shape": []}), "the encoder entry must name encoder.onnx"),
    (_edit_manifest("config", None), "field 'config'"),
])
def test_tampered_bundles_fail_clearly(fsq_bundle, tmp_path, change, match):
    with pytest.raises(BundleError, match=match):
        V.load(_tampered(fsq_bundle, tmp_path, change))


@pytest.fixture(scope="module")
def hostile_bases(tmp_path_factory, fsq_bundle):
    """Small bundles of the kinds a hostile manifest can target: codebooks in the weights (VectorQuantize),
    layers (ResidualVQ), groups (GroupedResidualFSQ), FSQ with projections and with no weights at all,
    per-channel values."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hostile")
    bases = {"fsq": fsq_bundle}
    for name, quantizer in (("vq", V.VectorQuantize(dim=16, codebook_size=64)), ("fsq_bare", V.FSQ(levels=[8, 5])),
                            ("rvq", V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=2)),
                            ("grouped", V.GroupedResidualFSQ(dim=8, groups=2, levels=[5, 5], num_quantizers=2)),
                            ("latent", V.LatentQuantize(levels=5, dim=4))):
        export(quantizer, root / name, verify=False)
        bases[name] = root / name
    return bases


def _rewritten(bundle, tmp_path, edit):
    """A copy of ``bundle`` whose manifest ``edit`` rewrote, with every hash recomputed: what an attacker (or
    a careless tool) can do, since the manifest is not signed."""
    import shutil

    from vqdeploy.export.bundle import write_manifest

    copy = tmp_path / "rewritten"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    manifest["files"] = list(manifest["files"])
    write_manifest(copy, manifest)
    return copy


def _set(*path, value):
    def edit(manifest):
        *parents, last = path
        target = manifest
        for key in parents:
            target = target[key]
        target[last] = value
    return edit


HOSTILE = {
    "huge_codebook": ("vq", _set("config", "codebook_size", value=10**12), "'codebook_size'"),
    "negative_codebook": ("vq", _set("config", "codebook_size", value=-5), "codebook_size must be a positive int"),
    "huge_dim": ("vq", _set("config", "dim", value=10**9), "'dim'"),
    "dim_disagrees_with_weights": ("vq", _set("config", "dim", value=32), "field 'dim'"),
    "heads_without_their_projection": ("vq", _set("config", "heads", value=2), "lacks 'project_in.weight'"),
    "unknown_key": ("vq", _set("config", "exec", value="rm -rf /"), "config field 'exec' is not an argument"),
    "training_only_key": ("vq", _set("config", "in_place_codebook_optimizer", value="SGD"),
                          "'in_place_codebook_optimizer' is not an argument"),
    "manifest_codebook_size": ("vq", _set("codebook_size", value=10**12), "field 'codebook_size'"),
    "index_shape": ("vq", _set("encoder", "output", "shape", value=["s0", "s1", 5]), "field 'encoder.output'"),
    "huge_layers": ("rvq", _set("config", "num_quantizers", value=10**9), "'num_quantizers' x 'groups'"),
    "negative_layers": ("rvq", _set("config", "num_quantizers", value=-1), "'num_quantizers' must be a positive"),
    "bandwidth": ("rvq", _set("num_quantizers", value=99), "field 'num_quantizers'"),
    "more_layers_than_weights": ("rvq", _set("config", "num_quantizers", value=3), "lacks 'layers.2"),
    "huge_groups": ("grouped", _set("config", "groups", value=10**6), "'num_quantizers' x 'groups'"),
    "fewer_groups": ("grouped", _set("config", "groups", value=1), "config field 'dim'|groups"),
    "fsq_levels_disagree_with_projection": ("fsq", _set("config", "levels", value=[3] * 19), "field 'levels'"),
    "fsq_more_channels_than_graph": ("fsq_bare", _set("config", "levels", value=[8, 5, 5]), "field 'dim'"),
    "fsq_grid_of_2_31_codes": ("fsq_bare", _set("config", "levels", value=[2**16, 2**15]), "max_derived_bytes"),
    "fsq_levels_not_ints": ("fsq", _set("config", "levels", value="8,5,5,5"), "levels must be"),
    "latent_channels": ("latent", _set("config", "dim", value=10**9), "'dim'"),
    "dtype_object": ("fsq", _set("config", "allowed_dtypes", value=[{"dtype": "__class__"}]), "unknown value"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_manifests_fail_before_anything_is_built(name, hostile_bases, tmp_path, monkeypatch):
    """Huge or negative sizes, sizes that disagree with the weights or the graphs, unknown keys: a
    BundleError naming the field, from vqdeploy.load and from Session, before any quantizer is constructed
    anywhere but on the meta device (where tensors have sizes and no memory)."""
    import vqdeploy.export.bundle as bundle_module
    from vqdeploy.runtime import Session

    base, edit, match = HOSTILE[name]
    bundle = _rewritten(hostile_bases[base], tmp_path, edit)
    build = bundle_module.build_quantizer

    def meta_only(manifest):
        assert torch.get_default_device().type == "meta", "a quantizer was built from an unchecked manifest"
        return build(manifest)

    monkeypatch.setattr(bundle_module, "build_quantizer", meta_only)
    with pytest.raises(BundleError, match=match):
        V.load(bundle)
    with pytest.raises(BundleError, match=match):
        Session(bundle, provider="cpu")


def test_a_malformed_weights_header_and_the_derived_bytes_limit(hostile_bases, tmp_path):
    """A safetensors header that claims more data than its file holds is refused unread; tensors a config makes
    beyond its weights (here FSQ's grid of 1000 codes, 16 kB) are bounded by ``max_derived_bytes``."""
    import struct

    from vqdeploy.export.bundle import write_manifest

    def claim_a_huge_tensor(path):
        header = json.dumps({"embed": {"dtype": "F32", "shape": [10**12, 16], "data_offsets": [0, 64]}}).encode()
        (path / "weights.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["files"] = list(manifest["files"])
        write_manifest(path, manifest)

    with pytest.raises(BundleError, match="malformed header entry"):
        V.load(_tampered(hostile_bases["vq"], tmp_path, claim_a_huge_tensor))
    assert isinstance(V.load(hostile_bases["fsq"]), V.FSQ)
    with pytest.raises(BundleError, match="max_derived_bytes"):
        V.load(hostile_bases["fsq"], max_derived_bytes=1000)


def test_loading_never_unpickles(fsq_bundle, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fsq = V.load(fsq_bundle)
    assert isinstance(fsq, V.FSQ) and fsq.dim == 8


def test_importing_vqdeploy_loads_no_onnx():
    code = "import sys, vqdeploy; print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_training_only_arguments_are_dropped_and_listed(tmp_path):
    vq = V.VectorQuantize(dim=8, codebook_size=16, learnable_codebook=True, ema_update=False,
                          in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    manifest = export(vq, tmp_path / "vq").manifest
    assert manifest["dropped_training_arguments"] == ["in_place_codebook_optimizer"]
    assert V.load(tmp_path / "vq").in_place_codebook_optimizer is None


def test_bad_export_calls(tmp_path):
    fsq = V.FSQ(levels=[5, 5])
    with pytest.raises(TypeError, match="vqdeploy quantizer"):
        export(nn.Linear(2, 2), tmp_path / "a")
    with pytest.raises(ValueError, match="index_dtype"):
        export(fsq, tmp_path / "b", index_dtype="int16")
    with pytest.raises(ValueError, match="batch of at least 2"):
        export(fsq, tmp_path / "c", example=torch.randn(1, 6, 2))
    with pytest.raises(ValueError, match="example is required"):
        export(fsq, tmp_path / "d", encoder=nn.Identity())
    with pytest.raises(ValueError, match="num_quantizers applies to residual"):
        export(fsq, tmp_path / "e", num_quantizers=1)
    with pytest.raises(ValueError, match="no decoder"):
        export(V.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4), tmp_path / "f",
               decoder=nn.Identity())
    with pytest.raises(ValueError, match="axes of the 3-D example"):
        export(fsq, tmp_path / "h", dynamic_axes=[0, 3])
    with pytest.raises(ValueError, match="size of at least 2"):
        export(fsq, tmp_path / "i", example=torch.randn(2, 1, 2))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export(fsq, tmp_path / "g")
    with pytest.raises(FileExistsError, match="not a vqdeploy bundle"):
        export(fsq, tmp_path / "g", overwrite=True)
    (tmp_path / "g" / "notes.txt").unlink()
    (tmp_path / "g" / "manifest.json").write_text('{"name": "my app"}')  # someone else's manifest
    with pytest.raises(FileExistsError, match="not a vqdeploy bundle"):
        export(fsq, tmp_path / "g", overwrite=True)
    assert (tmp_path / "g" / "manifest.json").read_text() == '{"name": "my app"}'


def test_overwrite_replaces_a_bundle_and_compiled_modules_export(tmp_path):
    fsq = V.FSQ(levels=[5, 5], dim=4)
    export(fsq, tmp_path / "b", verify=False)
    result = export(torch.compile(V.FSQ(levels=[8, 5], dim=4)), tmp_path / "b", overwrite=True)
    assert result.manifest["config"]["levels"] == [8, 5] and result.report.passed
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json",
                                                                  "weights.safetensors"]


def test_parity_failures_are_raised_with_the_table(tmp_path, monkeypatch):
    """A graph that disagrees with PyTorch raises ExportParityError naming the graph (here the PyTorch side is
    perturbed after export)."""
    fsq = V.FSQ(levels=[5, 5], dim=4)
    export(fsq, tmp_path / "fsq")
    original = V.FSQ.decode
    monkeypatch.setattr(V.FSQ, "decode", lambda self, indices: original(self, indices) + 1e-3)
    with pytest.raises(ExportParityError, match="decoder"):
        verify(tmp_path / "fsq")


@pytest.mark.parametrize("make", [lambda: V.ResidualFSQ(dim=16, levels=[8, 5, 5], num_quantizers=2),
                                  lambda: V.LFQ(dim=16, codebook_size=2**8)])
def test_float16_bundles_report_their_agreement(make, tmp_path):
    from vqdeploy.runtime import Session

    torch.manual_seed(0)
    result = export(make(), tmp_path / "half", float16=True)
    manifest = result.manifest
    assert manifest["float16"] and manifest["encoder"]["input"]["dtype"] == "float16"
    report = result.report
    assert report.float16 and report.passed  # agreement is reported against float32 PyTorch, not required
    assert 0.9 <= report.min_indices_equal <= 1 and report.max_abs_error < 1e-2
    session = Session(tmp_path / "half", provider="cpu")
    indices = session.encode(np.random.randn(2, 7, 16).astype(np.float32))
    assert indices.shape[:2] == (2, 7) and session.decode(indices).shape == (2, 7, 16)
