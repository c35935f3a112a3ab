"""Images from a class-per-folder tree (e.g. an ImageNet train folder: ``root/n01440764/*.JPEG``).

Each class is a folder; a mapping names the classes (``{"tench": "n01440764", ...}``). From each
folder, ``images_per_class`` files are drawn (seeded; all of them when None), the first
``train_per_class`` of the draw form the training part and the rest the test part, as the paper's
800 / 200 images per class (§4.3). Images are resized (shorter side) and centre-cropped to
``image_size`` and stored as (N, 3, S, S) uint8; decoding runs in a thread pool.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from fisher_fast.part import Part
from fisher_fast.tasks.source import DataSource, SourceData, files_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def folder_source(
    path: str | Path,
    classes: Mapping[str, str] | None = None,
    *,
    images_per_class: int | None = 1000,
    train_per_class: int = 800,
    image_size: int = 32,
    seed: int = 0,
    name: str = "folder",
) -> DataSource:
    """A source over the class folders of ``path`` (or ``path/train`` when it exists).

    Args:
        classes: class name -> folder (relative to the tree); every subfolder, named by itself,
            when None. Original label i is the i-th class of this mapping.
        images_per_class: files drawn per class (seeded); all files when None.
        train_per_class: how many of the drawn files form the training part; the rest are test.
        image_size: side S of the square images, in pixels.
    """
    root = Path(path)
    if (root / "train").is_dir():
        root = root / "train"
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; pass a class-per-folder tree with --data"
        )
    if classes is None:
        classes = {d.name: d.name for d in sorted(root.iterdir()) if d.is_dir()}
    if not classes:
        raise FileNotFoundError(
            f"{root} has no class subfolders (expected {root}/<class>/<image files>)"
        )
    rng = random.Random(seed)
    chosen: list[list[Path]] = []
    for class_name, folder in classes.items():
        files = sorted(f for f in (root / folder).glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        need = images_per_class or len(files)
        if not (root / folder).is_dir() or len(files) < need or len(files) <= train_per_class:
            raise FileNotFoundError(
                f"class {class_name!r}: folder {root / folder} holds {len(files)} images, but "
                f"{need} are needed ({train_per_class} for training, the rest for testing). "
                "Fix the class -> folder mapping file or lower --images-per-class / --train-per-class."
            )
        chosen.append(rng.sample(files, need))
    key = files_key(name, [f for fs in chosen for f in fs], size=image_size, train=train_per_class)
    names: dict[str, tuple[int, ...]] = {class_name: (i,) for i, class_name in enumerate(classes)}
    return DataSource(name, key, lambda: _load(chosen, train_per_class, image_size, names))


def read_class_map(path: str | Path) -> dict[str, str]:
    """A JSON object mapping class names to folder names."""
    try:
        mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the class -> folder mapping {path}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f"{path} must hold a JSON object {{class name: folder name}}")
    return mapping


def _load(
    chosen: list[list[Path]], train_per_class: int, size: int, names: dict[str, tuple[int, ...]]
) -> SourceData:
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        images = [list(pool.map(lambda f: _read_image(f, size), files)) for files in chosen]
    parts = []
    for lo, hi in ((0, train_per_class), (train_per_class, None)):
        x = torch.from_numpy(np.stack([im for ims in images for im in ims[lo:hi]]))
        y = torch.tensor(
            [label for label, ims in enumerate(images) for _ in ims[lo:hi]], dtype=torch.long
        )
        parts.append(Part(x, y))
    return SourceData(parts[0], parts[1], names)


def _read_image(path: Path, size: int) -> np.ndarray:
    """(3, size, size) uint8: shorter side resized to ``size``, then centre-cropped."""
    from PIL import Image

    with Image.open(path) as opened:
        rgb = opened.convert("RGB")
    scale = size / min(rgb.size)
    w, h = max(size, round(rgb.width * scale)), max(size, round(rgb.height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    square = rgb.resize((w, h), Image.Resampling.BILINEAR).crop(
        (left, top, left + size, top + size)
    )
    return np.asarray(square, dtype=np.uint8).transpose(2, 0, 1).copy()
