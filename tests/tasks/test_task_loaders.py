"""Every reader: tiny files written here in each format, read back, and clear errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from task_files import (
    CIFAR100_FINE,
    write_cifar10,
    write_cifar100,
    write_idx,
    write_image_folder,
    write_mnist,
)

from fisher_fast.tasks import DataSource, load_task_config
from fisher_fast.tasks.loaders import (
    cifar10_source,
    cifar100_source,
    digits_source,
    folder_source,
    mnist_source,
    npz_source,
    read_idx,
)
from fisher_fast.tasks.suites import IMAGENET_FOLDERS, IMAGENET_TASKS, imagenet_folder_suite

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, dtype: type, suffix: str) -> None:
    array = (
        (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
        if dtype != np.uint8
        else np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    )
    write_idx(tmp_path / f"a.idx{suffix}", array)
    read = read_idx(tmp_path / f"a.idx{suffix}")
    assert read.dtype == np.dtype(dtype) and read.shape == (2, 3, 5)
    np.testing.assert_array_equal(read, array)


def test_idx_rejects_bad_and_truncated_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "ok", np.zeros((4, 3), dtype=np.uint8))
    (tmp_path / "cut").write_bytes((tmp_path / "ok").read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "cut")


@pytest.mark.parametrize(("gz", "sub"), [(True, "."), (False, "MNIST/raw")])
def test_mnist_reads_gzipped_or_plain_files(tmp_path: Path, gz: bool, sub: str) -> None:
    arrays = write_mnist(tmp_path / sub, gz=gz)
    data = mnist_source(tmp_path).data()
    assert data.train.x.shape == (40, 1, 28, 28) and data.train.x.dtype == torch.uint8
    assert data.test is not None and data.test.x.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(data.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert data.names["7"] == (7,)


def test_missing_mnist_says_what_is_expected_where(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\].*does not download"
    ):
        mnist_source(tmp_path)


def test_cifar10_round_trip(tmp_path: Path) -> None:
    batches = write_cifar10(tmp_path)
    data = cifar10_source(tmp_path).data()
    assert data.train.x.shape == (100, 3, 32, 32) and data.train.x.dtype == torch.uint8
    assert data.test is not None and len(data.test) == 20
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32.
    np.testing.assert_array_equal(data.train.x[0].numpy().reshape(-1), batches["data_batch_1"][0])
    assert data.names["truck"] == (9,) and data.names["automobile"] == (1,)


def test_cifar100_names_cover_superclasses(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    data = cifar100_source(tmp_path / "cifar-100-python").data()
    assert data.train.x.shape == (100, 3, 32, 32)
    assert data.names["bicycle"] == (0,)
    assert data.names["vehicles_2"] == (5, 6, 7, 8, 9)
    assert sorted(data.names) == sorted(
        [*CIFAR100_FINE, *(f for fs in CIFAR100_FINE.values() for f in fs)]
    )


def test_cifar_pickles_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump(
            {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "hook": print}, f, protocol=2
        )
    with pytest.raises(ValueError, match=r"refusing to load .*print"):
        cifar10_source(tmp_path).data()


def test_missing_cifar_says_what_is_expected_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_batch_1.*cifar-10-batches-py"):
        cifar10_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="train, test, meta"):
        cifar100_source(tmp_path)


def test_image_folder_draws_train_and_test_images_per_class(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "train", ["a", "b", "c"], per_class=6)
    source = folder_source(
        tmp_path, {"cat": "b", "dog": "c"}, images_per_class=5, train_per_class=3, image_size=8
    )
    data = source.data()
    assert data.train.x.shape == (6, 3, 8, 8) and data.train.x.dtype == torch.uint8
    assert data.test is not None and data.test.y.tolist() == [0, 0, 1, 1]
    assert data.names == {"cat": (0,), "dog": (1,)}
    # Solid colours survive resizing: folder "c" (class index 2 in the tree) has red 20.
    assert set(data.train.x[data.train.y == 1][:, 0].unique().tolist()) == {20}
    # The draw is seeded: the same files, hence the same key, every time.
    assert (
        folder_source(
            tmp_path, {"cat": "b", "dog": "c"}, images_per_class=5, train_per_class=3, image_size=8
        ).key
        == source.key
    )


def test_image_folder_errors_name_the_folder(tmp_path: Path) -> None:
    write_image_folder(tmp_path, ["a"], per_class=3)
    with pytest.raises(FileNotFoundError, match=r"folder .*missing holds 0 images"):
        folder_source(tmp_path, {"x": "missing"}, images_per_class=3, train_per_class=2)
    with pytest.raises(FileNotFoundError, match="holds 3 images, but 5 are needed"):
        folder_source(tmp_path, {"x": "a"}, images_per_class=5, train_per_class=4)


def test_imagenet_folder_suite_reads_the_users_class_map(tmp_path: Path) -> None:
    used = sorted({n for names in IMAGENET_TASKS.values() for n in names})
    folders = {name: f"class{i:02d}" for i, name in enumerate(used)}
    write_image_folder(tmp_path, list(folders.values()), per_class=3, size=(6, 6))
    (tmp_path / "class_map.json").write_text(json.dumps(folders))
    suite = imagenet_folder_suite(tmp_path, images_per_class=3, train_per_class=2, image_size=6)
    assert [t.num_classes for t in suite.tasks] == [10, 10, 10, 10] and suite.head_width == 10
    splits = suite.tasks[1].splits()
    assert splits.test.x.shape == (10, 3, 6, 6) and splits.train.x.dtype == torch.float32
    assert set(used) <= set(IMAGENET_FOLDERS)
    with pytest.raises(ValueError, match="no folder for"):
        imagenet_folder_suite(tmp_path, class_map={"tench": "class00"})


def test_npz_round_trip(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).random((10, 3)).astype(np.float32), np.arange(10) % 2
    np.savez(
        tmp_path / "d.npz",
        x=x,
        y=y,
        x_test=x[:4],
        y_test=y[:4],
        label_names=np.array(["even", "odd"]),
    )
    data = npz_source(tmp_path / "d.npz").data()
    np.testing.assert_array_equal(data.train.x.numpy(), x)
    assert data.test is not None and data.test.y.tolist() == [0, 1, 0, 1]
    assert data.names == {"even": (0,), "odd": (1,)}
    np.savez(tmp_path / "bad.npz", x=x)
    with pytest.raises(ValueError, match="must hold arrays x and y"):
        npz_source(tmp_path / "bad.npz").data()


def test_json_config_defines_tasks(tmp_path: Path) -> None:
    x, y = np.random.default_rng(0).random((60, 1, 4, 4)).astype(np.float32), np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y, label_names=np.array(["a", "b", "c"]))
    spec: dict[str, Any] = {
        "name": "mine",
        "source": {"format": "npz", "path": "d.npz"},
        "arch": "cnn",
        "epsilon": 0.2,
        "train": {"epochs": 2, "lr": 0.01},
        "task_defaults": {"data_seed": 3},
        "tasks": [
            {"name": "detect a", "classes": [["a"]], "other": True},
            {"name": "a or b, c", "classes": [["a", 1], "c"], "balance": False},
        ],
    }
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    suite = load_task_config(tmp_path / "tasks.json")
    assert (suite.name, suite.default_arch, suite.epsilon, suite.train.epochs) == (
        "mine",
        "cnn",
        0.2,
        2,
    )
    detect, pair = suite.tasks
    assert detect.source is pair.source and detect.data_seed == 3
    assert pair.groups == (("a", 1), ("c",)) and not pair.balance
    assert torch.bincount(pair.splits().test.y).tolist() == [10, 5]
    spec["tasks"][0]["clases"] = [0]
    (tmp_path / "tasks.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"unknown keys \['clases'\]"):
        load_task_config(tmp_path / "tasks.json")


def test_digits_source() -> None:
    data = digits_source().data()
    assert data.train.x.shape == (1797, 1, 8, 8) and data.test is None
    assert float(data.train.x.min()) >= 0.0 and float(data.train.x.max()) == 1.0


def test_sources_from_python_objects() -> None:
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    a = DataSource.from_tensors("t", x, y)
    b = DataSource.from_dataset("t", list(zip(x, y.tolist(), strict=True)))
    assert a.key == b.key
    torch.testing.assert_close(b.data().train.x, x)
    assert DataSource.from_tensors("t", x + 1, y).key != a.key
