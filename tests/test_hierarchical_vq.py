"""HierarchicalVQ: multi-scale residual quantization over fixed levels (parity with 1.32.0 in
test_parity_1_32.py, compile in test_compile_residual.py, export in test_export.py)."""

import pytest
import torch

from vqdeploy import HierarchicalVQ

DIM = 8


def _hvq(**options):
    options = dict(dict(dim=DIM, codebook_size=16, scales=[1, 2, 4, 8], kmeans_init=False), **options)
    return HierarchicalVQ(**options)


def test_levels_quantize_the_pooled_residual_coarse_to_fine():
    torch.manual_seed(0)
    hvq = _hvq().eval()
    x = torch.randn(2, DIM, 8)
    reconstruction, indices, loss = hvq(x)
    assert [tuple(level.shape) for level in indices] == [(2, 1), (2, 2), (2, 4), (2, 8)] and loss.shape == ()
    coarsest = x.mean(dim=-1)  # level 0: the nearest code of the global mean
    assert torch.equal(indices[0][:, 0], torch.cdist(coarsest, hvq.vq.codebook).argmin(dim=-1))
    torch.testing.assert_close(hvq.get_output_from_indices(indices), reconstruction)
    assert all(torch.equal(a, b) for a, b in zip(hvq.encode(x), indices))
    tokens = hvq.flatten_indices(indices)
    assert tokens.shape == (2, 15) and all(torch.equal(a, b) for a, b in zip(hvq.split_indices(tokens), indices))
    torch.testing.assert_close(hvq.export_decode(hvq.export_encode(x)), reconstruction)


def test_nested_dropout_keeps_the_levels_up_to_a_drawn_cutoff():
    torch.manual_seed(0)
    hvq = _hvq(nested_dropout=1.0, nested_dropout_min_levels=2, threshold_ema_dead_code=0)
    x = torch.randn(2, DIM, 8)
    seen = set()
    for _ in range(12):
        state = {key: value.clone() for key, value in hvq.state_dict().items()}
        reconstruction, indices, loss, cutoff = hvq(x, return_cutoff=True)
        cut = int(cutoff)
        seen.add(cut)
        # the same step of a model with only the kept levels (same state, same updates in the same order)
        truncated = _hvq(scales=[1, 2, 4, 8][:cut + 1], threshold_ema_dead_code=0)
        truncated.load_state_dict(state)
        expected = truncated(x)
        torch.testing.assert_close(reconstruction, expected.reconstruction)
        torch.testing.assert_close(loss, expected.loss)
    assert seen == {1, 2}  # uniform in [min_levels - 1, levels - 2]
    assert hvq.eval()(x, return_cutoff=True).cutoff is None


def test_masks_lens_and_layouts():
    torch.manual_seed(0)
    hvq = _hvq().eval()
    x = torch.randn(2, DIM, 8)
    lens = torch.tensor([8, 5])
    by_lens = hvq(x, lens=lens)
    by_mask = hvq(x, mask=torch.arange(8) < lens[:, None])
    assert torch.equal(by_lens.reconstruction, by_mask.reconstruction)
    assert (by_lens.reconstruction[1, :, 5:] == 0).all()
    padded = x.clone()
    padded[1, :, 5:] = 100.0  # padding never reaches the levels
    assert all(torch.equal(a, b) for a, b in zip(hvq(padded, lens=lens).indices, by_lens.indices))
    image = _hvq(scales=[1, 2, (2, 4)], accept_image_fmap=True, channel_first=False, shared_codebook=False,
                 codebook_size=[16, 8, 4], share_quant_resi=2).eval()
    out, indices, _ = image(torch.randn(2, 4, 8, DIM))
    assert out.shape == (2, 4, 8, DIM) and [tuple(i.shape) for i in indices] == [(2, 1, 1), (2, 2, 2), (2, 2, 4)]
    assert all(int(i.max()) < size for i, size in zip(indices, (16, 8, 4)))
    video = _hvq(scales=[1, 2], accept_3d_fmap=True).eval()
    assert video(torch.randn(1, DIM, 2, 4, 4)).reconstruction.shape == (1, DIM, 2, 4, 4)


def test_the_shared_codebook_learns_from_every_level():
    torch.manual_seed(0)
    hvq = _hvq(threshold_ema_dead_code=0, decay=0.5)
    before = hvq.vq.codebook.clone()
    x = torch.randn(2, DIM, 8, requires_grad=True)
    reconstruction, _, loss = hvq(x)
    (reconstruction.sum() + loss).backward()
    assert not torch.equal(hvq.vq.codebook, before) and x.grad is not None
    assert hvq.phi_shared.conv.weight.grad is not None  # phi learns through the reconstruction


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="non-decreasing"):
        _hvq(scales=[4, 2])
    with pytest.raises(ValueError, match="one size per scale"):
        _hvq(codebook_size=[16, 8])
    with pytest.raises(ValueError, match="shared_codebook"):
        _hvq(codebook_size=[16, 8, 8, 8])
    hvq = _hvq()
    with pytest.raises(ValueError, match=r"\(batch, 8, \*1 spatial\)"):
        hvq(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="from indices"):
        hvq(torch.randn(2, DIM, 8), indices=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        hvq(torch.randn(2, DIM, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token sequence"):
        hvq.split_indices(torch.zeros(2, 14, dtype=torch.long))
