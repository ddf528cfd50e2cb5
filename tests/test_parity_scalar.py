"""Parity of the scalar quantizers with vector-quantize-pytorch 1.14.17 (FSQ so far).

Reference modules are saved as safetensors and loaded strictly; FSQ's codes and indices must be bit-identical,
and so must indices_to_codes and the implicit codebook.
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import vector_quantize_pytorch as vqp  # the reference, a test dependency

from vqdeploy import FSQ

FSQ_CONFIGS = {
    "levels_8555": (dict(levels=[8, 5, 5, 5]), (2, 30, 4)),
    "projection": (dict(levels=[8, 6, 5], dim=16), (2, 30, 16)),
    "projection_no_bias": (dict(levels=[8, 6, 5], dim=16, projection_has_bias=False), (2, 30, 16)),
    "codebooks": (dict(levels=[3, 4], num_codebooks=3), (2, 30, 6)),
    "image": (dict(levels=[7, 5, 5, 5]), (2, 4, 5, 6)),
    "channel_first": (dict(levels=[7, 5, 5, 5], channel_first=True), (2, 4, 30)),
    "video_projection": (dict(levels=[8, 5, 5, 5], dim=8), (2, 8, 3, 4, 5)),
}


@pytest.mark.parametrize("name", list(FSQ_CONFIGS))
def test_fsq_matches_reference_bit_for_bit(name, tmp_path):
    options, shape = FSQ_CONFIGS[name]
    torch.manual_seed(0)
    ref = vqp.FSQ(**options)
    path = str(tmp_path / "fsq.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    ours = FSQ(**options)
    ours.load_state_dict(load_file(path), strict=True)
    x = torch.randn(shape) * 3
    (q_ref, idx_ref), (q, idx) = ref(x), ours(x)
    assert idx.dtype == idx_ref.dtype and idx.shape == idx_ref.shape and torch.equal(idx, idx_ref)
    assert torch.equal(q, q_ref)
    assert torch.equal(ours.indices_to_codes(idx), ref.indices_to_codes(idx_ref))
    assert torch.equal(ours.implicit_codebook, ref.implicit_codebook)
    assert ours.codebook_size == ref.codebook_size
    if "dim" not in options and len(shape) == 3:  # the reference runs half precision only without projections
        (q_ref, idx_ref), (q, idx) = ref(x.half()), ours(x.half())
        assert torch.equal(idx, idx_ref) and torch.equal(q, q_ref) and q.dtype == torch.float16
