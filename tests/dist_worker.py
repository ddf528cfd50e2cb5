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
