"""Rank functions for the 2-rank gloo tests (spawned processes; results go to files in ``out_dir``)."""

import contextlib
import datetime
import faulthandler
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def process_group(rank: int, world: int, store: str, out_dir: str, timeout_s: float | None = None):
    """A gloo group over a file store (no port to collide on); a crash leaves a traceback in fault<rank>.log."""
    fault_log = open(os.path.join(out_dir, f"fault{rank}.log"), "w")
    faulthandler.enable(file=fault_log)
    torch.set_num_threads(1)
    timeout = {} if timeout_s is None else dict(timeout=datetime.timedelta(seconds=timeout_s))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, **timeout)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
        faulthandler.disable()
        fault_log.close()


def _save(tensors: dict, out_dir: str, rank: int) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))


def train_rank(rank: int, world: int, store: str, out_dir: str, options: dict, data_path: str, compiled: bool,
               quantizer: str = "VectorQuantize", micro_batches: int = 1) -> None:
    """Train a ``vqdeploy.<quantizer>`` on this rank's share of the batches and save the state; with
    ``micro_batches`` > 1 each share is split, and all but the last part only accumulate EMA statistics."""
    with process_group(rank, world, store, out_dir):
        import torch._inductor.config as inductor_config
        import vqdeploy

        torch.manual_seed(0)
        vq = getattr(vqdeploy, quantizer)(**options)  # sync_codebook=None: synchronised, torch.distributed is up
        assert all(layer.sync_codebook for layer in getattr(vq, "layers", [vq]))
        model = torch.compile(vq, fullgraph=True) if compiled else vq
        inductor_config.fallback_random = True
        batches = load_file(data_path)["batches"]
        share = batches.shape[1] // world
        torch.manual_seed(1 + rank)
        for step in range(batches.shape[0]):
            parts = batches[step, rank * share:(rank + 1) * share].chunk(micro_batches)
            for i, part in enumerate(parts):
                x = part.clone().requires_grad_()
                kwargs = dict(accum_ema_update=True) if i < len(parts) - 1 else {}
                quantized, indices, loss = model(x, **kwargs)
                (quantized.sum() + loss.sum()).backward()
        _save(vq.state_dict(), out_dir, rank)


def lfq_rank(rank: int, world: int, store: str, out_dir: str, options: dict, data_path: str,
             compiled: bool) -> None:
    """One LFQ training step on this rank's share of ``x`` (with its mask); the task loss is scaled by the world
    size so that the mean of the ranks' losses is one process's loss on the whole batch (DDP averages)."""
    with process_group(rank, world, store, out_dir):
        import vqdeploy

        torch.manual_seed(0)
        lfq = vqdeploy.LFQ(**options)
        model = torch.compile(lfq, fullgraph=True) if compiled else lfq
        data = load_file(data_path)
        share = data["x"].shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        x = data["x"][rows].clone().requires_grad_()
        out, breakdown = model(x, mask=data["mask"][rows], return_loss_breakdown=True)
        (world * (out.quantized * data["grad"][rows]).sum() + out.entropy_aux_loss).backward()
        _save({"loss": out.entropy_aux_loss.detach(), "per_sample_entropy": breakdown.per_sample_entropy.detach(),
               "batch_entropy": breakdown.batch_entropy.detach(), "x_grad": x.grad,
               **{f"grad.{name}": p.grad for name, p in lfq.named_parameters()}}, out_dir, rank)


def unsynced_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """With sync_codebook=False only rank 0 trains: any collective would wait for rank 1 and time out."""
    with process_group(rank, world, store, out_dir, timeout_s=30):
        from vqdeploy import VectorQuantize

        if rank == 0:
            vq = VectorQuantize(dim=8, codebook_size=16, kmeans_init=True, threshold_ema_dead_code=2,
                                sync_codebook=False)
            mask = torch.ones(2, 10, dtype=torch.bool)
            for _ in range(2):
                vq(torch.randn(2, 10, 8), mask=mask)
            _save({"initted": vq._codebook.initted}, out_dir, rank)


def padded_rank(rank: int, world: int, store: str, out_dir: str) -> None:
    """Rank 1's batch is all padding: dead codes must come from rank 0's real rows only."""
    with process_group(rank, world, store, out_dir):
        from vqdeploy import VectorQuantize

        torch.manual_seed(0)
        vq = VectorQuantize(dim=8, codebook_size=16, threshold_ema_dead_code=100)  # every code expires
        torch.manual_seed(1 + rank)
        x = torch.randn(2, 10, 8) + 5
        vq(x, mask=torch.full((2, 10), rank == 0))
        _save({"embed": vq.codebook, "x": x}, out_dir, rank)
