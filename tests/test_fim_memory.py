"""Peak memory of diag_fim does not grow with the number of samples.

Each measurement runs in a fresh process and reads the kernel's peak resident set size
(VmHWM), since PyTorch's CPU allocations are invisible to tracemalloc. The data set itself is
generated batch by batch, so only diag_fim's own working memory can grow with N. glibc's
adaptive mmap threshold makes the heap's peak drift upward over the first tens of batches
whatever the program does (fragmentation, not live memory), so the threshold is pinned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import fisher_fast

    def peak_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1])

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()
    batches = int(sys.argv[1])
    def data():
        g = torch.Generator().manual_seed(1)
        for _ in range(batches):
            yield torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)
    fisher_fast.diag_fim(model, data(), max_samples=64, progress=False, backend=sys.argv[2])  # warm-up
    before = peak_kib()
    fim = fisher_fast.diag_fim(model, data(), progress=False, backend=sys.argv[2])
    assert fim.n_samples == 64 * batches
    print(peak_kib() - before, before)
    """
)


def _peak_growth_kib(batches: int, backend: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(batches), backend],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    ).stdout.split()
    return int(out[0])


@pytest.mark.parametrize("backend", ["torch", "kernels"])
def test_peak_memory_is_flat_in_samples(backend: str) -> None:
    small = _peak_growth_kib(2, backend)
    large = _peak_growth_kib(16, backend)  # 8x the samples
    # Growth beyond the warm-up peak must not scale with N (one batch of this model is ~3 MiB
    # of input and ~40 MiB of activations); allow 4 MiB of allocator noise.
    assert large <= small + 4 * 1024, (
        f"peak grew by {small} KiB for 128 samples and {large} KiB for 1024"
    )
