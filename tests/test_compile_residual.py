"""torch.compile(fullgraph=True) equals eager for ResidualVQ, GroupedResidualVQ and RandomProjectionQuantizer.

Every class and option of issue 3 runs a few steps in train (forward, backward, codebook updates, quantize
dropout drawn inside the graph) and in eval, eagerly and compiled from one state and seed; indices must be
equal, and outputs, losses, gradients and every buffer within 1e-5.
"""

import pytest
import torch

from vqdeploy import GroupedResidualVQ, RandomProjectionQuantizer, ResidualVQ

from helpers import CODEBOOK_SIZE, DIM, compare_eager_compiled, input_for, twin

RESIDUAL_OPTIONS = {
    "default": {},
    "codebook_dim": dict(codebook_dim=8),
    "dropout_cutoff_multiple_of": dict(quantize_dropout=True, num_quantizers=4, quantize_dropout_cutoff_index=1,
                                       quantize_dropout_multiple_of=2),
    "kmeans_shared_dropout": dict(kmeans_init=True, kmeans_iters=2, shared_codebook=True, quantize_dropout=True,
                                  num_quantizers=3),
    "kmeans_dead_codes": dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2),
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "cosine": dict(use_cosine_sim=True),
    "image_fmap": dict(accept_image_fmap=True, codebook_dim=8),
    "channel_first": dict(channel_last=False),
    "vq_options": dict(affine_param=True, commitment_use_cross_entropy_loss=True, orthogonal_reg_weight=1.0),
    "learnable_codebook": dict(ema_update=False, learnable_codebook=True),
}

CALLS = {
    "mask": lambda x: dict(mask=torch.arange(x.shape[1]).expand(x.shape[0], -1) < torch.tensor([[x.shape[1]], [5]])),
    "indices": lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, (*x.shape[:2], 3))),
    "all_codes_at_lower_bandwidth": lambda x: dict(return_all_codes=True, num_quantizers=2),
    "fixed_seed": lambda x: dict(rand_quantize_dropout_fixed_seed=1234),
    "tensor_seed": lambda x: dict(rand_quantize_dropout_fixed_seed=torch.tensor(2**40 + 7)),
    "temperature_and_freeze": lambda x: dict(sample_codebook_temp=0.2, freeze_codebook=True),
}


def _rvq(options):
    options = dict(options)
    return ResidualVQ(dim=DIM, num_quantizers=options.pop("num_quantizers", 2), codebook_size=CODEBOOK_SIZE,
                      **options)


def _check(eager, make_input, kwargs_for=lambda x: {}, steps=2, state_rtol=1e-5):
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, make_input, kwargs_for, steps=steps, state_rtol=state_rtol)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(RESIDUAL_OPTIONS))
def test_residual_option_compiles_to_one_graph(name, mode):
    eager = _rvq(RESIDUAL_OPTIONS[name]).train(mode == "train")
    # affine statistics rescale the residuals: float32 rounding of the EMA sums reaches ~1.3e-5 relative
    _check(eager, lambda: input_for(eager), state_rtol=5e-5 if "affine_param" in RESIDUAL_OPTIONS[name] else 1e-5)


@pytest.mark.parametrize("call", list(CALLS))
def test_residual_forward_arguments_compile(call):
    eager = _rvq(dict(quantize_dropout=True, stochastic_sample_codes=True, num_quantizers=3))
    _check(eager, lambda: input_for(eager), CALLS[call])


def test_residual_dropout_varies_inside_one_graph():
    """The dropout depth is a tensor: successive compiled steps drop different layers without recompiling."""
    eager = _rvq(dict(quantize_dropout=True, num_quantizers=4))
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(twin(eager), fullgraph=True, dynamic=False)
    depths = set()
    for step in range(8):
        torch.manual_seed(step)
        depths.add(int((compiled(input_for(eager)).indices[0, 0] >= 0).sum()))
    assert len(depths) > 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_residual_single_vectors_and_masked_image_compile():
    eager = _rvq({})
    _check(eager, lambda: torch.randn(4, DIM))
    torch._dynamo.reset()
    image = _rvq(dict(accept_image_fmap=True, quantize_dropout=True))
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, :, 2:] = False
    _check(image, lambda: input_for(image), lambda x: dict(mask=mask))


def test_residual_encode_decode_compile():
    rvq = _rvq(dict(codebook_dim=8, quantize_dropout=True)).eval()
    x = input_for(rvq)
    encode = torch.compile(rvq.encode, fullgraph=True)
    decode = torch.compile(rvq.decode, fullgraph=True)
    indices = encode(x)
    assert torch.equal(indices, rvq.encode(x))
    torch.testing.assert_close(decode(indices), rvq.decode(indices), atol=1e-6, rtol=0)
    coarse = torch.compile(rvq.get_output_from_indices, fullgraph=True)
    torch.testing.assert_close(coarse(indices[..., :2], num_quantizers=2),
                               rvq.get_output_from_indices(indices[..., :2], num_quantizers=2), atol=1e-6, rtol=0)


GROUPED_OPTIONS = {
    "default": {},
    "dropout_codebook_dim": dict(quantize_dropout=True, codebook_dim=4),
    "image_fmap_kmeans": dict(accept_image_fmap=True, kmeans_init=True, kmeans_iters=2, quantize_dropout=True),
}


def _grouped(options):
    return GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=CODEBOOK_SIZE, **options)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(GROUPED_OPTIONS))
def test_grouped_option_compiles_to_one_graph(name, mode):
    eager = _grouped(GROUPED_OPTIONS[name]).train(mode == "train")
    _check(eager, lambda: input_for(eager))


@pytest.mark.parametrize("call", ["mask", "indices", "all_codes_at_lower_bandwidth"])
def test_grouped_forward_arguments_compile(call):
    eager = _grouped(dict(quantize_dropout=True))

    def kwargs_for(x):
        kwargs = CALLS[call](x)
        if call == "indices":
            kwargs["indices"] = torch.randint(0, CODEBOOK_SIZE, (2, *x.shape[:2], 2))
        if call == "all_codes_at_lower_bandwidth":
            kwargs["num_quantizers"] = 1
        return kwargs

    _check(eager, lambda: input_for(eager), kwargs_for)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("num_codebooks, reference_projection", [(1, False), (3, False), (3, True)])
def test_random_projection_compiles(num_codebooks, reference_projection, mode):
    eager = RandomProjectionQuantizer(dim=DIM, codebook_size=CODEBOOK_SIZE, codebook_dim=8,
                                      num_codebooks=num_codebooks)
    if reference_projection:
        eager.vq = eager._make_vq(reference_projection=True)
    eager.train(mode == "train")
    _check(eager, lambda: torch.randn(2, 12, DIM))
    index_shape = (2, 12) if num_codebooks == 1 else (2, 12, num_codebooks)
    _check(eager, lambda: torch.randn(2, 12, DIM),
           lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, index_shape)), steps=1)
