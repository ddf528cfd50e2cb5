"""torch.compile(fullgraph=True) equals eager for SimVQ, ResidualSimVQ and HierarchicalVQ, train and eval (as
test_compile_residual.py does for the other residual classes)."""

import pytest
import torch
from torch import nn

from vqdeploy import HierarchicalVQ, ResidualSimVQ, SimVQ

from helpers import CODEBOOK_SIZE, DIM, check_compiled

SIM_CASES = {  # (build, input) -- the transform learns through autograd, so both modes compare gradients too
    "simvq_mlp_transform_channel_last_map_straight_through": (
        lambda: SimVQ(dim=DIM, codebook_size=CODEBOOK_SIZE, frozen_codebook_dim=8, rotation_trick=False,
                      codebook_transform=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, DIM))),
        lambda: torch.randn(2, 3, 4, DIM)),
    "residual_simvq_channel_first_dropout_all_codes": (  # SimVQ layers with the rotation trick
        lambda: ResidualSimVQ(dim=DIM, num_quantizers=3, codebook_size=CODEBOOK_SIZE, quantize_dropout=True,
                              quantize_dropout_cutoff_index=1, channel_first=True),
        lambda: torch.randn(2, DIM, 12)),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(SIM_CASES))
def test_simvq_compiles_to_one_graph(name, mode):
    build, make_input = SIM_CASES[name]
    torch.manual_seed(0)
    eager = build().train(mode == "train")
    call = (lambda x: dict(return_all_codes=True)) if isinstance(eager, ResidualSimVQ) else (lambda x: {})
    check_compiled(eager, make_input, call)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hierarchical_vq_compiles_to_one_graph(mode):
    """Levels of their own codebooks and phis, channel-last images, nested dropout drawn in the graph, a mask.
    (k-means and dead codes would sample the coarsest level's few rows into duplicate codes, whose exact ties
    compiled and eager may break apart: they are off here, and covered by the VectorQuantize cases.)"""
    torch.manual_seed(0)
    eager = HierarchicalVQ(dim=DIM, codebook_size=[32, 16, 16], scales=[1, 2, (2, 4)], shared_codebook=False,
                           accept_image_fmap=True, channel_first=False, share_quant_resi=2, rotation_trick=True,
                           nested_dropout=0.5, kmeans_init=False, threshold_ema_dead_code=0).train(mode == "train")
    mask = torch.ones(2, 4, 8, dtype=torch.bool)
    mask[1, 2:] = False
    check_compiled(eager, lambda: torch.randn(2, 4, 8, DIM), lambda x: dict(mask=mask))
