"""Data-parallel training over several processes (GPUs, or CPU processes with gloo) on fastai + accelerate.

Launch any `melafast train` with torchrun or accelerate; each process trains on its share of every batch, the
validation AUC is computed over the whole validation set (gathered from every process), and only rank 0 writes:

    torchrun --standalone --nproc_per_node 4 -m melafast train --fold 0 --lr 2e-3 ...
    accelerate launch --multi_gpu --num_processes 4 -m melafast train --fold 0 --lr 2e-3 ...
"""

from __future__ import annotations

import os

import torch

from ..processes import is_main, world_size

__all__ = ["init_distributed", "barrier", "broadcast_object", "process_device",
           "sync_batchnorm", "to_distributed"]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed() -> bool:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPUs); False when running as a single process."""
    if world_size() <= 1:
        return False
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group(backend=_backend())
    return True


def barrier():
    """Wait for every process (no-op for one process)."""
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` in every process (e.g. a run folder name made from the clock)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def process_device() -> torch.device | None:
    """This process's GPU when distributed on GPUs; None (the default device) otherwise."""
    if world_size() > 1 and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return None


def sync_batchnorm(model):
    """`model` with every batch norm synchronised across processes, in place; returns `model`.

    torch's `convert_sync_batchnorm` (what fastai's `DistributedTrainer(sync_bn=True)` calls) turns timm's
    `BatchNormAct2d`, a batch norm with its activation fused in, into a plain `SyncBatchNorm` and drops the
    activation: the network trained and validated would then differ from the one `load_predictor` rebuilds from its
    weights. timm's conversion keeps the activation (`SyncBatchNormAct`). Parameters and buffers are the same
    tensors, and the state dict keys do not change, so the saved weights load into the plain model.
    """
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def to_distributed(learn):
    """Make `learn` train data-parallel across the launcher's processes; returns `learn`.

    fastai's own `DistributedTrainer` broadcasts the shuffled indices through CUDA tensors; melafast's subclass
    keeps them on the CPU under gloo, so the same code runs on CPU-only machines. On GPUs batch norm is synchronised
    with timm's conversion (`sync_batchnorm`), never fastai's, which would change the network.
    """
    from fastai.distributed import DistributedDL, DistributedTrainer

    class _DL(DistributedDL):
        def _broadcast(self, t, rank):
            t = torch.tensor(t, dtype=torch.long, device="cuda" if _backend() == "nccl" else "cpu")
            torch.distributed.broadcast(t, rank)
            return t.cpu().tolist()

    class _Trainer(DistributedTrainer):
        def _wrap_dl(self, dl):
            return dl if isinstance(dl, DistributedDL) else _DL(dl, device=self.learn.dls.device)

    cuda = torch.device(learn.dls.device or "cpu").type == "cuda"
    if cuda:  # SyncBatchNorm trains only on GPUs; on CPUs each process keeps its own batch statistics
        learn.model = sync_batchnorm(learn.model)
    learn.add_cb(_Trainer(sync_bn=False, cpu=not cuda))
    if not is_main() and hasattr(learn, "progress"):  # a bar or the log lines: rank 0's is enough
        learn.remove_cb(learn.progress)
    return learn
