"""How many bytes of temporary per-sample work (im2col patches, per-sample products) a rule may
hold at once.

On the CPU the work is cut into pieces that stay in the caches and the allocator's reused heap,
so the size is fixed by the caller (a few MiB). On a GPU such pieces would mean thousands of
small kernel launches per batch; there the bound follows the memory that is actually free, so
that a large GPU takes the work in a few large steps and a nearly full one still fits.
"""

from __future__ import annotations

import torch

GPU_SHARE = 8  # at most this fraction (1/GPU_SHARE) of the free device memory
GPU_MIN_BYTES = 16 * 2**20
GPU_MAX_BYTES = 2**30


def work_bytes(device: torch.device, cpu_bytes: int) -> int:
    """``cpu_bytes`` on the CPU; on CUDA an eighth of the device's free memory, clamped to
    [16 MiB, 1 GiB] (a driver query, no stream synchronisation)."""
    if device.type != "cuda":
        return cpu_bytes
    free, _total = torch.cuda.mem_get_info(device)
    return max(GPU_MIN_BYTES, min(GPU_MAX_BYTES, free // GPU_SHARE))
