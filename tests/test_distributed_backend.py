"""The process group's backend follows the device the work runs on: gloo for the CPU, nccl for
CUDA (each process on its own GPU), whether CUDA exists or not; a backend that cannot carry the
device's tensors is refused with the fix; every command run under torchrun passes ``--device``.

``torch.distributed.init_process_group`` is replaced by a recorder (no group starts), except in
the last test, which starts a real gloo group of one process."""

from __future__ import annotations

import argparse
import datetime
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_helpers import free_port, loopback_env

from fisher_fast import distributed
from fisher_fast.cli import main
from fisher_fast.commands.common import in_process_group

COMMANDS = {
    "distance": ["distance", "--seeds", "1"],
    "demo": ["demo"],
    "dictionary-build": ["dictionary", "build", "--out", "unused"],
    "search": ["search", "--target", "2", "--dictionary", "unused"],
}
"""Every command that runs in the torchrun process group (commands/common.in_process_group)."""


class Stop(ValueError):
    """Raised by the recorder instead of starting a group: the CLI reports it and exits 2."""


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """torchrun's variables set (rank 1 of 2), and the calls of init_process_group (each one
    then raises :class:`Stop`) and of torch.cuda.set_device recorded in the returned list."""
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for name, value in loopback_env(1, 2, 29999).items():
        monkeypatch.setenv(name, value)
    calls: list[dict[str, Any]] = []

    def init(backend: str, **kwargs: Any) -> None:
        calls.append({"backend": backend, **kwargs})
        raise Stop("recorded")

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append({"gpu": i}))
    return calls


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine seems to have two GPUs (nothing touches them: set_device is recorded)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize(
    ("device", "backend", "expected"),
    [
        ("cpu", None, "gloo"),
        (torch.device("cpu"), "gloo", "gloo"),
        ("cuda", None, "nccl"),
        ("cuda:1", None, "nccl"),
        ("cuda", "gloo", "gloo"),  # gloo carries CUDA tensors too, more slowly
        ("meta", None, "gloo"),
    ],
)
def test_the_backend_follows_the_device(device: Any, backend: str | None, expected: str) -> None:
    assert distributed.backend_for(device, backend) == expected


def test_without_a_device_both_backends_where_cuda_exists(two_gpus: None) -> None:
    assert distributed.backend_for(None) == "cpu:gloo,cuda:nccl"
    assert distributed.backend_for(None, "gloo") == "gloo"


def test_without_a_device_or_cuda_gloo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.backend_for(None) == "gloo"


def test_nccl_for_cpu_work_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"nccl .* CUDA tensors.*backend='gloo'.*--device cuda"):
        distributed.backend_for("cpu", "nccl")


def test_cpu_work_starts_gloo_on_a_machine_with_gpus(
    started: list[dict[str, Any]], two_gpus: None
) -> None:
    """The bug this fixes: CUDA present, work on the CPU, yet nccl was started."""
    timeout = datetime.timedelta(minutes=3)
    with pytest.raises(Stop):
        distributed.init_from_env(timeout, device="cpu")
    assert started == [{"backend": "gloo", "timeout": timeout}]


@pytest.mark.parametrize(("device", "gpu"), [("cuda", 1), ("cuda:0", 0)])
def test_cuda_work_starts_nccl_on_the_processes_own_gpu(
    device: str, gpu: int, started: list[dict[str, Any]], two_gpus: None
) -> None:
    """A plain ``cuda`` is the GPU of LOCAL_RANK (1 here); an index is kept."""
    with pytest.raises(Stop):
        distributed.init_from_env(device=device)
    assert [c.get("gpu", c.get("backend")) for c in started] == [gpu, "nccl"]


def test_more_processes_than_gpus_is_refused(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, two_gpus: None
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"cuda:2 \(LOCAL_RANK 2\).*has 2; start at most one"):
        distributed.init_from_env(device="cuda")
    assert started == []


def test_cuda_work_without_a_gpu_is_refused(
    started: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"no usable GPU; run on the CPU \(--device cpu"):
        distributed.init_from_env(device="cuda")
    assert started == []


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_every_command_passes_its_device(
    command: str,
    device: str,
    backend: str,
    started: list[dict[str, Any]],
    two_gpus: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--device`` reaches the process group before any work; the recorder's refusal is
    reported as the command's error."""
    assert main([*COMMANDS[command], "--device", device, "--quiet"]) == 2
    assert [c["backend"] for c in started if "backend" in c] == [backend]
    assert "error: recorded" in capsys.readouterr().err


def test_a_real_gloo_group_for_cpu_work(
    monkeypatch: pytest.MonkeyPatch, two_gpus: None, one_thread: None
) -> None:
    """One process, torchrun's variables, a machine that seems to have GPUs: the command runs
    in a gloo group, which is gone afterwards."""
    for name, value in loopback_env(0, 1, free_port()).items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(device="cpu", dist_timeout=1.0)
    seen: list[str] = []

    def run(parsed: argparse.Namespace) -> int:
        seen.append(str(dist.get_backend()))
        return 0

    assert in_process_group(run)(args) == 0
    assert seen == ["gloo"] and not dist.is_initialized()
