"""Class mapping, balancing, splits and the suites' task definitions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from task_files import (
    blob_source,
    leaks,
    write_cifar10,
    write_cifar100,
    write_mnist,
)

from fisher_fast.part import stratified_split
from fisher_fast.tasks import DataSource, Suite, Task, TrainConfig, get_suite
from fisher_fast.tasks.balance import DROPPED, balanced_indices, task_labels

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: extra threads only contend


def test_task_labels_map_groups_other_and_dropped() -> None:
    y = torch.tensor([0, 1, 2, 3, 4, 5, 3])
    assert task_labels(y, [(3,), (0, 5)], other=True).tolist() == [1, 2, 2, 0, 2, 1, 0]
    assert task_labels(y, [(3,), (0, 5)], other=False).tolist() == [
        1,
        DROPPED,
        DROPPED,
        0,
        DROPPED,
        1,
        0,
    ]


def test_detector_keeps_all_positives_and_as_many_random_negatives() -> None:
    labels = torch.tensor([0] * 7 + [1] * 30)
    keep = balanced_indices(labels, 1, True, torch.Generator().manual_seed(0))
    assert (labels[keep] == 0).sum() == 7 and (labels[keep] == 1).sum() == 7
    again = balanced_indices(labels, 1, True, torch.Generator().manual_seed(0))
    other = balanced_indices(labels, 1, True, torch.Generator().manual_seed(1))
    assert torch.equal(keep, again) and not torch.equal(keep, other)


def test_anything_else_is_subsampled_to_the_mean_named_class_size() -> None:
    labels = torch.tensor([0] * 10 + [1] * 12 + [2] * 50 + [DROPPED] * 5)
    keep = balanced_indices(labels, 2, True, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[keep]).tolist() == [10, 12, 11]
    few = torch.tensor([0] * 10 + [1] * 3)
    assert torch.bincount(few[balanced_indices(few, 1, True, torch.Generator())]).tolist() == [
        10,
        3,
    ]
    named = balanced_indices(labels, 3, False, torch.Generator())
    assert len(named) == 72 and (labels[named] >= 0).all()


def test_stratified_split_keeps_proportions_and_covers_everything() -> None:
    labels = torch.tensor([0] * 40 + [1] * 20 + [2] * 1)
    held, kept = stratified_split(labels, 0.25, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[held]).tolist() == [10, 5]
    assert sorted(torch.cat([held, kept]).tolist()) == list(range(61))


def test_digits_suite_tasks_are_balanced_disjoint_and_seeded() -> None:
    suite = get_suite("digits")
    assert [t.num_classes for t in suite.tasks] == [2, 2, 5, 10] and suite.head_width == 10
    detect6 = suite.tasks[1].splits()
    counts = (
        torch.bincount(detect6.train.y)
        + torch.bincount(detect6.val.y)
        + torch.bincount(detect6.test.y)
    )
    assert counts.tolist() == [181, 181]  # all 181 sixes of the 1797 digits, and as many others
    rows = [{tuple(r.tolist()) for r in p.x.flatten(1)} for p in detect6]
    assert not (rows[0] & rows[2]) and not (
        rows[1] & rows[2]
    )  # no test image in train or validation
    five = suite.tasks[2].splits().train
    sizes = torch.bincount(five.y).tolist()
    assert max(sizes) - min(sizes) <= 3  # "anything else" has about one named class' size
    reseeded = Task(
        "0-3 + other", suite.tasks[2].source, [0, 1, 2, 3], other=True, data_seed=1
    ).splits()
    assert not torch.equal(reseeded.test.x, suite.tasks[2].splits().test.x)
    assert torch.equal(suite.tasks[3].splits().test.y, get_suite("digits").tasks[3].splits().test.y)


def test_digits_tasks_do_not_share_images_across_splits() -> None:
    # On the old per-task splits, 155 of the 225 test images of "0-3 + other" were training
    # images of "all digits" (and every other pair leaked too).
    assert leaks(get_suite("digits").tasks) == {}


def test_tasks_on_a_synthetic_source_do_not_share_samples_across_splits() -> None:
    source = blob_source(n_per_class=40, classes=4)
    tasks = [
        Task.detector("detect c0", source, ["c0"]),
        Task.detector("detect c1", source, ["c1"]),
        Task("c0, c1 + other", source, ["c0", "c1"], other=True),
        Task("all", source, [0, 1, 2, 3]),
        Task("c2, c3 unbalanced", source, [2, 3], balance=False),
    ]
    assert leaks(tasks) == {}
    whole = tasks[3].splits()  # no official test part: 25% of each label, then 10% of the rest
    assert [len(whole.test), len(whole.val), len(whole.train)] == [40, 12, 108]


def test_tasks_on_an_official_test_part_do_not_share_samples(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=300, n_test=100)
    tasks = get_suite("mnist", tmp_path).tasks
    assert leaks(tasks) == {}
    assert len(tasks[3].splits().test) == 100  # the official test part, whole


def test_tasks_that_split_one_source_differently_are_refused() -> None:
    source = blob_source()
    tasks = (Task("a", source, [0, 1]), Task("b", source, [0, 1, 2], data_seed=1))
    with pytest.raises(ValueError, match="split the source 'blobs' differently"):
        Suite("s", tasks, TrainConfig(), "mlp")
    fingerprints = [t.fingerprint() for t in tasks]
    assert fingerprints[0]["split"] == fingerprints[1]["split"] and "split" in fingerprints[0]


def test_official_test_part_is_the_test_split_and_uint8_is_scaled() -> None:
    x, y = torch.randint(0, 256, (40, 1, 2, 2), dtype=torch.uint8), torch.arange(40) % 4
    xt, yt = torch.full((8, 1, 2, 2), 255, dtype=torch.uint8), torch.arange(8) % 4
    task = Task("all", DataSource.from_tensors("s", x, y, x_test=xt, y_test=yt), [0, 1, 2, 3])
    splits = task.splits()
    assert len(splits.test) == 8 and torch.equal(splits.test.x, torch.ones(8, 1, 2, 2))
    assert len(splits.train) + len(splits.val) == 40 and splits.train.x.dtype == torch.float32


def test_task_errors_name_the_problem() -> None:
    source = blob_source()
    with pytest.raises(ValueError, match="has no label named 'dog'; known names: c0, c1, c2, c3"):
        Task("t", source, ["dog"], other=True).splits()
    with pytest.raises(ValueError, match="original label 1 is in class 0 and in class 1"):
        Task("t", source, [[0, 1], ["c1"]]).splits()
    with pytest.raises(ValueError, match=r"class 1 \(7\) has no samples"):
        Task("t", source, [0, 7]).splits()
    with pytest.raises(ValueError, match="has one class"):
        Task("t", source, [0])
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        Task("t", source, [0], other=True, class_names=["a", "b", "c"])


def test_mnist_suite_shares_the_digit_tasks(tmp_path: Path) -> None:
    write_mnist(tmp_path, n_train=200, n_test=60)
    suite = get_suite("mnist", tmp_path)
    assert [t.name for t in suite.tasks] == [t.name for t in get_suite("digits").tasks]
    detect0 = suite.tasks[0].splits()
    assert torch.bincount(detect0.test.y).tolist() == [6, 6] and detect0.test.x.shape[1:] == (
        1,
        28,
        28,
    )
    with pytest.raises(ValueError, match="pass the folder that holds it"):
        get_suite("mnist")


def test_cifar10_suite_tasks(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=40)
    suite = get_suite("cifar10", tmp_path)
    assert [t.num_classes for t in suite.tasks] == [2, 2, 4, 10]
    detect = suite.tasks[0]
    assert detect.groups == (("automobile", "cat", "ship"),) and detect.other
    labels = detect.splits().test.y
    assert torch.bincount(labels).tolist() == [12, 12]  # 3 classes x 4 test images, and 12 others
    assert suite.tasks[2].labels == ["bird", "frog", "horse", "other"]


def test_cifar100_suite_uses_superclasses(tmp_path: Path) -> None:
    write_cifar100(tmp_path, per_fine=4)
    suite = get_suite("cifar100", tmp_path)
    assert [t.num_classes for t in suite.tasks] == [2, 2, 11, 21] and suite.head_width == 21
    test = suite.tasks[0].splits().test
    assert torch.bincount(test.y).tolist() == [
        40,
        40,
    ]  # 10 vehicle classes x 4, and 40 of the 60 others
    assert torch.bincount(suite.tasks[3].splits().test.y).tolist() == [4] * 21
