"""vqdeploy.runtime.Session on the CPU: numpy and torch in and out, index range checks, shapes, the CUDA
fallback warning, and concurrent calls.  (IO binding on CUDA is in test_cuda.py.)"""

import threading

import numpy as np
import pytest
import torch
from torch import nn

import vqdeploy as V
from vqdeploy.export import export
from vqdeploy.runtime import Session, symbolic_size


@pytest.fixture(scope="module")
def rvq_bundle(tmp_path_factory):
    torch.manual_seed(0)
    rvq = V.ResidualVQ(dim=16, codebook_size=(32, 32, 8)).eval()  # a smaller last layer: checked per layer
    path = tmp_path_factory.mktemp("bundles") / "rvq"
    export(rvq, path, verify=False)
    return rvq, path


def test_numpy_and_torch_round_trips_match_pytorch(rvq_bundle):
    rvq, path = rvq_bundle
    session = Session(path, provider="cpu")
    x = torch.randn(3, 40, 16)
    indices = session.encode(x.numpy())
    assert isinstance(indices, np.ndarray) and np.array_equal(indices, rvq.encode(x).numpy())
    decoded = session.decode(indices)
    np.testing.assert_allclose(decoded, rvq.decode(torch.from_numpy(indices)).detach().numpy(), atol=1e-5, rtol=0)
    torch_indices = session.encode(x)
    assert isinstance(torch_indices, torch.Tensor) and torch.equal(torch_indices, rvq.encode(x))
    assert isinstance(session.decode(torch_indices), torch.Tensor)
    dropped = torch_indices.clone()
    dropped[..., 1:] = -1  # dropped layers decode to zero
    torch.testing.assert_close(session.decode(dropped), rvq.decode(dropped), atol=1e-5, rtol=0)


def test_bad_indices_and_shapes_raise(rvq_bundle):
    _, path = rvq_bundle
    session = Session(path, provider="cpu")
    with pytest.raises(ValueError, match=r"lie in \[-1, 31\]"):
        session.decode(np.full((1, 4, 3), 32))
    with pytest.raises(ValueError, match=r"lie in \[-1, 31\]"):
        session.decode(torch.full((1, 4, 3), -2))
    with pytest.raises(ValueError, match=r"indices of layer 2 must lie in \[-1, 7\]"):
        session.decode(np.full((1, 4, 3), 8))
    with pytest.raises(TypeError, match="integer"):
        session.decode(np.zeros((1, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(\*, \*, 3\)"):
        session.decode(np.zeros((1, 4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"shape \(\*, \*, 16\)"):
        session.encode(np.zeros((1, 4, 8), dtype=np.float32))
    with pytest.raises(TypeError, match="floating-point"):
        session.encode(np.zeros((1, 4, 16), dtype=np.int64))
    unchecked = Session(path, provider="cpu", check_indices=False)
    with pytest.raises(TypeError, match="integer"):
        unchecked.decode(torch.zeros(1, 4, 3))


def test_single_vq_rejects_minus_one(tmp_path):
    export(V.VectorQuantize(dim=8, codebook_size=16), tmp_path / "vq", verify=False)
    with pytest.raises(ValueError, match=r"lie in \[0, 15\]"):
        Session(tmp_path / "vq", provider="cpu").decode(np.array([[0, -1]]))


def test_asking_for_cuda_without_a_gpu_falls_back_with_a_warning(rvq_bundle):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_cuda.py covers the CUDA provider")
    with pytest.warns(RuntimeWarning, match="running on the CPU"):
        session = Session(rvq_bundle[1], provider="cuda")
    assert session.providers == ["CPUExecutionProvider"]


def test_one_session_serves_several_threads(rvq_bundle):
    rvq, path = rvq_bundle
    session = Session(path, provider="cpu")
    inputs = [torch.randn(2, 10 + i, 16) for i in range(8)]
    results = [None] * len(inputs)

    def work(i):
        for _ in range(3):
            results[i] = session.decode(session.encode(inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for x, result in zip(inputs, results):
        torch.testing.assert_close(result, rvq.decode(rvq.encode(x)), atol=1e-5, rtol=0)


def test_wrapped_codec_output_shapes_follow_symbolic_sizes(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Conv1d(1, 8, 4, stride=2, padding=1)
    decoder = nn.ConvTranspose1d(8, 1, 4, stride=2, padding=1)
    quantizer = V.FSQ(levels=[5, 5, 4], dim=8, channel_first=True)
    manifest = export(quantizer, tmp_path / "codec", encoder=encoder, decoder=decoder,
                      example=torch.randn(2, 1, 32)).manifest
    session = Session(tmp_path / "codec", provider="cpu")
    sizes = session._checked_shape("encoder", (5, 1, 50))
    expected = [symbolic_size(d, sizes) for d in manifest["encoder"]["output"]["shape"]]
    assert list(session.encode(torch.randn(5, 1, 50)).shape) == expected == [5, 25]


def test_symbolic_sizes():
    sizes = {"s0": 3, "s1": 50}
    assert symbolic_size("s0", sizes) == 3 and symbolic_size(7, sizes) == 7
    assert symbolic_size("(s1//2)", sizes) == 25 and symbolic_size("2*s1 - 1", sizes) == 99
    assert symbolic_size("Max(s0, 2)", sizes) is None and symbolic_size("s9", sizes) is None


def test_encoder_only_bundles_have_no_decode(tmp_path):
    rpq = V.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    export(rpq, tmp_path / "rpq", verify=False)
    session = Session(tmp_path / "rpq", provider="cpu")
    assert np.array_equal(session.encode(np.ones((2, 5, 8), np.float32)), rpq.encode(torch.ones(2, 5, 8)).numpy())
    with pytest.raises(ValueError, match="no decoder"):
        session.decode(np.zeros((2, 5), np.int64))
