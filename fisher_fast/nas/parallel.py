"""Data-parallel training steps for the searches on torch.distributed (DistributedDataParallel).

Inside a process group of N ranks every rank draws the same global batch (the batches come from
generators seeded alike on every rank), keeps its contiguous shard of it
(:func:`fisher_fast.distributed.shard_range`), and the gradients are summed over ranks: network
weights by DDP's all-reduce, FUSE's α (a few numbers, outside DDP's forward) by one
``all_reduce`` (:func:`average_gradients`). The loss of a shard is its summed cross-entropy divided by the *global* batch
size (times N, which DDP divides by), so the reduced gradient is the mean over the global batch
exactly as one process computes it, also when the shards are uneven.

What differs from one process: on the CPU (gloo), BatchNorm in training mode normalises each
rank's shard with the shard's own statistics, and DDP keeps the running statistics of rank 0.
On GPUs (nccl, one per rank, see :func:`fisher_fast.distributed.init_from_env`) the BatchNorm
layers become SyncBatchNorm, which normalises with the statistics of the global batch as one
process does. A run on N processes is reproducible for that N; it matches the one-process run
to float rounding for networks without BatchNorm (or, on GPUs, with it). Without a process
group these functions are the plain single-process steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fisher_fast.distributed import shard_range, world_size
from fisher_fast.part import Part


def data_parallel(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel inside a process group of several ranks
    (its gradients are then all-reduced in backward), else ``model`` itself. On a GPU its
    BatchNorm layers are first made SyncBatchNorm, in place (they keep their parameters and
    buffers, so optimisers built on ``model`` still hold them)."""
    if world_size() == 1:
        return model
    device = next(model.parameters()).device
    if device.type != "cuda":
        return DistributedDataParallel(model)
    return DistributedDataParallel(with_sync_batchnorm(model), device_ids=[device])


def with_sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` itself, its BatchNorm layers replaced in place by SyncBatchNorm layers that
    hold the same parameter and buffer tensors (optimisers built on ``model`` keep working;
    the running statistics stay the model's)."""
    for name, child in list(model.named_children()):
        setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return model


def shard_loss(forward: Callable[[torch.Tensor], torch.Tensor], batch: Part) -> torch.Tensor:
    """Cross-entropy of the logits ``forward(x)`` on this rank's shard of the global ``batch``,
    scaled so that the gradients averaged over ranks (by DDP, or :func:`average_gradients`) are
    those of the mean loss over the whole batch."""
    index = shard_range(len(batch))
    logits = forward(batch.x[index.start : index.stop])
    total = F.cross_entropy(logits, batch.y[index.start : index.stop], reduction="sum")
    return total * (world_size() / len(batch))


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Average the gradients of ``parameters`` (not managed by DDP) over the ranks, matching
    the scaling of :func:`shard_loss`; nothing without a process group."""
    n = world_size()
    if n == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(n)


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), which the last training
    forward updated from each rank's own shard: evaluations, and the choices made from them,
    are then the same on every rank. Nothing without a process group."""
    if world_size() == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
