"""Worker for the 2-rank tests: trains a VectorQuantize on its share of the batches and saves its state."""

import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


def train_rank(rank: int, world: int, options: dict, data_path: str, out_dir: str, compiled: bool) -> None:
    torch.set_num_threads(1)
    # a file store needs no port, so parallel or back-to-back runs cannot collide
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        import torch._inductor.config as inductor_config
        from vqdeploy import VectorQuantize

        torch.manual_seed(0)
        vq = VectorQuantize(**options)  # sync_codebook=None: synchronised because torch.distributed is up
        assert vq.sync_codebook
        model = torch.compile(vq, fullgraph=True) if compiled else vq
        inductor_config.fallback_random = True
        batches = load_file(data_path)["batches"]
        share = batches.shape[1] // world
        torch.manual_seed(1 + rank)
        for step in range(batches.shape[0]):
            x = batches[step, rank * share:(rank + 1) * share].clone().requires_grad_()
            quantized, indices, loss = model(x)
            (quantized.sum() + loss.sum()).backward()
        save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def unsynced_rank(rank: int, world: int, out_dir: str) -> None:
    """With sync_codebook=False only rank 0 trains: any collective would wait for rank 1 and time out."""
    import datetime

    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    try:
        from vqdeploy import VectorQuantize

        if rank == 0:
            vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=2,
                                sync_codebook=False)
            mask = torch.ones(2, 10, dtype=torch.bool)
            for _ in range(2):
                vq(torch.randn(2, 10, 8), mask=mask)
            save_file({"initted": vq._codebook.initted}, os.path.join(out_dir, "rank0.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def padded_rank(rank: int, world: int, out_dir: str) -> None:
    """Rank 1's batch is all padding: dead codes must come from rank 0's real rows only."""
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        from vqdeploy import VectorQuantize

        torch.manual_seed(0)
        vq = VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=100)  # every code expires
        torch.manual_seed(1 + rank)
        x = torch.randn(2, 10, 8) + 5
        mask = torch.full((2, 10), rank == 0)
        vq(x, mask=mask)
        save_file({"embed": vq.codebook.contiguous(), "x": x}, os.path.join(out_dir, f"rank{rank}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
