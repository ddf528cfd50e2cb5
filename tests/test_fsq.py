"""FSQ: the implicit grid, index arithmetic, layouts, dtypes and errors."""

import pytest
import torch

from vqdeploy import FSQ, GroupedResidualFSQ, ResidualFSQ


def test_codes_lie_on_the_grid_and_indices_round_trip():
    fsq = FSQ(levels=[8, 5, 5, 3])
    assert fsq.codebook_size == 8 * 5 * 5 * 3 and fsq.implicit_codebook.shape == (600, 4)
    x = torch.randn(2, 50, 4) * 4
    quantized, indices = fsq(x)
    assert indices.dtype == torch.int32 and indices.min() >= 0 and indices.max() < 600
    grid = fsq.implicit_codebook
    assert torch.equal(quantized, grid[indices.long()])  # every output is a grid point
    assert torch.equal(fsq.codes_to_indices(grid), torch.arange(600, dtype=torch.int32))
    torch.testing.assert_close(fsq.indices_to_codes(indices), quantized, atol=0, rtol=0)
    assert torch.equal(fsq.decode(fsq.encode(x)), quantized)


@pytest.mark.parametrize("level", [2, 3, 4, 5, 8])
def test_each_channel_takes_exactly_level_values(level):
    fsq = FSQ(levels=[level], defaults="1.14.17")  # 1.32.0 asks for preserve_symmetry with a level of 2
    values = fsq(torch.linspace(-20, 20, 2001).reshape(1, -1, 1))[0].unique()
    assert len(values) == level
    half_width = level // 2
    torch.testing.assert_close(values, (torch.arange(level) - half_width) / half_width)


@pytest.mark.parametrize("level", [2, 3, 4, 5])
def test_the_symmetric_bound_takes_evenly_spaced_levels(level):
    """preserve_symmetry: levels -1 + 2k / (level - 1), symmetric about 0 (Stable Codec), also for 2 levels."""
    fsq = FSQ(levels=[level], preserve_symmetry=True)
    values = fsq(torch.linspace(-20, 20, 2001).reshape(1, -1, 1))[0].unique()
    torch.testing.assert_close(values, -1 + 2 * torch.arange(level) / (level - 1))
    assert torch.equal(fsq.codes_to_indices(fsq.implicit_codebook), torch.arange(level, dtype=torch.int32))
    hard = FSQ(levels=[level], preserve_symmetry=True, bound_hard_clamp=True)
    x = torch.linspace(-0.99, 0.99, 101).reshape(1, -1, 1)  # a clamp, not a tanh: the level of x itself
    expected = torch.floor((level - 1) * (x + 1) / 2 + 0.5)
    torch.testing.assert_close(hard(x)[0], -1 + 2 * expected / (level - 1))


def test_levels_of_2_need_the_symmetric_bound_under_1_32_0():
    with pytest.raises(ValueError, match="preserve_symmetry"):
        FSQ(levels=[2, 5])
    assert FSQ(levels=[2, 5], defaults="1.14.17").codebook_size == 10
    with pytest.raises(ValueError, match="noise_dropout needs preserve_symmetry"):
        FSQ(levels=[5, 5], noise_dropout=0.1)


def test_noise_dropout_moves_a_fraction_of_values_in_training_only():
    torch.manual_seed(0)
    fsq = FSQ(levels=[5, 5, 5], preserve_symmetry=True, noise_dropout=0.25)
    x = torch.randn(4, 500, 3)
    fsq.eval()
    clean, indices = fsq(x)
    fsq.train()
    noisy, train_indices = fsq(x)
    assert torch.equal(train_indices, indices)  # indices come before the noise
    moved = (noisy != clean).float().mean()
    assert 0.2 < float(moved) < 0.3 and noisy.abs().max() <= 1.0
    assert ((noisy - clean).abs() <= 0.5 + 1e-6).all()


def test_orthogonal_rotation_round_trips_and_indices_can_be_left_out():
    torch.manual_seed(0)
    fsq = FSQ(levels=[5, 5, 5], orthogonal_rotation=True).eval()
    rotation = fsq.orthogonal_rot
    torch.testing.assert_close(rotation @ rotation.t(), torch.eye(3), atol=1e-6, rtol=0)
    x = torch.randn(2, 20, 3)
    quantized, indices = fsq(x)
    torch.testing.assert_close(fsq.indices_to_codes(indices), quantized)
    torch.testing.assert_close(quantized @ rotation, fsq.implicit_codebook[indices.long()])  # grid codes, rotated
    assert "orthogonal_rot" in fsq.state_dict()
    no_indices = FSQ(levels=[5, 5, 5], return_indices=False)
    out, none = no_indices(x)
    assert none is None and torch.equal(no_indices.encode(x), FSQ(levels=[5, 5, 5]).encode(x))


def test_quantization_in_half_precision_when_not_forced():
    fsq = FSQ(levels=[8, 5, 5], force_quantization_f32=False, allowed_dtypes=(torch.float16,))
    x = torch.randn(2, 10, 3).half()
    assert fsq(x)[0].dtype == torch.float16
    assert torch.equal(fsq(x)[1], FSQ(levels=[8, 5, 5])(x)[1])  # these levels are exact in half


def test_straight_through_gradient_of_the_bound():
    fsq = FSQ(levels=[8, 5])
    x = torch.randn(2, 10, 2, requires_grad=True)
    fsq(x)[0].sum().backward()
    expected = torch.func.grad(lambda z: (fsq.bound(z) / (fsq._levels // 2)).sum())(x.detach())
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("options, shape, index_shape", [
    (dict(levels=[8, 5, 5]), (2, 7, 3), (2, 7)),
    (dict(levels=[8, 5, 5], dim=12), (2, 7, 12), (2, 7)),
    (dict(levels=[4, 4], num_codebooks=3), (2, 7, 6), (2, 7, 3)),
    (dict(levels=[8, 5, 5], channel_first=True), (2, 3, 7), (2, 7)),
    (dict(levels=[8, 5, 5], dim=16), (2, 16, 4, 5), (2, 4, 5)),
    (dict(levels=[5, 5], num_codebooks=2), (2, 4, 2, 3, 4), (2, 2, 3, 4, 2)),
])
def test_layouts(options, shape, index_shape):
    fsq = FSQ(**options)
    x = torch.randn(shape)
    quantized, indices = fsq(x)
    assert quantized.shape == x.shape and indices.shape == index_shape
    torch.testing.assert_close(fsq.indices_to_codes(indices), quantized, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("dim", [None, 6])
def test_other_dtypes_are_quantized_in_an_allowed_one_and_cast_back(dtype, dim):
    fsq = FSQ(levels=[8, 5, 5], dim=dim)
    x = torch.randn(2, 7, fsq.dim)
    quantized, indices = fsq(x.to(dtype))
    assert quantized.dtype == dtype
    expected = FSQ(levels=[8, 5, 5], dim=dim)
    expected.load_state_dict(fsq.state_dict())
    assert torch.equal(indices, expected(x.to(dtype).to(torch.float64 if dtype == torch.float64 else torch.float32))[1])


def test_checkpoints_hold_only_the_projections():
    assert FSQ(levels=[8, 5, 5]).state_dict() == {}
    assert set(FSQ(levels=[8, 5, 5], dim=8).state_dict()) == {"project_in.weight", "project_in.bias",
                                                               "project_out.weight", "project_out.bias"}
    assert set(FSQ(levels=[8, 5, 5], dim=8, projection_has_bias=False).state_dict()) == {"project_in.weight",
                                                                                       "project_out.weight"}


@pytest.mark.parametrize("levels", [[8, 1], [8, 2.5], [], "855", [True, 3], [8] * 11])  # 2^33 codes: not int32
def test_bad_levels(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels=levels)


def test_bad_calls():
    fsq = FSQ(levels=[8, 5, 5], num_codebooks=2)
    with pytest.raises(ValueError, match="expected 6 features"):
        fsq(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match="batch, n"):
        fsq(torch.randn(2, 6))
    with pytest.raises(TypeError, match="floating-point"):
        fsq(torch.ones(2, 7, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"lie in \[0, 199\]"):
        fsq.indices_to_codes(torch.full((2, 7, 2), 200))
    with pytest.raises(ValueError, match="codebook axis of size 2"):
        fsq.indices_to_codes(torch.zeros(2, 7, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        fsq.indices_to_codes(torch.zeros(2, 7, 2))
    with pytest.raises(ValueError, match="3 channels"):
        fsq.codes_to_indices(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="keep_num_codebooks_dim"):
        FSQ(levels=[8, 5], num_codebooks=2, keep_num_codebooks_dim=False)


# ---------------------------------------------------------------------------------------------- residual FSQ

def _rfsq(**options):
    return ResidualFSQ(dim=options.pop("dim", 8), levels=[8, 5, 5, 5], num_quantizers=options.pop("num_quantizers", 3),
                       **options)


@pytest.mark.parametrize("defaults, base", [("1.32.0", [8.0, 5, 5, 5]), ("1.14.17", [7.0, 4, 4, 4])])
def test_residual_fsq_refines_on_finer_grids(defaults, base):
    """Layer i quantizes the residual divided by levels ** -i (1.32.0) or (levels - 1) ** -i (1.14.17), so each
    layer brings the sum closer to the clamped (or bounded) input."""
    rfsq = _rfsq(defaults=defaults).eval()
    x = torch.randn(2, 30, 8)
    quantized, indices, all_codes = rfsq(x, return_all_codes=True)
    assert indices.shape == (2, 30, 3) and indices.dtype == torch.int32 and all_codes.shape == (3, 2, 30, 4)
    torch.testing.assert_close(rfsq.get_output_from_indices(indices), quantized, atol=1e-6, rtol=0)
    assert torch.equal(rfsq.encode(x), indices)
    torch.testing.assert_close(rfsq.decode(indices), quantized, atol=1e-6, rtol=0)
    torch.testing.assert_close(rfsq.scales[2], torch.tensor(base) ** -2)
    assert all(layer.preserve_symmetry == (defaults == "1.32.0") for layer in rfsq.layers)
    unprojected = _rfsq(dim=4, defaults=defaults).eval()
    x = torch.randn(2, 30, 4)
    target, indices = unprojected.start_residual(x), unprojected.encode(x)
    errors = [(target - unprojected.decode(indices[..., :k], num_quantizers=k)).abs().max() for k in (1, 2, 3)]
    assert errors[0] > errors[1] > errors[2]


def test_residual_fsq_clamps_and_channel_first():
    """1.32.0: the input is tanh-clamped at 1 + 1 / (levels - 1) before hard-clamped layers, or at
    ``soft_clamp_input_value`` with ``bound_hard_clamp=False``; ``is_channel_first`` takes (b, dim, *spatial)
    and returns indices (b, q, *spatial)."""
    rfsq = _rfsq(dim=4)
    torch.testing.assert_close(rfsq.soft_clamp_input_value, 1 + 1 / torch.tensor([7.0, 4, 4, 4]))
    assert all(layer.bound_hard_clamp for layer in rfsq.layers)
    soft = _rfsq(dim=4, bound_hard_clamp=False, soft_clamp_input_value=[2.0, 3, 3, 3])
    assert not any(layer.bound_hard_clamp for layer in soft.layers)
    assert _rfsq(dim=4, bound_hard_clamp=False).soft_clamp_input_value is None
    channel_first = _rfsq(is_channel_first=True).eval()
    image = torch.randn(2, 8, 3, 5)
    assert channel_first(image).indices.shape == (2, 3, 3, 5)
    x = torch.randn(2, 8, 15)
    quantized, indices = channel_first(x)
    assert quantized.shape == x.shape and indices.shape == (2, 3, 15)
    last = _rfsq().eval()
    last.load_state_dict(channel_first.state_dict())
    quantized_last, indices_last = last(x.movedim(1, -1))
    assert torch.equal(indices_last, indices.movedim(1, -1))
    torch.testing.assert_close(quantized_last, quantized.movedim(1, -1))
    torch.testing.assert_close(channel_first.get_output_from_indices(indices.movedim(1, -1)), quantized_last)


def test_residual_fsq_dropout_and_bandwidth():
    rfsq = _rfsq(num_quantizers=4, quantize_dropout=True, quantize_dropout_cutoff_index=1)
    depths = set()
    for _ in range(16):
        indices = rfsq(torch.randn(2, 30, 8)).indices
        depth = int((indices[0, 0] >= 0).sum())
        assert torch.all(indices[..., depth:] == -1) and torch.all(indices[..., :depth] >= 0)
        depths.add(depth)
    assert depths == {2, 3, 4}
    rfsq.eval()
    x = torch.randn(2, 30, 8)
    small = _rfsq(num_quantizers=2)
    small.load_state_dict(rfsq.state_dict())
    quantized, indices = rfsq(x, num_quantizers=2)
    assert torch.equal(indices, small.eval()(x).indices)
    torch.testing.assert_close(quantized, small(x).quantized, atol=0, rtol=0)


@pytest.mark.parametrize("options, shape, index_shape", [
    (dict(accept_image_fmap=True), (2, 8, 3, 4), (2, 3, 4, 3)),
    (dict(channel_last=False), (2, 8, 12), (2, 12, 3)),
    (dict(dim=4), (5, 4), (5, 3)),
])
def test_residual_fsq_layouts(options, shape, index_shape):
    rfsq = _rfsq(**options).eval()
    x = torch.randn(shape)
    quantized, indices = rfsq(x)
    assert quantized.shape == x.shape and indices.shape == index_shape
    torch.testing.assert_close(rfsq.decode(indices), quantized, atol=1e-6, rtol=0)


def test_grouped_residual_fsq():
    grouped = GroupedResidualFSQ(dim=16, groups=2, levels=[8, 5, 5, 5], num_quantizers=3, quantize_dropout=True)
    x = torch.randn(2, 30, 16)
    for _ in range(4):
        indices = grouped(x).indices
        assert indices.shape == (2, 2, 30, 3) and torch.equal(indices[0] == -1, indices[1] == -1)
    grouped.eval()
    quantized, indices, all_codes = grouped(x, return_all_codes=True)
    assert isinstance(all_codes, tuple) and all_codes[0].shape == (3, 2, 30, 4)
    for rfsq, chunk, part, group in zip(grouped.rvqs, x.chunk(2, -1), quantized.chunk(2, -1), indices):
        assert torch.equal(rfsq(chunk).indices, group)
        torch.testing.assert_close(rfsq(chunk).quantized, part, atol=0, rtol=0)
    torch.testing.assert_close(grouped.get_output_from_indices(indices), quantized, atol=1e-6, rtol=0)
    assert grouped.codebooks.shape == (2, 3, 1000, 4)


def test_residual_fsq_bad_arguments_of_the_1_32_scheme():
    with pytest.raises(ValueError, match="soft_clamp_input_value needs bound_hard_clamp=False"):
        _rfsq(soft_clamp_input_value=2.0)
    with pytest.raises(ValueError, match="one per channel"):
        _rfsq(bound_hard_clamp=False, soft_clamp_input_value=[2.0, 3.0])
    with pytest.raises(ValueError, match="> 0"):
        _rfsq(bound_hard_clamp=False, soft_clamp_input_value=0.0)
    with pytest.raises(TypeError, match="preserve_symmetry"):
        _rfsq(preserve_symmetry=False)
    with pytest.raises(ValueError, match="1.14.17"):
        _rfsq(bound_hard_clamp=True, defaults="1.14.17")
    with pytest.raises(ValueError, match="before 1.26.0"):
        _rfsq(bound_input_once=False)


def test_residual_fsq_bad_input():
    with pytest.raises(ValueError, match="levels"):
        ResidualFSQ(dim=8, levels=[8, 1], num_quantizers=2)
    with pytest.raises(ValueError, match="num_codebooks"):
        ResidualFSQ(dim=8, levels=[8, 5], num_quantizers=2, num_codebooks=2)
    with pytest.raises(ValueError, match="divide"):
        GroupedResidualFSQ(dim=9, groups=2, levels=[8, 5], num_quantizers=2)
    rfsq = _rfsq().eval()
    with pytest.raises(ValueError, match=r"num_quantizers must be an int in \[1, 3\]"):
        rfsq(torch.randn(2, 30, 8), num_quantizers=4)
    with pytest.raises(ValueError, match="one column per quantizer"):
        rfsq.get_output_from_indices(torch.zeros(2, 30, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lie in \[-1, 999\]"):
        rfsq.get_output_from_indices(torch.full((2, 30, 3), 1000))
