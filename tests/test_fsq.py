"""FSQ: the implicit grid, index arithmetic, layouts, dtypes and errors."""

import pytest
import torch

from vqdeploy import FSQ


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
    fsq = FSQ(levels=[level])
    values = fsq(torch.linspace(-20, 20, 2001).reshape(1, -1, 1))[0].unique()
    assert len(values) == level
    half_width = level // 2
    torch.testing.assert_close(values, (torch.arange(level) - half_width) / half_width)


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


@pytest.mark.parametrize("levels", [[8, 1], [8, 2.5], [], "855", [True, 3]])
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
