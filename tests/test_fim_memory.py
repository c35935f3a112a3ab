"""Peak memory of diag_fim does not grow with the number of samples.

Each measurement runs in a fresh process and reads the kernel's peak resident set size
(VmHWM), since PyTorch's CPU allocations are invisible to tracemalloc. The data set itself is
generated batch by batch, so only diag_fim's own working memory can grow with N. glibc's
adaptive mmap threshold makes the heap's peak drift upward over the first tens of batches
whatever the program does (fragmentation, not live memory), so the threshold is pinned.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from layer_models import Scale
from torch import nn

import fisher_fast

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


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return model, torch.randn(20, 6)


def _transformer() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Embedding(10, 8),
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        Scale(8),  # no rule: the torch.func fallback
        nn.Flatten(),
        nn.Linear(8 * 5, 3),
    )
    return model, torch.randint(0, 10, (20, 5))


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=2),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    return model, torch.randn(20, 2, 6, 6)


@pytest.mark.parametrize("make", [_mlp, _cnn, _transformer], ids=["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_nothing_outlives_the_call(make, fisher: str) -> None:
    """Once the result is dropped, neither it nor any activation of the batch stays alive.

    Recorded inputs are other modules' tapped outputs, whose gradient hooks refer back to the
    recorder: a cycle through autograd's C++ graph that Python's garbage collector cannot break,
    so diag_fim must drop them itself (it once kept 5.5 MiB per call of the benchmark MLP)."""
    torch.manual_seed(0)
    model, x = make()
    y = torch.randint(0, 3, (x.shape[0],))
    activations: list[weakref.ref] = []
    for layer in model:
        layer.register_forward_hook(lambda m, i, o: activations.append(weakref.ref(o)))
    fim = fisher_fast.diag_fim(model, (x, y), fisher=fisher, batch_size=8, progress=False)
    result = weakref.ref(fim.flat)
    del fim
    gc.collect()
    assert len(activations) > len(model)  # the hooks saw the passes
    assert result() is None
    assert [a for a in activations if a() is not None] == []
