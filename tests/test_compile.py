"""torch.compile(fullgraph=True) equals eager, for every VectorQuantize option, in train and eval.

Each case runs a few training steps (forward, backward, EMA / k-means / dead-code / affine updates inside the
graph) from one state and one seed, eagerly and compiled, and compares indices (equal), outputs, losses,
gradients and every buffer (within the rounding bound of ``tolerances``); then the same in eval mode.

A compile costs seconds and a step after it milliseconds, so options that do not exclude each other share a
case: every constructor and forward argument of the reference API is in at least one case (the README's
table), masks in several, and a new option joins the case whose state it touches.
"""

import pytest
import torch

from vqdeploy import Sequential, VectorQuantize

from helpers import CODEBOOK_SIZE, DIM, compare_eager_compiled, input_for, mask_for, twin
from tolerances import assert_rounding_close, assert_state_close

# (constructor options, forward arguments for an input x).  Cases that run k-means or replace dead codes get
# more kept rows than codes (TOKENS): with fewer, k-means samples rows with replacement and leaves duplicate
# codes, whose exact ties compiled and eager may break apart by an ulp.
TOKENS = 24
CASES = {
    "default": ({}, None),
    # 1.14.17's defaults: straight-through, padding passed through, code counts from zero
    "ema_heads_dead_codes_orthogonal_1_14_17": (dict(codebook_dim=8, heads=2, decay=0.5, eps=1e-3,
                                                     threshold_ema_dead_code=2, commitment_weight=0.25,
                                                     orthogonal_reg_weight=10.0, orthogonal_reg_active_codes_only=True,
                                                     orthogonal_reg_max_codes=8, defaults="1.14.17"), "mask"),
    "kmeans_separate_heads_channel_first_layernorm_diversity": (
        dict(kmeans_init=True, kmeans_iters=3, sync_kmeans=False, heads=2, separate_codebook_per_head=True,
             channel_last=False, layernorm_after_project_in=True, codebook_diversity_loss_weight=0.5), "mask"),
    "cosine_kmeans_dead_codes_3d_fmap_diversity": (dict(use_cosine_sim=True, kmeans_init=True, kmeans_iters=2,
                                                        threshold_ema_dead_code=2, accept_3d_fmap=True, codebook_dim=8,
                                                        codebook_diversity_loss_weight=1.0), "mask"),
    "affine_cross_entropy_synced": (dict(affine_param=True, affine_param_batch_decay=0.5,
                                         affine_param_codebook_decay=0.5, sync_affine_param=True,
                                         commitment_use_cross_entropy_loss=True, sync_codebook=True), "mask"),
    "stochastic_reinmax_frozen": (dict(stochastic_sample_codes=True, sample_codebook_temp=0.5, straight_through=True,
                                       reinmax=True, freeze_codebook=True), lambda x: dict(sample_codebook_temp=0.2)),
    "learnable_sync_update_orthogonal": (dict(ema_update=False, learnable_codebook=True, sync_update_v=0.5,
                                              orthogonal_reg_weight=1.0, commitment_use_cross_entropy_loss=True),
                                         lambda x: dict(return_loss_breakdown=True)),
    "kmeans_frozen_by_call_lens": (dict(kmeans_init=True, kmeans_iters=2, commitment_weight=0.0),
                                   lambda x: dict(freeze_codebook=True, lens=torch.tensor([x.shape[1], 7]))),
    # DiVeQ: Gaussian noise from the step's uniform draw, a learnable codebook whose dead codes are still replaced
    "directional_reparam_dead_codes": (dict(directional_reparam=True, threshold_ema_dead_code=1.5), None),
}


def _build(options):
    return VectorQuantize(dim=DIM, codebook_size=CODEBOOK_SIZE, **options)


def _kwargs_for(vq, call):
    if call == "mask":
        return lambda x: dict(mask=mask_for(vq, x))
    return call or (lambda x: {})


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CASES))
def test_options_compile_to_one_graph(name, mode):
    options, call = CASES[name]
    eager = _build(options).train(mode == "train")
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: input_for(eager, tokens=TOKENS), _kwargs_for(eager, call))


def test_blockwise_nearest_code_search_compiles(monkeypatch):
    """The large-codebook search (row blocks of the score matrix) in a compiled training step."""
    import vqdeploy.search.torch_path as torch_path

    monkeypatch.setattr(torch_path, "SCORE_BLOCK_ELEMENTS", 5 * CODEBOOK_SIZE)
    eager = _build(dict(threshold_ema_dead_code=1))
    compare_eager_compiled(eager, torch.compile(twin(eager), fullgraph=True), lambda: input_for(eager, tokens=TOKENS),
                           lambda x: {}, steps=2)


@pytest.mark.parametrize("manual", [False, True], ids=["accumulated_weighted", "manual"])
def test_ema_control_compiles(manual):
    """Micro-batches accumulated, a per-code EMA weight, and a manual update, compiled: the state after the
    step equals eager's."""
    eager = _build(dict(manual_ema_update=manual, threshold_ema_dead_code=0.5))
    compiled_module = twin(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = torch.randn(3, 12, DIM)
    weight = torch.rand(CODEBOOK_SIZE)
    for model in (eager, compiled):
        if not manual:
            model(x[:1], accum_ema_update=True)
            model(x[1:2], accum_ema_update=True)
        model(x[2:], ema_update_weight=weight)
        if manual:
            model(x[:1], ema_update=False)  # a call that recomputes no codes (counts still tracked)
    if manual:
        eager.update_ema()
        torch.compile(compiled_module.update_ema, fullgraph=True)()
    assert_state_close(compiled_module, eager, n=x.numel(), data=x)


def test_cross_entropy_against_given_indices_compiles():
    eager = _build({})
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: input_for(eager),
                           lambda x: dict(indices=torch.randint(0, CODEBOOK_SIZE, (x.shape[0], x.shape[1]))),
                           steps=2)


def test_topk_and_sequential_compile():
    """forward(topk=) (no EMA step; k-means and affine statistics still train) and a Sequential around a
    quantizer with a vq_bridge, whose keyword arguments reach the quantizer."""
    eager = _build(dict(affine_param=True, commitment_weight=0.5))
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: input_for(eager), lambda x: dict(topk=3), steps=2)
    eager = Sequential(torch.nn.Linear(8, DIM), _build(dict(vq_bridge=torch.nn.Linear(DIM, DIM))),
                       torch.nn.Linear(DIM, 8))  # the quantizer's codes through a learned bridge
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: torch.randn(2, 12, 8),
                           lambda x: dict(mask=torch.arange(12) < torch.tensor([[12], [7]])), steps=2)


def test_single_vector_input_compiles():
    eager = _build({})
    compiled = torch.compile(twin(eager), fullgraph=True)
    compare_eager_compiled(eager, compiled, lambda: torch.randn(4, DIM), lambda x: {}, steps=2)


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
    assert_rounding_close(compiled._orig_mod.codebook, eager.codebook, steps=2, n=x.numel(), data=x)


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
