"""The pipeline's Python API runs small probes on one CPU thread by default, as the CLI does,
and gives the caller's setting back afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pipeline_helpers import TINY_SETTINGS, digit_tasks

from fisher_fast.pipeline import build_dictionary
from fisher_fast.tasks import train as train_module


class Stop(Exception):
    """Ends the build at its first probe training: only the thread count there matters."""


@pytest.mark.parametrize(("threads", "expected"), [(None, 1), (2, 2)])
def test_build_dictionary_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int | None, expected: int
) -> None:
    seen: list[int] = []

    def first_training(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        raise Stop

    # Patched on the module that defines train_probe, where the dictionary's probe recipe
    # looks it up when it trains, so the test holds however the callers are arranged.
    monkeypatch.setattr(train_module, "train_probe", first_training)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with pytest.raises(Stop):
            build_dictionary(
                tmp_path, digit_tasks()[:1], TINY_SETTINGS, progress=False, threads=threads
            )
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen == [expected]
