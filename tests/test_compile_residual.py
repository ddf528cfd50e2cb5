"""torch.compile(fullgraph=True) equals eager for ResidualVQ, GroupedResidualVQ and RandomProjectionQuantizer
(SimVQ, ResidualSimVQ and HierarchicalVQ: test_compile_sim_hierarchical.py).

Every class and option of issue 3 runs a few steps in train (forward, backward, codebook updates, quantize
dropout drawn inside the graph) and in eval, eagerly and compiled from one state and seed; indices must be
equal, and outputs, losses, gradients and every buffer within the rounding bound of ``tolerances``.  As in
``test_compile.py``, options and forward arguments that do not exclude each other share a case.
"""

import pytest
import torch

from vqdeploy import GroupedResidualVQ, RandomProjectionQuantizer, ResidualVQ

from helpers import CODEBOOK_SIZE, DIM, check_compiled, input_for, mask_for, twin
from tolerances import assert_rounding_close

TOKENS = 24  # more kept rows than codes wherever k-means or dead codes sample rows (see test_compile.py)

# (constructor options, forward arguments for an input x)
RESIDUAL_CASES = {
    "default": ({}, None),
    "dropout_cutoff_multiple_of_seeded_bandwidth": (
        dict(quantize_dropout=True, num_quantizers=4, quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2,
             codebook_dim=8),
        lambda x: dict(rand_quantize_dropout_fixed_seed=1234, return_all_codes=True, num_quantizers=3)),
    "kmeans_shared_dead_codes_dropout": (
        dict(kmeans_init=True, kmeans_iters=2, shared_codebook=True, threshold_ema_dead_code=2, quantize_dropout=True),
        "mask"),
    "stochastic_cosine_temperature_frozen_layer_sizes_grad_frac": (
        dict(stochastic_sample_codes=True, sample_codebook_temp=0.5, use_cosine_sim=True, quantize_dropout=True,
             codebook_size=(32, 16, 8), quant_grad_frac=0.5),
        lambda x: dict(sample_codebook_temp=0.2, freeze_codebook=True,
                       rand_quantize_dropout_fixed_seed=torch.tensor(2**40 + 7))),
    "image_affine_cross_entropy_orthogonal": (
        dict(accept_image_fmap=True, codebook_dim=8, affine_param=True, commitment_use_cross_entropy_loss=True,
             orthogonal_reg_weight=1.0, quantize_dropout=True), "mask"),
    "channel_first_diveq": (dict(channel_last=False, diveq=True), None),  # learnable codebooks, DiVeQ noise
    "implicit_neural_codebook_masked": (dict(implicit_neural_codebook=True, mlp_kwargs=dict(depth=1)), "mask"),
    "beam_dropout_weights_masked": (dict(beam_size=2, eval_beam_size=3, quantize_dropout=True, num_quantizers=3,
                                         beam_score_quantizer_weights=[1.0, 0.5, 2.0]), "mask"),
}


def _rvq(options):
    options = dict(options)
    codebook_size = options.pop("codebook_size", CODEBOOK_SIZE)
    num_quantizers = options.pop("num_quantizers", None if isinstance(codebook_size, tuple) else 2)
    return ResidualVQ(dim=DIM, num_quantizers=num_quantizers, codebook_size=codebook_size, **options)


def _kwargs_for(quantizer, call):
    if call == "mask":
        return lambda x: dict(mask=mask_for(quantizer, x))
    return call or (lambda x: {})


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(RESIDUAL_CASES))
def test_residual_options_compile_to_one_graph(name, mode):
    options, call = RESIDUAL_CASES[name]
    eager = _rvq(options).train(mode == "train")
    check_compiled(eager, lambda: input_for(eager, tokens=TOKENS), _kwargs_for(eager, call))


def test_residual_cross_entropy_compiles():
    eager = _rvq(dict(quantize_dropout=True, num_quantizers=3))
    check_compiled(eager, lambda: input_for(eager),
           lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, (*x.shape[:2], 3))))


def test_residual_dropout_varies_inside_one_graph():
    """The dropout depth is a tensor: successive compiled steps drop different layers without recompiling."""
    eager = _rvq(dict(quantize_dropout=True, num_quantizers=3))
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(twin(eager), fullgraph=True, dynamic=False)
    depths = set()
    for step in range(8):
        torch.manual_seed(step)
        depths.add(int((compiled(input_for(eager)).indices[0, 0] >= 0).sum()))
    assert len(depths) > 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_residual_encode_decode_compile():
    rvq = _rvq(dict(codebook_dim=8, quantize_dropout=True)).eval()
    x = input_for(rvq)
    encode = torch.compile(rvq.encode, fullgraph=True)
    decode = torch.compile(rvq.decode, fullgraph=True)
    indices = encode(x)
    assert torch.equal(indices, rvq.encode(x))
    assert_rounding_close(decode(indices), rvq.decode(indices), n=x.numel())
    coarse = torch.compile(rvq.get_output_from_indices, fullgraph=True)
    assert_rounding_close(coarse(indices[..., :2], num_quantizers=2),
                          rvq.get_output_from_indices(indices[..., :2], num_quantizers=2), n=x.numel())


GROUPED_CASES = {
    "dropout_codebook_dim_masked_bandwidth": (dict(quantize_dropout=True, codebook_dim=4),
                                              lambda x: dict(mask=mask_for(None, x), return_all_codes=True,
                                                             num_quantizers=1)),
    "image_fmap_kmeans": (dict(accept_image_fmap=True, kmeans_init=True, kmeans_iters=2, num_quantizers=1), None),
}


def _grouped(options):
    options = dict(options)
    return GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=options.pop("num_quantizers", 2),
                             codebook_size=CODEBOOK_SIZE, **options)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(GROUPED_CASES))
def test_grouped_options_compile_to_one_graph(name, mode):
    options, call = GROUPED_CASES[name]
    eager = _grouped(options).train(mode == "train")
    check_compiled(eager, lambda: input_for(eager, tokens=TOKENS), call or (lambda x: {}))


def test_grouped_cross_entropy_compiles():
    eager = _grouped(dict(num_quantizers=1))
    check_compiled(eager, lambda: input_for(eager),
           lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, (2, *x.shape[:2], 1))), steps=1)


@pytest.mark.parametrize("num_codebooks, reference_projection", [(1, False), (3, False), (3, True)])
def test_random_projection_compiles(num_codebooks, reference_projection):
    """Nothing trains (the inner quantizer stays in eval): one training-mode module covers both modes."""
    eager = RandomProjectionQuantizer(dim=DIM, codebook_size=CODEBOOK_SIZE, codebook_dim=8,
                                      num_codebooks=num_codebooks)
    if reference_projection:
        eager.vq = eager._make_vq(reference_projection=True)
    check_compiled(eager, lambda: torch.randn(2, 12, DIM))
    index_shape = (2, 12) if num_codebooks == 1 else (2, 12, num_codebooks)
    check_compiled(eager, lambda: torch.randn(2, 12, DIM),
           lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, index_shape)), steps=1)
