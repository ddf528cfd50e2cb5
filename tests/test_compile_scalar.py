"""torch.compile(fullgraph=True) equals eager for the scalar quantizers (FSQ, LFQ, LatentQuantize and the
residual forms), train and eval, within the rounding bound of ``tolerances``; options and forward arguments
that do not exclude each other share a case (see test_compile.py)."""

import pytest
import torch

from vqdeploy import FSP, FSQ, LFQ, BinaryMapper, EvoLFQ, GroupedResidualFSQ, GroupedResidualLFQ, LatentQuantize, ResidualFSQ, ResidualLFQ

from helpers import compare_eager_compiled, twin
from tolerances import assert_rounding_close

FSQ_OPTIONS = {
    "image_projection_codebooks": (dict(levels=[5, 4], num_codebooks=2, dim=8), (2, 8, 3, 4)),
    "channel_first_half": (dict(levels=[7, 5, 5], channel_first=True), (2, 3, 12)),
    # 1.32.0's: the symmetric bound with a level of 2, noise dropout drawn in the graph, hard clamp, rotation
    "symmetric_noise_dropout_hard_clamp_rotation": (dict(levels=[2, 2, 2], dim=8, preserve_symmetry=True,
                                                         noise_dropout=0.5, bound_hard_clamp=True,
                                                         orthogonal_rotation=True), (2, 12, 8)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(FSQ_OPTIONS))
def test_fsq_compiles_to_one_graph(name, mode):
    options, shape = FSQ_OPTIONS[name]
    eager = FSQ(**options).train(mode == "train")
    compiled = torch.compile(twin(eager), fullgraph=True)
    dtype = torch.float16 if name.endswith("half") else torch.float32
    compare_eager_compiled(eager, compiled, lambda: (torch.randn(shape) * 3).to(dtype), lambda x: {}, steps=2)


def test_fsq_decode_compiles():
    fsq = FSQ(levels=[8, 5, 5, 5], dim=8)
    indices = fsq.encode(torch.randn(2, 12, 8))
    decode = torch.compile(fsq.decode, fullgraph=True)
    assert_rounding_close(decode(indices), fsq.decode(indices), n=8)


RESIDUAL_FSQ_OPTIONS = {
    "dropout_projection_seeded_bandwidth": (
        ResidualFSQ, dict(dim=8, levels=[8, 5, 5], num_quantizers=3, quantize_dropout=True),
        dict(return_all_codes=True, rand_quantize_dropout_fixed_seed=3, num_quantizers=2)),
    # 1.32.0's other clamp: tanh at soft_clamp_input_value, then tanh-bounded layers (the default: hard clamps)
    "grouped_dropout_tanh_clamp": (GroupedResidualFSQ, dict(dim=8, groups=2, levels=[5, 5], num_quantizers=2,
                                                            quantize_dropout=True, bound_hard_clamp=False,
                                                            soft_clamp_input_value=[1.5, 2.0]),
                                   dict(return_all_codes=True)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(RESIDUAL_FSQ_OPTIONS))
def test_residual_fsq_compiles_to_one_graph(name, mode):
    cls, options, kwargs = RESIDUAL_FSQ_OPTIONS[name]
    eager = cls(**options).train(mode == "train")
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: torch.randn(2, 12, 8), lambda x: kwargs, steps=2)


LFQ_OPTIONS = {
    # with 1.32.0's spherical codes, cosine projection, rotation and softplus entropy loss
    "lfq_masked_fraction_clamp_spherical_cosine_rotation_softplus": (
        LFQ, dict(dim=8, codebook_size=2**5, frac_per_sample_entropy=0.5, soft_clamp_input_value=2.0,
                  use_code_agnostic_commit_loss=True, commitment_loss_weight=0.25, spherical=True,
                  cosine_sim_project_in=True, orthogonal_rotation=True, experimental_softplus_entropy_loss=True),
        True),
    # meshgpt-pytorch's: the softplus entropy loss and a soft clamp halved per layer
    "residual_lfq_dropout_meshgpt": (ResidualLFQ, dict(dim=8, num_quantizers=2, codebook_size=2**6,
                                                       quantize_dropout=True, soft_clamp_input_value=10,
                                                       experimental_softplus_entropy_loss=True), True),
    "grouped_lfq": (GroupedResidualLFQ, dict(dim=8, groups=2, num_quantizers=1, codebook_size=2**4), False),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(LFQ_OPTIONS))
def test_lfq_family_compiles_to_one_graph(name, mode):
    cls, options, masked = LFQ_OPTIONS[name]
    eager = cls(**options).train(mode == "train")
    compiled = torch.compile(twin(eager), fullgraph=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False
    compare_eager_compiled(eager, compiled, lambda: torch.randn(2, 12, 8),
                           lambda x: dict(mask=mask) if masked else {}, steps=2)


LATENT_OPTIONS = {
    "unequal_image_projection": (dict(levels=[5, 4, 8], dim=8), (2, 8, 3, 4)),  # a ParameterList of values
    "equal_codebooks": (dict(levels=5, dim=4, num_codebooks=2), (2, 4, 12)),
    "fixed_values": (dict(levels=[7, 3, 4], dim=3, optimize_values=False, commitment_loss_weight=0.0), (2, 3, 12)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(LATENT_OPTIONS))
def test_latent_quantize_compiles_to_one_graph(name, mode):
    options, shape = LATENT_OPTIONS[name]
    eager = LatentQuantize(**options).train(mode == "train")
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: torch.randn(shape), lambda x: {}, steps=2)


def test_latent_quantize_in_place_optimizer_is_eager_only():
    """Its optimizer step runs eagerly: fullgraph refuses it, a graph-broken compile matches eager."""
    def build():
        torch.manual_seed(0)
        return LatentQuantize([5, 3], dim=4, in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5))

    with pytest.raises(Exception, match="(?i)skip|disable|graph break|unsupported"):
        torch.compile(build(), fullgraph=True)(torch.randn(2, 4, 12))
    torch._dynamo.reset()
    eager, compiled = build(), torch.compile(build())
    for step in range(2):
        x = torch.randn(2, 4, 12)
        out_e, out_c = eager(x), compiled(x)
        assert torch.equal(out_e.indices, out_c.indices)
        assert_rounding_close(out_c.quantized, out_e.quantized, steps=step + 1, n=x.numel(), data=x)
    for a, b in zip(eager.values_per_latent, compiled._orig_mod.values_per_latent):
        assert_rounding_close(b, a, steps=2, n=x.numel(), data=x)


NEW_SCALAR_OPTIONS = {  # 1.32.0's FSP, BinaryMapper (random draws: one uniform draw in the graph), EvoLFQ
    "fsp_perturbed_inverse_cdf_channel_first": (
        lambda: FSP(levels=[8, 5, 5], dim=8, channel_first=True, quantize_rate=0.5, act_name="laplace",
                    need_inv_act=True, vector_norm="kurt"), (2, 8, 12), {}),
    "binary_mapper_sampled": (lambda: BinaryMapper(bits=5, kl_loss_threshold=0.2), (2, 12, 5),
                              dict(return_indices=True, temperature=0.7)),
    "evo_lfq_autoencoder": (lambda: EvoLFQ(torch.nn.Linear(12, 8), torch.nn.Linear(8, 12), dim=8, codebook_size=16,
                                           num_codebooks=2, spherical=True), (2, 6, 12), {}),
}


@pytest.mark.parametrize("name, mode", [(name, mode) for name in NEW_SCALAR_OPTIONS for mode in ("train", "eval")
                                        if (name, mode) != ("evo_lfq_autoencoder", "eval")])  # LFQ's eval is above
def test_fsp_binary_mapper_and_evo_lfq_compile_to_one_graph(name, mode):
    build, shape, kwargs = NEW_SCALAR_OPTIONS[name]
    eager = build().train(mode == "train")
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: torch.randn(shape), lambda x: kwargs, steps=2)
