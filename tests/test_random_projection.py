"""RandomProjectionQuantizer: BEST-RQ targets from frozen random projections and codebooks."""

import pytest
import torch
import torch.nn.functional as F

from vqdeploy import RandomProjectionQuantizer
from vqdeploy.primitives import l2norm

from helpers import CODEBOOK_SIZE, DIM, twin


def _rpq(**options):
    return RandomProjectionQuantizer(dim=DIM, codebook_size=CODEBOOK_SIZE, codebook_dim=8, **options)


@pytest.mark.parametrize("num_codebooks, index_shape", [(1, (2, 12)), (3, (2, 12, 3))])
def test_indices_are_nearest_codes_of_normalised_projections(num_codebooks, index_shape):
    rpq = _rpq(num_codebooks=num_codebooks)
    x = torch.randn(2, 12, DIM) * 5 + 3
    indices = rpq(x)
    assert indices.shape == index_shape and indices.dtype == torch.long
    normed = F.layer_norm(x, (DIM,))
    codebooks = rpq.vq._codebook.embed  # (num_codebooks, codebook_size, codebook_dim)
    for h in range(num_codebooks):
        projected = l2norm(normed @ rpq.rand_projs[h])
        expected = (projected @ codebooks[h].T).argmax(-1)
        assert torch.equal(indices if num_codebooks == 1 else indices[..., h], expected)
    assert torch.equal(rpq.encode(x), indices)


def test_nothing_trains():
    rpq = _rpq(num_codebooks=2).train()
    assert not any(p.requires_grad for p in rpq.parameters())
    before = twin(rpq)
    for _ in range(3):
        rpq(torch.randn(2, 12, DIM))
    assert not rpq.vq.training
    for key, value in rpq.state_dict().items():
        assert torch.equal(value, before.state_dict()[key]), key


def test_cross_entropy_against_given_indices():
    rpq = _rpq(num_codebooks=2)
    x = torch.randn(2, 12, DIM)
    indices = rpq(x)
    loss = rpq(x, indices=indices)
    assert loss.ndim == 0
    wrong = rpq(x, indices=(indices + 1) % CODEBOOK_SIZE)
    assert loss < wrong


def test_no_extra_projection_by_default():
    """The reference's inner VectorQuantize would add a (h * e) -> (h * h * e) projection."""
    rpq = RandomProjectionQuantizer(dim=512, codebook_size=1024, codebook_dim=256, num_codebooks=16)
    assert not rpq.has_reference_projection
    assert sum(p.numel() for p in rpq.parameters()) == 0
    assert rpq.vq._codebook.embed.shape == (16, 1024, 256)


def test_a_checkpoint_with_the_reference_projection_switches_shape_and_back():
    ours = _rpq(num_codebooks=2)
    reference_shaped = _rpq(num_codebooks=2)
    reference_shaped.vq = reference_shaped._make_vq(reference_projection=True)
    assert reference_shaped.has_reference_projection
    ours.load_state_dict(reference_shaped.state_dict(), strict=True)
    assert ours.has_reference_projection
    x = torch.randn(2, 12, DIM)
    assert torch.equal(ours(x), reference_shaped(x))
    ours.load_state_dict(_rpq(num_codebooks=2).state_dict(), strict=True)
    assert not ours.has_reference_projection


def test_bad_input():
    rpq = _rpq(num_codebooks=2)
    with pytest.raises(ValueError, match=rf"\(batch, n, {DIM}\)"):
        rpq(torch.randn(2, DIM))
    with pytest.raises(ValueError, match=rf"\(batch, n, {DIM}\)"):
        rpq(torch.randn(2, 12, DIM + 1))
    with pytest.raises(TypeError, match="floating-point"):
        rpq(torch.ones(2, 12, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match="indices must have shape"):
        rpq(torch.randn(2, 12, DIM), indices=torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        rpq(torch.randn(2, 12, DIM), indices=torch.zeros(2, 12, 2))
    with pytest.raises(TypeError, match="heads"):
        _rpq(heads=2)
    with pytest.raises(ValueError, match="num_codebooks"):
        _rpq(num_codebooks=0)
