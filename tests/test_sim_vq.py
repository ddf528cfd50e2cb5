"""SimVQ and ResidualSimVQ: codes through a learned transform of a frozen codebook (parity with 1.32.0 is in
test_parity_1_32.py, compile in test_compile_sim_hierarchical.py, export in test_export.py)."""

import copy

import pytest
import torch
from torch import nn

from vqdeploy import ResidualSimVQ, SimVQ
from vqdeploy.export.folding import fold_code_transforms

DIM, CODES = 8, 32


def test_tokens_take_the_nearest_transformed_code():
    torch.manual_seed(0)
    vq = SimVQ(dim=DIM, codebook_size=CODES, commitment_weight=0.5).eval()
    x = torch.randn(2, 20, DIM)
    quantized, indices, loss = vq(x)
    codebook = vq.code_transform(vq.frozen_codebook)
    torch.testing.assert_close(vq.codebook, codebook, rtol=0, atol=0)
    distances = torch.cdist(x.double().reshape(-1, DIM), codebook.double())
    assert torch.equal(indices.reshape(-1), distances.argmin(dim=-1))
    torch.testing.assert_close(quantized, codebook[indices])
    # both commitment terms have the same value: (1 + 0.25) x the mean squared distance, times the weight
    torch.testing.assert_close(loss, 0.5 * 1.25 * (x - codebook[indices]).pow(2).mean())
    assert torch.equal(vq.encode(x), indices) and torch.equal(vq.indices_to_codes(indices), codebook[indices])
    assert set(vq.state_dict()) == {"code_transform.weight", "frozen_codebook"}


def test_the_transform_learns_and_the_frozen_codebook_stays():
    torch.manual_seed(0)
    vq = SimVQ(dim=DIM, codebook_size=CODES, init_fn=lambda codes: codes * 2)
    frozen = vq.frozen_codebook.clone()
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.5)
    x = torch.randn(4, 16, DIM)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = vq(x).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and torch.equal(vq.frozen_codebook, frozen)
    assert [p for p in vq.parameters()] == [vq.code_transform.weight]


def test_straight_through_and_rotation_gradients():
    torch.manual_seed(0)
    straight = SimVQ(dim=DIM, codebook_size=CODES, rotation_trick=False, commitment_weight=0.0)
    x = torch.randn(2, 10, DIM, requires_grad=True)
    straight(x).quantized.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    rotated = SimVQ(dim=DIM, codebook_size=CODES, commitment_weight=0.0)
    x = torch.randn(2, 10, DIM, requires_grad=True)
    quantized = rotated(x).quantized
    torch.testing.assert_close(quantized, rotated.codebook[rotated.encode(x)])  # the code, in the forward pass
    quantized.sum().backward()
    assert not torch.allclose(x.grad, torch.ones_like(x))  # the gradient goes through the rotation


@pytest.mark.parametrize("channel_first, shape, index_shape", [
    (False, (2, 3, 4, DIM), (2, 3, 4)),
    (False, (2, DIM), (2,)),
    (True, (2, DIM, 3, 4), (2, 3, 4)),
    (True, (2, DIM, 5), (2, 5)),
])
def test_layouts(channel_first, shape, index_shape):
    vq = SimVQ(dim=DIM, codebook_size=CODES, channel_first=channel_first, codebook_transform=nn.Sequential(
        nn.Linear(DIM, 16), nn.SiLU(), nn.Linear(16, DIM))).eval()
    x = torch.randn(shape)
    quantized, indices, _ = vq(x)
    assert quantized.shape == shape and indices.shape == index_shape
    torch.testing.assert_close(vq.indices_to_codes(indices), quantized)
    folded = fold_code_transforms(copy.deepcopy(vq))  # what a bundle stores: the codes behind an identity layer
    assert torch.equal(folded.encode(x), indices) and torch.equal(folded.decode(indices), vq.decode(indices))


def test_residual_layers_quantize_what_is_left():
    torch.manual_seed(0)
    rvq = ResidualSimVQ(dim=DIM, num_quantizers=3, codebook_size=CODES).eval()
    x = torch.randn(2, 12, DIM)
    quantized, indices, losses = rvq(x)
    assert indices.shape == (2, 12, 3) and losses.shape == (3,)
    residual = x
    for i, layer in enumerate(rvq.layers):
        assert torch.equal(indices[..., i], layer.encode(residual))
        residual = residual - layer.codebook[indices[..., i]]
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized)
    assert rvq.codebooks.shape == (3, CODES, DIM)
    assert torch.equal(rvq(x, num_quantizers=2).indices, indices[..., :2])


def test_residual_dropout_masks_and_channel_first_codes():
    torch.manual_seed(0)
    rvq = ResidualSimVQ(dim=DIM, num_quantizers=3, codebook_size=CODES, quantize_dropout=True)
    x = torch.randn(2, 12, DIM)
    _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=3)
    kept = int((indices[0, 0] >= 0).sum())
    assert (indices[..., kept:] == -1).all() and (indices[..., :kept] >= 0).all() and 1 <= kept <= 3
    assert (losses[kept:] == 0).all() and (losses[:kept] > 0).all()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False
    padded = x.clone()
    padded[1, 6:] = 1e6  # padding must not reach the losses
    rvq.eval()
    assert torch.equal(rvq(padded, mask=mask).losses, rvq(x, mask=mask).losses)
    channel_first = ResidualSimVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, channel_first=True).eval()
    image = torch.randn(2, DIM, 3, 4)
    quantized, indices, _, all_codes = channel_first(image, return_all_codes=True)
    assert quantized.shape == image.shape and indices.shape == (2, 3, 4, 2) and all_codes.shape == (2, 2, DIM, 3, 4)
    torch.testing.assert_close(channel_first.get_output_from_indices(indices), quantized)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="codebook_size"):
        SimVQ(dim=DIM, codebook_size=0)
    with pytest.raises(TypeError, match="codebook_transform"):
        SimVQ(dim=DIM, codebook_size=CODES, codebook_transform=lambda codes: codes)
    with pytest.raises(ValueError, match="heads"):
        ResidualSimVQ(dim=DIM, num_quantizers=2, codebook_size=CODES, heads=2)
    vq = SimVQ(dim=DIM, codebook_size=CODES)
    with pytest.raises(ValueError, match=f"expected {DIM} features"):
        vq(torch.randn(2, 5, DIM + 1))
    with pytest.raises(TypeError, match="floating-point"):
        vq(torch.zeros(2, 5, DIM, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 31\]"):
        vq.indices_to_codes(torch.tensor([[CODES]]))
