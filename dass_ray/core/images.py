"""The in-memory dataset (`ImageDataset`) and its errors (`DatasetError` names the file, row and field)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: Per-channel normalisation applied by `to_tensor` (maps [0, 1] to [-1, 1]).
MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

#: File name endings accepted inside an ImageFolder (case-insensitive).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")

_PARQUET_COLUMNS = ("image", "label", "label_name")


class DatasetError(ValueError):
    """Bad dataset input: the message names the file, the row (or image path) and the field, and what was expected."""


def _err(source: object, problem: str, *, row: int | None = None, field: str | None = None) -> DatasetError:
    parts = [str(source)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field '{field}'")
    return DatasetError(": ".join(parts) + ": " + problem)


# ----------------------------------------------------------------------------------------------------------------
# The dataset container
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Decoded images in memory. ``images`` uint8 [N,H,W,3]; ``labels`` int64 [N] in 0..C-1; ``channels`` those of the
    images as stored (1: all grayscale, replicated to 3 in ``images``; 3: colour), as a user's own images come."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str
    channels: int = 3

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            raise _err(self.source, f"expected uint8 array [N,H,W,3], got {got}", field="images")
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise _err(self.source, f"expected labels of shape [{images.shape[0]}], got {labels.shape}", field="labels")
        if labels.dtype != np.int64:
            if labels.size and not np.issubdtype(labels.dtype, np.integer):
                raise _err(self.source, f"expected integer labels, got dtype {labels.dtype}", field="labels")
            labels = labels.astype(np.int64)
            object.__setattr__(self, "labels", labels)
        names = tuple(str(n) for n in self.class_names)
        object.__setattr__(self, "class_names", names)
        object.__setattr__(self, "source", str(self.source))
        if self.channels not in (1, 3):
            raise _err(self.source, f"expected 1 or 3 channels, got {self.channels!r}", field="channels")
        if labels.size:
            bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
            if bad.size:
                r = int(bad[0])
                raise _err(self.source, f"expected a label in 0..{len(names) - 1}, got {int(labels[r])}",
                           row=r, field="label")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """Rows `indices` (in that order); class names and source are kept."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise _err(self.source, f"subset index out of range for {len(self)} rows")
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names, self.source, self.channels)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        h, w = self.images.shape[1:3]
        return f"ImageDataset(n={len(self)}, classes={self.num_classes}, size={h}x{w}, source={self.source!r})"


def check_classes(dataset: ImageDataset, num_classes: int, what: str) -> None:
    """Raise if `dataset` does not have exactly `num_classes` classes (e.g. a teacher head of that width)."""
    if dataset.num_classes != int(num_classes):
        raise DatasetError(
            f"{dataset.source}: {what} expects {int(num_classes)} classes, but the dataset has "
            f"{dataset.num_classes} ({', '.join(dataset.class_names[:5])}{', ...' if dataset.num_classes > 5 else ''})"
        )
