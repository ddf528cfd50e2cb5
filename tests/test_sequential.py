"""Sequential: modules around exactly one quantizer (compile in test_compile.py)."""

import pytest
import torch
from torch import nn

import vqdeploy as V
from vqdeploy.export import export, verify


def test_sequential_composes_and_passes_keyword_arguments_to_the_quantizer():
    torch.manual_seed(0)
    vq = V.ResidualVQ(dim=16, codebook_size=32, num_quantizers=2)
    before, after = nn.Linear(8, 16), nn.Linear(16, 8)
    sequential = V.Sequential(before, vq, after).eval()
    x = torch.randn(2, 10, 8)
    mask = torch.arange(10) < torch.tensor([[10], [6]])
    out, indices, losses = sequential(x, mask=mask)
    quantized, expected, expected_losses = vq(before(x), mask=mask)
    torch.testing.assert_close(out, after(quantized))
    assert torch.equal(indices, expected) and torch.equal(losses, expected_losses)
    assert [key.split(".")[1] for key in sequential.state_dict()][:2] == ["0", "0"]  # fns.{i}, as the reference
    assert sequential.quantizer is vq


def test_sequential_exports_its_networks_around_the_quantizer(tmp_path):
    torch.manual_seed(0)
    sequential = V.Sequential(nn.Linear(8, 16), V.VectorQuantize(dim=16, codebook_size=32), nn.Linear(16, 8))
    result = export(sequential, tmp_path / "bundle", example=torch.randn(2, 10, 8), dynamic_axes=[0, 1])
    assert result.report.passed and result.manifest["encoder_network"] and result.manifest["decoder_network"]
    assert verify(tmp_path / "bundle", encoder=sequential.before, decoder=sequential.after).passed


def test_sequential_needs_exactly_one_quantizer():
    with pytest.raises(ValueError, match="exactly one quantizer"):
        V.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="exactly one quantizer"):
        V.Sequential(V.FSQ(levels=[5, 5]), V.FSQ(levels=[5, 5]))
    with pytest.raises(TypeError, match="modules"):
        V.Sequential(V.FSQ(levels=[5, 5]), lambda x: x)
