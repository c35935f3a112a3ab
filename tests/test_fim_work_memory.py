"""The rules' temporary-work bound: fixed on the CPU, a clamped share of free memory on CUDA."""

from __future__ import annotations

import pytest
import torch

from fisher_fast.fim.work_memory import GPU_MAX_BYTES, GPU_MIN_BYTES, work_bytes

GIB = 2**30


def test_the_cpu_keeps_the_callers_bound() -> None:
    assert work_bytes(torch.device("cpu"), 4 * 2**20) == 4 * 2**20


@pytest.mark.parametrize(
    ("free", "expected"),
    [(4 * GIB, GIB // 2), (100 * GIB, GPU_MAX_BYTES), (64 * 2**20, GPU_MIN_BYTES)],
    ids=["share", "capped", "floor"],
)
def test_cuda_takes_a_share_of_the_free_memory(
    free: int, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return free, 141 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert work_bytes(torch.device("cuda", 1), 4 * 2**20) == expected
    assert asked == [torch.device("cuda", 1)]
