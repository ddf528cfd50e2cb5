"""Export verification tells near-ties from real disagreements (vqdeploy/export/ties.py).

Models and inputs built to sit tokens on decision boundaries (FSQ rounding, ResidualFSQ at depth 4, VQ with
codes duplicated to within an ulp, LFQ whose sign inputs are zero) export, and verifying them reports their
near-ties; a deliberately wrong encoder still fails; a trained ResidualFSQ / GroupedResidualFSQ of realistic
size exports with its default call.  The classifier is also checked without onnxruntime, family by family:
the other side of a boundary is a near-tie, any other index is real."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import vqdeploy as V
from vqdeploy.export import ExportParityError, export, verify
from vqdeploy.export.bundle import MANIFEST, write_manifest
from vqdeploy.export.ties import compare_indices


def _inverse_bound(fsq: V.FSQ, bounded: torch.Tensor) -> torch.Tensor:
    """The input whose FSQ bound is ``bounded`` (float64, with the float32 constants the graphs hold)."""
    offset = torch.where(fsq._levels % 2 == 0, 0.5, 0.0)
    shift = (offset / fsq.bound_scale()).atanh().double()
    return torch.atanh((bounded + offset.double()) / fsq.bound_scale().double()) - shift


def _fsq_boundary_inputs(fsq: V.FSQ, tokens: int) -> torch.Tensor:
    """Inputs whose bounded values lie on rounding boundaries (k + 0.5), give or take a few float32 ulps."""
    levels = fsq._levels
    k = -(levels // 2) + (torch.rand(tokens, len(fsq.levels), dtype=torch.float64) * (levels - 1)).long()
    x = _inverse_bound(fsq, k + 0.5).float()
    for step in torch.randint(-3, 4, (3,)).tolist():  # a few ulps either way, so both sides are hit
        x = torch.where(torch.rand(x.shape) < 0.5, torch.nextafter(x, torch.full_like(x, float(step))), x)
    return x


def _residual_fsq_boundary_inputs(rfsq: V.ResidualFSQ, tokens: int, layer: int) -> torch.Tensor:
    """Inputs whose value at ``layer`` lies on a rounding boundary, found in float64 by moving the first
    residual so that the layers before keep their codes: 1.14.17's scheme (the input bounded once, tanh-bounded
    layers) or 1.32.0's (a tanh clamp of the input, symmetric hard-clamped layers)."""
    rfsq64 = copy.deepcopy(rfsq).double()
    x = torch.randn(tokens, rfsq.dim, dtype=torch.float64) * 0.5
    first = residual = rfsq64.start_residual(x)
    for i in range(layer):
        quantized, _ = rfsq64.layers[i].encode_tokens((residual / rfsq64.layer_scale(i)).unsqueeze(0))
        residual = residual - quantized[0] * rfsq64.layer_scale(i)
    scale, fsq = rfsq64.layer_scale(layer), rfsq64.layers[layer]
    if rfsq.bounds_input_once:
        on_boundary = scale * _inverse_bound(fsq, fsq.bound(residual / scale).floor() + 0.5)
        moved = _inverse_bound(rfsq64.layers[0], first + on_boundary - residual)
    else:  # position (levels - 1) * (z + 1) / 2 rounds half up: boundaries at k + 0.5
        steps = fsq._levels.double() - 1
        position = steps * ((residual / scale).clamp(-1, 1) + 1) / 2
        boundary = torch.minimum(position.floor() + 0.5, steps - 0.5)
        on_boundary = scale * (2 * boundary / steps - 1)
        clamp = rfsq64.soft_clamp_input_value
        moved = clamp * torch.atanh((first + on_boundary - residual) / clamp)
    return moved[torch.isfinite(moved).all(dim=-1)].float()


def _assert_near_ties_only(report) -> None:
    assert report.passed, report.table()
    assert report.near_ties > 0, report.table()
    assert all(c.agreement.real == 0 for c in report.checks if c.agreement is not None)


def test_fsq_tokens_on_rounding_boundaries_are_near_ties(tmp_path):
    torch.manual_seed(0)
    fsq = V.FSQ(levels=[8, 5, 6, 5])
    assert export(fsq, tmp_path / "fsq").report.passed
    report = verify(tmp_path / "fsq", inputs=_fsq_boundary_inputs(fsq, 4096).reshape(2, 2048, 4))
    _assert_near_ties_only(report)
    assert "near-tie" in report.table()


@pytest.mark.parametrize("defaults", ["1.32.0", "1.14.17"])
def test_residual_fsq_boundary_at_depth_4_is_a_near_tie(tmp_path, defaults):
    torch.manual_seed(0)
    rfsq = V.ResidualFSQ(dim=4, levels=[8, 5, 5, 5], num_quantizers=4, defaults=defaults)
    assert export(rfsq, tmp_path / "rfsq").report.passed
    inputs = _residual_fsq_boundary_inputs(rfsq, 32768, layer=3)[:4096]
    _assert_near_ties_only(verify(tmp_path / "rfsq", inputs=inputs.reshape(2, -1, 4)))


def test_vq_codes_duplicated_within_an_ulp_are_near_ties(tmp_path):
    torch.manual_seed(0)
    vq = V.VectorQuantize(dim=64, codebook_size=256)
    half = vq.codebook[:128].clone()
    vq.codebook = torch.cat([half, torch.nextafter(half, torch.full_like(half, 1.0))])
    assert export(vq, tmp_path / "vq").report.passed
    inputs = half[torch.randint(0, 128, (4096,))] + 0.01 * torch.randn(4096, 64)
    _assert_near_ties_only(verify(tmp_path / "vq", inputs=inputs.reshape(2, 2048, 64)))


def test_lfq_sign_inputs_of_zero_are_near_ties(tmp_path):
    """Inputs in the null space of project_in: every sign input is zero up to float32 rounding."""
    torch.manual_seed(0)
    lfq = V.LFQ(dim=16, codebook_size=2**8)
    with torch.no_grad():
        lfq.project_in.bias.zero_()
    assert export(lfq, tmp_path / "lfq").report.passed
    null_space = torch.linalg.svd(lfq.project_in.weight.double()).Vh[8:]
    inputs = (torch.randn(4096, 8, dtype=torch.float64) @ null_space).float()
    _assert_near_ties_only(verify(tmp_path / "lfq", inputs=inputs.reshape(2, 2048, 16)))


def _perturb_largest_initializer(bundle, relative: float) -> None:
    """Write the encoder graph back with its largest float constant (the codebook, or a projection) perturbed by
    ``relative`` of its spread, and re-hash the bundle, as a broken exporter or a bad edit would."""
    path = bundle / "encoder.onnx"
    model = onnx.load(str(path))
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    largest = max(floats, key=lambda i: int(np.prod(i.dims)))
    values = numpy_helper.to_array(largest).copy()
    noise = np.random.default_rng(0).standard_normal(values.shape)
    largest.CopyFrom(numpy_helper.from_array((values + relative * values.std() * noise).astype(np.float32),
                                             largest.name))
    onnx.save(model, str(path))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = list(manifest["files"])
    write_manifest(bundle, manifest)


@pytest.mark.parametrize("make, dim", [(lambda: V.VectorQuantize(dim=64, codebook_size=512), 64),
                                       (lambda: V.ResidualVQ(dim=64, codebook_size=256, num_quantizers=4), 64),
                                       (lambda: V.ResidualFSQ(dim=32, levels=[8, 5, 5, 5], num_quantizers=4), 32)])
def test_a_deliberately_wrong_encoder_still_fails(make, dim, tmp_path):
    torch.manual_seed(0)
    export(make(), tmp_path / "bundle", example=torch.randn(2, 2000, dim))
    _perturb_largest_initializer(tmp_path / "bundle", relative=1e-3)
    V.load(tmp_path / "bundle")  # the hashes match: only the parity check can tell
    with pytest.raises(ExportParityError, match="real disagreement"):
        verify(tmp_path / "bundle")


@pytest.mark.parametrize("grouped", [False, True])
def test_trained_residual_fsq_of_realistic_size_exports_with_its_default_call(grouped, tmp_path):
    """Levels [8, 5, 5, 5], 4 quantizers, projections trained on a reconstruction loss; the export checks
    72,000 tokens (batch 3 x 16,000 and 1 x 24,000) against onnxruntime."""
    torch.manual_seed(0)
    options = dict(dim=32, levels=[8, 5, 5, 5], num_quantizers=4, quantize_dropout=True)
    rfsq = V.GroupedResidualFSQ(groups=1, **options) if grouped else V.ResidualFSQ(**options)
    optimizer = torch.optim.Adam(rfsq.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(8, 256, 32)
        loss = (rfsq(x).quantized - x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report = export(rfsq, tmp_path / "rfsq", example=torch.randn(2, 8000, 32)).report
    assert report.passed and sum(c.agreement.tokens for c in report.checks if c.agreement) == 72000


def test_random_residual_fsq_disagreements_are_all_near_ties(tmp_path):
    """onnxruntime's Tanh differs from torch.tanh by a few ulp on most inputs: on 262,144 random tokens a few
    round the other way at some layer, and every one of them is a near-tie there."""
    torch.manual_seed(0)
    rfsq = V.ResidualFSQ(dim=4, levels=[8, 5, 5, 5], num_quantizers=4)
    export(rfsq, tmp_path / "rfsq", verify=False)
    report = verify(tmp_path / "rfsq", inputs=torch.randn(64, 4096, 4) * 0.5)
    agreement = report.checks[0].agreement
    assert report.passed and agreement.real == 0 and agreement.identical >= 0.999 * agreement.tokens


# ----------------------------------------------------------------------------- the classifier alone

CLASSIFIER_CASES = {
    "vq_heads_layernorm": lambda: V.VectorQuantize(dim=16, codebook_size=32, heads=2, separate_codebook_per_head=True,
                                                   layernorm_after_project_in=True),
    "vq_cosine_image": lambda: V.VectorQuantize(dim=8, codebook_size=32, use_cosine_sim=True, accept_image_fmap=True),
    "rvq_projection": lambda: V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, codebook_dim=8),
    "grouped_rvq": lambda: V.GroupedResidualVQ(dim=16, groups=2, codebook_size=32, num_quantizers=2),
    "random_projection": lambda: V.RandomProjectionQuantizer(dim=16, codebook_size=32, codebook_dim=8,
                                                             num_codebooks=2),
    "fsq_codebooks": lambda: V.FSQ(levels=[8, 5, 5], num_codebooks=2, dim=16),
    "fsq_symmetric_rotation": lambda: V.FSQ(levels=[4, 4, 4], dim=16, preserve_symmetry=True, orthogonal_rotation=True),
    "grouped_rfsq": lambda: V.GroupedResidualFSQ(dim=16, groups=2, levels=[8, 5, 5], num_quantizers=3),
    "residual_lfq": lambda: V.ResidualLFQ(dim=16, codebook_size=2**6, num_quantizers=3),
    "latent": lambda: V.LatentQuantize(levels=[5, 4, 8], dim=16),
    "rvq_beam_search": lambda: V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=3, beam_size=1, eval_beam_size=4),
    "simvq": lambda: V.SimVQ(dim=16, codebook_size=32),
    "hierarchical": lambda: V.HierarchicalVQ(dim=16, codebook_size=32, scales=[1, 1, 2, 4, 8, 16, 32],  # 64 tokens
                                             kmeans_init=False),  # (k-means would start all codes at zero)
}


@pytest.mark.parametrize("name", list(CLASSIFIER_CASES))
def test_other_indices_are_real_disagreements(name):
    """Indices changed at random (a wrong graph) are real; unchanged ones identical, whatever the family."""
    torch.manual_seed(0)
    quantizer = CLASSIFIER_CASES[name]().eval()
    channel_first = name in ("hierarchical", "latent")  # (1.32.0's LatentQuantize reads (b, dim, n))
    x = torch.randn(2, 8, 8, 8) if name == "vq_cosine_image" else torch.randn(2, 16, 64) if channel_first \
        else torch.randn(2, 64, 16)
    expected = getattr(quantizer, "export_encode", quantizer.encode)(x).long()  # one tensor of indices
    same = compare_indices(quantizer, x, expected, expected.clone())
    assert same.identical == same.tokens == 128 and same.real == 0
    wrong = (expected + torch.randint(1, 4, expected.shape)) % quantizer.codebook_size
    agreement = compare_indices(quantizer, x, expected, wrong)
    assert agreement.identical == 0 and agreement.real >= 0.95 * agreement.tokens, agreement
    garbage = torch.where(torch.rand(expected.shape) < 0.5, -2**31, expected + quantizer.codebook_size)
    assert compare_indices(quantizer, x, expected, garbage).real == 128  # indices of no code are real


def test_the_other_side_of_a_boundary_is_a_near_tie():
    """Inputs on a boundary: the other choice is a near-tie for each decision kind, and wrapped networks widen
    the tolerance to their tokens' size (a sign input that is small next to its token's other features)."""
    torch.manual_seed(0)
    vq = V.VectorQuantize(dim=16, codebook_size=2).eval()
    midpoints = (vq.codebook[0] + vq.codebook[1]) / 2 + 1e-9 * torch.randn(2, 32, 16)
    expected = vq.encode(midpoints)
    assert compare_indices(vq, midpoints, expected, 1 - expected).near_ties == 64

    lfq = V.LFQ(dim=4).eval()
    x = torch.randn(2, 32, 4)
    x[..., 0] = 1e-3 * torch.randn(2, 32)  # one small sign input per token
    expected = lfq.encode(x)
    flipped = expected ^ 8  # the first channel is the most significant bit
    assert compare_indices(lfq, x, expected, flipped).real == 64  # exact inputs: a real disagreement
    assert compare_indices(lfq, x, expected, flipped, wrapped=True).real == 64  # 1e-3 is no rounding
    x[..., 0] = 1e-7 * torch.randn(2, 32)
    expected = lfq.encode(x)
    assert compare_indices(lfq, x, expected, expected ^ 8, wrapped=True).near_ties == 64

    lq = V.LatentQuantize(levels=[5, 5], dim=2).eval()
    table = lq.value_table().detach()
    x = ((table[:, 1] + table[:, 2]) / 2).expand(2, 32, 2).transpose(1, 2).contiguous()  # (b, dim, n)
    expected = lq.encode(x)
    digits = lq.indices_to_level_indices(expected)
    other = lq.level_indices_to_indices(torch.where(digits == 1, 2, 1)).long()
    assert compare_indices(lq, x, expected, other).near_ties == 64


def test_symmetric_fsq_boundaries_are_near_ties():
    """preserve_symmetry floors (levels - 1)(tanh z + 1) / 2 + 0.5: inputs on its boundaries, either level."""
    fsq = V.FSQ(levels=[4], preserve_symmetry=True).eval()
    k = torch.randint(0, 3, (2, 64, 1)).double()
    x = torch.atanh(2 * (k + 0.5) / 3 - 1).float()
    expected = fsq.encode(x)
    other = torch.where(expected == k[..., 0].long(), expected + 1, expected - 1)
    agreement = compare_indices(fsq, x, expected, other)
    assert agreement.near_ties == 128 and agreement.real == 0
    assert compare_indices(fsq, x, expected, (expected + 2) % 4).real == 128  # two levels away: real


def test_beam_paths_of_equal_score_are_near_ties():
    """A beam search encoder: a path through a duplicated code scores the same, so it is a near-tie."""
    torch.manual_seed(0)
    rvq = V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=2, beam_size=1, eval_beam_size=3).eval()
    with torch.no_grad():
        rvq.layers[1]._codebook.embed[0, 1] = rvq.layers[1]._codebook.embed[0, 0]
    x = torch.randn(2, 200, 16)
    expected = rvq.encode(x)
    on_duplicate = (expected[..., 1] == 0) | (expected[..., 1] == 1)
    assert on_duplicate.any()
    swapped = expected.clone()
    swapped[..., 1] = torch.where(on_duplicate, 1 - expected[..., 1], expected[..., 1])
    agreement = compare_indices(rvq, x, expected, swapped)
    assert agreement.near_ties == int(on_duplicate.sum()) and agreement.real == 0


def test_hierarchical_codes_of_equal_distance_are_near_ties():
    """HierarchicalVQ with two identical codes: choosing the other one at any level is a near-tie."""
    torch.manual_seed(0)
    hvq = V.HierarchicalVQ(dim=8, codebook_size=2, scales=[1, 2, 4], kmeans_init=False).eval()
    with torch.no_grad():
        hvq.vq._codebook.embed[0, 1] = hvq.vq._codebook.embed[0, 0]
    x = torch.randn(3, 8, 4)
    expected = hvq.export_encode(x)
    agreement = compare_indices(hvq, x, expected, 1 - expected)
    assert agreement.near_ties == expected.numel() and agreement.real == 0


def test_wrapped_encoders_pass_on_near_ties_only(tmp_path):
    """A conv network inside the encoder graph: the check passes, with its near-ties counted per shape."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv1d(1, 32, 7, stride=2, padding=3), nn.ELU(), nn.Conv1d(32, 16, 3, padding=1))
    quantizer = V.ResidualFSQ(dim=16, levels=[8, 5, 5, 5], num_quantizers=4, channel_last=False)
    report = export(quantizer, tmp_path / "codec", encoder=encoder, example=torch.randn(2, 1, 8192)).report
    assert report.passed and all(c.agreement.real == 0 for c in report.checks if c.agreement)
    assert verify(tmp_path / "codec", encoder=encoder, inputs=torch.randn(8, 1, 16384)).passed
