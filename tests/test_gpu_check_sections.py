"""The GPU check's machinery on the CPU (benchmarks/gpu_check.py): sections share one time
budget and write their results as they finish; end-to-end times leave out the first call and
each call's planning batch; GPT-2's layers, built small, pass through diag_fim's rules to the
float64 loop; the Algorithm 1 run has data where scikit-learn is missing."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check

from fisher_fast.tasks.loaders.config import load_task_config


@pytest.fixture(autouse=True)
def fresh_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test records into lists of its own."""
    monkeypatch.setattr(gpu_check, "CHECKS", [])
    monkeypatch.setattr(gpu_check, "TIMINGS", [])


def test_sections_share_the_budget_and_write_as_they_finish(tmp_path: Path) -> None:
    results = tmp_path / "results.txt"
    seen: dict[str, float] = {}

    def note(name: str):
        def run(device: str, deadline: float) -> None:
            seen[name] = deadline - time.perf_counter()
            assert results.read_text().count("==") == len(seen) - 1  # the earlier ones written
            gpu_check.record_bool(name, "ran", True)

        return run

    def broken(device: str, deadline: float) -> None:
        raise RuntimeError("kernel exploded")

    chosen = [
        gpu_check.Section("first", note("first"), cap_s=5),
        gpu_check.Section("broken", broken),
        gpu_check.Section("greedy", note("greedy"), floor_s=20),  # needs more than is left
        gpu_check.Section("last", note("last"), floor_s=3),
    ]
    gpu_check.run_sections(chosen, "cpu", 15, results)
    assert set(seen) == {"first", "last"}
    assert 4 < seen["first"] <= 5, "its cap"
    assert 10 < seen["last"] <= 15, "what is left"
    text = results.read_text()
    assert [line.split(":")[0] for line in text.splitlines() if line.startswith("==")] == [
        "== first",
        "== broken",
        "== greedy",
        "== last",
    ]
    assert "FAIL: [broken] section ran" in text and "RuntimeError: kernel exploded" in text
    assert "SKIP: [greedy] skipped: time budget" in text


def test_a_warm_batch_leaves_out_the_first_call_and_the_planning_batch() -> None:
    """A method whose first call is slow throughout and whose first batch of every call is
    slow: the median is the time of the other batches."""
    calls: list[int] = []

    def run(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
        for i, _ in enumerate(batches):
            time.sleep(0.08 if not calls or i == 0 else 0.01)
        calls.append(1)
        return len(calls)

    batch = (torch.zeros(1), torch.zeros(1))
    timing = gpu_check.warm_batch_ms(run, [batch] * gpu_check.E2E_BATCHES, "cpu")
    assert 9 <= timing.ms < 40, timing
    assert timing.output == gpu_check.E2E_CALLS and timing.peak is None


def test_gpt2_layers_match_the_float64_loop_through_their_rules() -> None:
    """Every layer kind at 1/64 of GPT-2's widths and positions, on each backend that runs
    here (the compiled kernels; the Triton ones under its interpreter): an error per backend
    and a rule check per layer."""
    backends = gpu_check.fim_backends("cpu")
    if not backends:
        pytest.skip("neither the compiled library nor Triton's interpreter is here")
    gpu_check.check_gpt2_layers("cpu", time.perf_counter() + 120, scale=64)
    checks = gpu_check.CHECKS
    assert len(checks) == (len(backends) + 1) * len(gpu_check.GPT2_LAYERS)
    assert all(c.status == "PASS" for c in checks), [gpu_check.format_check(c) for c in checks]


def test_algorithm1_has_digits_without_scikit_learn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails
    options, what = gpu_check.algorithm1_data(tmp_path)
    assert options[0] == "--config" and "stand-in" in what
    suite = load_task_config(Path(options[1]))
    assert [t.name for t in suite.tasks] == ["detect 0", "detect 6", "0-3 + other", "all digits"]
    steps = gpu_check.algorithm1_steps(tmp_path, options)
    assert steps["search"][:3] == ["search", "--config", options[1]]
