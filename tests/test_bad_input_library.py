"""Bad input to the library (issue #12): each case is refused with an error that names the
problem and the fix, or, where the input is unambiguous, accepted."""

from __future__ import annotations

import json
import multiprocessing
import warnings
from pathlib import Path

import pytest
import torch
from fim_values import random_fim, reference_frechet
from torch import nn

from fisher_fast import (
    DiagFIM,
    TaskDictionary,
    build_dictionary,
    check,
    diag_fim,
    frechet_distance,
    frechet_distances,
)
from fisher_fast.pipeline.dictionary import INDEX_FILE, DictionaryError


def diag(names: list[str], shapes: list[tuple[int, ...]], flat: torch.Tensor) -> DiagFIM:
    return DiagFIM(flat, names, shapes, n_samples=1, fisher="empirical")


# -- Fréchet distance: DiagFIMs are matched by name ------------------------------------------


def test_diag_fims_with_other_names_are_refused(gen: torch.Generator) -> None:
    a = diag(["w", "b"], [(3,), (2,)], random_fim(5, gen))
    b = diag(["w", "c"], [(3,), (2,)], random_fim(5, gen))
    with pytest.raises(ValueError, match=r"F_b and F_a name different .*missing \['b'\].*\['c'\]"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match=r"FIM 1 and the reference FIM name different"):
        frechet_distances(a, [a, b])


def test_diag_fims_with_other_shapes_are_refused(gen: torch.Generator) -> None:
    a = diag(["w", "b"], [(2, 3), (2,)], random_fim(8, gen))
    b = diag(["w", "b"], [(3, 2), (2,)], random_fim(8, gen))
    with pytest.raises(
        ValueError, match=r"F_b 'w' has shape \(3, 2\) but the reference has \(2, 3\)"
    ):
        frechet_distance(a, b)


def test_diag_fims_in_another_order_are_matched_by_name(gen: torch.Generator) -> None:
    w, bias = random_fim(6, gen), random_fim(2, gen)
    a = diag(["w", "b"], [(6,), (2,)], torch.cat([w, bias]))
    b = diag(["b", "w"], [(2,), (6,)], torch.cat([bias, w]))
    assert float(frechet_distance(a, b)) == pytest.approx(0.0, abs=1e-7)
    other = {"w": random_fim(6, gen), "b": random_fim(2, gen)}
    expected = reference_frechet(a.flat, torch.cat([other["w"], other["b"]]))
    assert float(frechet_distance(a, other)) == pytest.approx(expected, abs=1e-7)
    assert float(frechet_distance(other, b)) == pytest.approx(expected, abs=1e-7)


# -- DiagFIM files: checksum, metadata, device -------------------------------------------------


def saved_fim(tmp_path: Path, gen: torch.Generator) -> Path:
    path = tmp_path / "fim.safetensors"
    diag(["w", "b"], [(40,), (8,)], random_fim(48, gen)).save(path)
    return path


def rewrite_metadata(path: Path, change: dict[str, str | None]) -> None:
    """Rewrite a DiagFIM file with some metadata fields changed (None: removed)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, flat = dict(f.metadata()), f.get_tensor("flat")
    for key, value in change.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    save_file({"flat": flat}, str(path), metadata=metadata)


def test_flipped_data_bytes_are_detected(tmp_path: Path, gen: torch.Generator) -> None:
    path = saved_fim(tmp_path, gen)
    raw = bytearray(path.read_bytes())
    for i in (-5, -37):  # two bytes of the data, which is at the end of the file
        raw[i] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"fim.safetensors is corrupted: .*recompute .* copy"):
        DiagFIM.load(path)


def test_file_without_checksum_loads_with_a_warning(tmp_path: Path, gen: torch.Generator) -> None:
    path = saved_fim(tmp_path, gen)
    expected = DiagFIM.load(path).flat
    rewrite_metadata(path, {"sha256": None})
    with pytest.warns(UserWarning, match="has no checksum"):
        assert torch.equal(DiagFIM.load(path).flat, expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"names": None}, r"fim.safetensors is incomplete: its metadata has no 'names' field"),
        ({"shapes": "[[40], [8]"}, r"fim.safetensors is damaged: its metadata field 'shapes'"),
        ({"meta": "{not json"}, r"fim.safetensors is damaged: its metadata field 'meta'"),
        ({"names": '["w"]'}, r"fim.safetensors is damaged: 1 names and shapes"),
    ],
    ids=["no-names", "bad-shapes-json", "bad-meta-json", "names-do-not-fit"],
)
def test_bad_metadata_names_the_file_and_field(
    tmp_path: Path, gen: torch.Generator, change: dict[str, str | None], message: str
) -> None:
    path = saved_fim(tmp_path, gen)
    rewrite_metadata(path, change)
    with pytest.raises(ValueError, match=message):
        DiagFIM.load(path)


def test_save_is_still_atomic(tmp_path: Path, gen: torch.Generator) -> None:
    path = saved_fim(tmp_path, gen)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh file has its checksum: no warning
        DiagFIM.load(path)


@pytest.mark.parametrize("device", ["cuda:7", "bogus:0"])
def test_load_to_a_missing_device(tmp_path: Path, gen: torch.Generator, device: str) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    path = saved_fim(tmp_path, gen)
    with pytest.raises(
        ValueError, match=r"DiagFIM.load\(.*\): .*(not available|not a device).* use one of cpu"
    ):
        DiagFIM.load(path, device=device)


# -- diag_fim and check: dtypes, batch sizes, forms of data ------------------------------------


class TwoInputs(nn.Module):
    """A model of two inputs, called as model(a, b) or model(a=..., b=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a + b)


def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return nn.Linear(4, 3), torch.randn(10, 4, generator=gen), torch.arange(10) % 3


def test_float64_model_with_float32_inputs() -> None:
    model, x, y = problem()
    with pytest.raises(
        TypeError,
        match=r"model's parameters are float64 but the inputs are float32; convert one, "
        r"e.g. model.float\(\) or x.double\(\)",
    ):
        diag_fim(model.double(), (x, y), progress=False)


def test_batch_size_zero_in_check() -> None:
    model, x, y = problem()
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        check(model, (x, y), batch_size=0, verbose=False)


def test_list_of_inputs_and_targets_is_refused_with_the_accepted_forms() -> None:
    model, x, y = problem()
    with pytest.raises(ValueError, match=r"list of two tensors .* pass a tuple \(X, y\)"):
        diag_fim(model, [x, y], progress=False)


def test_unambiguous_pairs_are_accepted() -> None:
    model, x, y = problem()
    two = TwoInputs()
    two.fc = model
    expected = diag_fim(model, (2 * x, y), progress=False).flat
    for data in [({"a": x, "b": x}, y), [{"a": x, "b": x}, y], ((x, x), y)]:
        got = diag_fim(two, data, batch_size=4, progress=False).flat
        torch.testing.assert_close(got, expected)


def test_a_dict_alone_is_refused_with_the_accepted_forms() -> None:
    model, x, _ = problem()
    with pytest.raises(TypeError, match=r"data is a dict; diag_fim takes a DataLoader"):
        diag_fim(model, {"input": x}, fisher="exact", progress=False)


# -- task dictionary: concurrent builds, version field -----------------------------------------


def build_some(root: str, indices: list[int]) -> list[str]:
    """One process's build of some digits tasks into ``root`` (run in a subprocess)."""
    from pipeline.pipeline_helpers import TINY_SETTINGS, digit_tasks

    tasks = [digit_tasks()[i] for i in indices]
    return build_dictionary(root, tasks, TINY_SETTINGS, progress=False).names()


def test_two_processes_building_one_dictionary_keep_both_entries(tmp_path: Path) -> None:
    from pipeline.pipeline_helpers import digit_tasks

    root = str(tmp_path / "dictionary")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = [pool.apply_async(build_some, (root, [i])) for i in (0, 1)]
        for r in results:
            r.get(timeout=300)
    dictionary = TaskDictionary.open(root)  # verifies every probe
    names = {digit_tasks()[i].name for i in (0, 1)}
    assert set(dictionary.names()) == names
    assert len(list((tmp_path / "dictionary" / "probes").iterdir())) == 2


def test_a_version_written_as_a_string(tmp_path: Path) -> None:
    root = tmp_path / "d"
    from pipeline.pipeline_helpers import TINY_SETTINGS

    TaskDictionary.create(root, TINY_SETTINGS)
    index = root / INDEX_FILE
    index.write_text(json.dumps({**json.loads(index.read_text()), "version": "1"}))
    with pytest.raises(DictionaryError, match=r"format version '1', a str, where a whole number"):
        TaskDictionary.open(root)
