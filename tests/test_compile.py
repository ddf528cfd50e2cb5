"""torch.compile(fullgraph=True) equals eager, for every VectorQuantize option, in train and eval.

Each case runs a few training steps (forward, backward, EMA / k-means / dead-code updates inside the graph)
from one state and one seed, eagerly and compiled, and compares indices (equal), outputs, losses, gradients
and every buffer (within 1e-5); then the same in eval mode.
"""

import pytest
import torch

from vqdeploy import VectorQuantize

from helpers import CODEBOOK_SIZE, DIM, compare_eager_compiled, input_for, twin

ATOL = 1e-5

# one entry per constructor argument of vector-quantize-pytorch 1.14.17 (and a few combinations)
OPTIONS = {
    "default": {},
    "codebook_dim": dict(codebook_dim=8),
    "heads_shared": dict(heads=2, codebook_dim=8),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True),
    "decay": dict(decay=0.5),
    "eps": dict(eps=1e-3),
    "freeze_codebook": dict(freeze_codebook=True),
    "kmeans_init": dict(kmeans_init=True, kmeans_iters=3),
    "kmeans_init_sync_kmeans_off": dict(kmeans_init=True, kmeans_iters=2, sync_kmeans=False),
    "kmeans_init_heads": dict(kmeans_init=True, kmeans_iters=2, heads=2, separate_codebook_per_head=True),
    "cosine": dict(use_cosine_sim=True),
    "cosine_kmeans_dead_codes": dict(use_cosine_sim=True, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2),
    "dead_codes": dict(threshold_ema_dead_code=2),
    "channel_first": dict(channel_last=False),
    "image_fmap": dict(accept_image_fmap=True, codebook_dim=8),
    "commitment_weight": dict(commitment_weight=0.25),
    "no_commitment": dict(commitment_weight=0.0),
    "commitment_cross_entropy": dict(commitment_use_cross_entropy_loss=True),
    "commitment_cross_entropy_learnable": dict(commitment_use_cross_entropy_loss=True, orthogonal_reg_weight=1.0),
    "orthogonal": dict(orthogonal_reg_weight=10.0),
    "orthogonal_active_only": dict(orthogonal_reg_weight=10.0, orthogonal_reg_active_codes_only=True),
    "orthogonal_max_codes": dict(orthogonal_reg_weight=10.0, orthogonal_reg_max_codes=8),
    "orthogonal_active_max": dict(orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                                  orthogonal_reg_max_codes=8),
    "stochastic": dict(stochastic_sample_codes=True, sample_codebook_temp=0.5),
    "straight_through": dict(straight_through=True),
    "reinmax": dict(straight_through=True, reinmax=True, stochastic_sample_codes=True),
    "sync_codebook_single_process": dict(sync_codebook=True, kmeans_init=True, kmeans_iters=2,
                                         threshold_ema_dead_code=2),
    "no_ema_update": dict(ema_update=False),
    "learnable_codebook": dict(ema_update=False, learnable_codebook=True),
    "sync_update_v": dict(ema_update=False, learnable_codebook=True, sync_update_v=0.5),
    "affine_param": dict(affine_param=True),
    "affine_param_decays": dict(affine_param=True, affine_param_batch_decay=0.5, affine_param_codebook_decay=0.5,
                                sync_affine_param=True),
}

# forward arguments beyond x
CALLS = {
    "mask": lambda x: dict(mask=torch.arange(x.shape[1]).expand(x.shape[0], -1) < torch.tensor([[x.shape[1]], [5]])),
    "indices": lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, (x.shape[0], x.shape[1]))),
    "freeze_call": lambda x: dict(freeze_codebook=True),
    "temperature_call": lambda x: dict(sample_codebook_temp=0.2),
}


def _build(options):
    return VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, **options)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_compiles_to_one_graph(name, mode):
    eager = _build(OPTIONS[name])
    eager.train(mode == "train")
    other = twin(eager)
    compiled = torch.compile(other, fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: input_for(eager), lambda x: {})


@pytest.mark.parametrize("call", list(CALLS))
def test_forward_arguments_compile(call):
    options = dict(stochastic_sample_codes=True) if call == "temperature_call" else {}
    eager = _build(options)
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: input_for(eager), CALLS[call])


@pytest.mark.parametrize("name", ["kmeans_init_heads", "heads_shared", "cosine_kmeans_dead_codes", "affine_param",
                                  "commitment_cross_entropy", "orthogonal_active_only", "image_fmap"])
def test_masked_option_compiles(name):
    eager = _build(OPTIONS[name])
    compiled = torch.compile(twin(eager), fullgraph=True)

    def masked(x):
        b, *tokens = x.shape[:1] + (x.shape[2:] if eager.accept_image_fmap else x.shape[1:2])
        mask = torch.ones(b, *tokens, dtype=torch.bool)
        mask[-1, ..., : tokens[-1] // 2] = False
        return dict(mask=mask)

    compare_eager_compiled(eager, compiled, lambda: input_for(eager), masked)


def test_single_vector_input_compiles():
    eager = _build({})
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: torch.randn(4, DIM), lambda x: {})


def test_nan_batch_is_skipped_inside_the_graph():
    eager = _build(dict(threshold_ema_dead_code=2))
    compiled = torch.compile(twin(eager), fullgraph=True)
    bad = input_for(eager)
    bad[0, 0, 0] = float("nan")
    batches = iter([input_for(eager), bad, input_for(eager)])
    compare_eager_compiled(eager, compiled, lambda: next(batches), lambda x: {}, steps=1)
    before = twin(compiled._orig_mod)
    compiled(bad)
    assert int(compiled._orig_mod._codebook.skipped_updates) == 1
    assert torch.isfinite(compiled._orig_mod._codebook.embed).all()
    torch.testing.assert_close(compiled._orig_mod._codebook.embed, before._codebook.embed, atol=0, rtol=0)


def test_encode_decode_compile():
    vq = _build(dict(heads=2, separate_codebook_per_head=True)).eval()
    x = input_for(vq)
    encode = torch.compile(vq.encode, fullgraph=True)
    decode = torch.compile(vq.decode, fullgraph=True)
    indices = encode(x)
    assert torch.equal(indices, vq.encode(x))
    torch.testing.assert_close(decode(indices), vq.decode(indices), atol=0, rtol=0)


def test_in_place_codebook_optimizer_is_eager_only():
    """It runs a user's optimizer step inside forward: fullgraph refuses it, a graph-broken compile matches eager."""
    def build():
        torch.manual_seed(0)
        return _build(dict(ema_update=False, learnable_codebook=True,
                           in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.5)))

    with pytest.raises(Exception, match="(?i)skip|disable|graph break|unsupported"):
        torch.compile(build(), fullgraph=True)(torch.randn(2, 12, DIM))
    torch._dynamo.reset()
    eager, compiled = build(), torch.compile(build())
    for _ in range(2):
        x = torch.randn(2, 12, DIM)
        out_e, out_c = eager(x), compiled(x)
        assert torch.equal(out_e.indices, out_c.indices)
    torch.testing.assert_close(eager.codebook, compiled._orig_mod.codebook, atol=ATOL, rtol=0)


def test_initialised_codebook_drops_the_kmeans_cond_from_the_graph():
    """Inductor reads a cond's predicate on the host; a known-initialised codebook needs no cond at all."""
    fresh = _build(dict(kmeans_init=True, kmeans_iters=2))
    assert fresh._codebook._kmeans_pending
    resumed = _build(dict(kmeans_init=True, kmeans_iters=2))
    fresh(input_for(fresh))  # an eager step initialises it
    assert not fresh._codebook._kmeans_pending
    resumed.load_state_dict(fresh.state_dict())
    assert not resumed._codebook._kmeans_pending
    compiled_fresh = _build(dict(kmeans_init=True, kmeans_iters=2))
    torch.compile(compiled_fresh, fullgraph=True)(input_for(compiled_fresh))
    assert compiled_fresh._codebook._kmeans_pending  # the graph cannot tell the host
    compiled_fresh.train()
    assert not compiled_fresh._codebook._kmeans_pending
    torch._dynamo.reset()

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(resumed, fullgraph=True, backend=backend)(input_for(resumed))
    assert not any("cond" in str(node.target) for gm in graphs for node in gm.graph.nodes)
    torch._dynamo.reset()
    graphs.clear()
    torch.compile(_build(dict(kmeans_init=True, kmeans_iters=2)), fullgraph=True, backend=backend)(input_for(fresh))
    assert any("cond" in str(node.target) for gm in graphs for node in gm.graph.nodes)
