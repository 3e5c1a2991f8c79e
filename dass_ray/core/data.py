"""Image datasets and tensors (plain numpy / torch / pyarrow / PIL): the one import for loading data.

`load_dataset` (adapters: Parquet, split directories, .npz, ImageFolder; `dass_ray.core.adapters`) gives an
`ImageDataset` (`dass_ray.core.images`); `to_tensor` makes the normalised tensors the networks take; bundled and
shared datasets are found by name. Class-subset tasks live in `dass_ray.core.tasks`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dass_ray.core.adapters import _gray_to_rgb, list_adapters, load_dataset, register_adapter
from dass_ray.core.images import (IMAGE_EXTENSIONS, MEAN, STD, DatasetError, ImageDataset, check_classes)

__all__ = ["DatasetError", "ImageDataset", "MEAN", "STD", "IMAGE_EXTENSIONS", "register_adapter", "list_adapters",
           "load_dataset", "check_classes", "to_tensor", "bundled_path", "bundled_names", "shared_datasets_root",
           "resolve_dataset_path"]

_ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "data"

# ----------------------------------------------------------------------------------------------------------------
# Bundled and shared data
# ----------------------------------------------------------------------------------------------------------------


def bundled_names() -> list[str]:
    """Names of the datasets shipped inside the package (see assets/data/PROVENANCE.md)."""
    return sorted(p.stem for p in _ASSET_DIR.glob("*.parquet"))


def bundled_path(name: str) -> Path:
    """Path of a bundled dataset file, e.g. ``bundled_path("mnist5k")``; independent of the working directory."""
    stem = name[: -len(".parquet")] if name.endswith(".parquet") else name
    p = _ASSET_DIR / f"{stem}.parquet"
    if not p.is_file():
        raise DatasetError(f"no bundled dataset {name!r} in {_ASSET_DIR}; available: {bundled_names()}")
    return p


def shared_datasets_root() -> Path | None:
    """`dass_ray.fileutil.shared_datasets_root`, with a bad ``$DASS_DATASETS`` as a DatasetError."""
    from dass_ray.fileutil import shared_datasets_root as root

    try:
        return root()
    except ValueError as e:
        raise DatasetError(str(e)) from None


def resolve_dataset_path(path: str | Path, data_root: str | Path | None = None) -> Path:
    """Resolve a `TaskSpec.path`-style path: absolute as is; else under `data_root` if given; else under the shared
    datasets root, then the bundled data directory."""
    p = Path(path)
    if p.is_absolute():
        if not p.exists():
            raise DatasetError(f"{p}: no such file or directory")
        return p
    roots = [Path(data_root)] if data_root is not None else [r for r in (shared_datasets_root(), _ASSET_DIR) if r]
    for r in roots:
        if (r / p).exists():
            return r / p
    if data_root is None and (_ASSET_DIR / f"{p}.parquet").is_file():  # a bundled name, e.g. "mnist5k"
        return _ASSET_DIR / f"{p}.parquet"
    raise DatasetError(f"{p}: not found under {[str(r) for r in roots]}")


# ----------------------------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------------------------

_TENSOR_CHUNK = 1024


def to_tensor(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 [N,H,W,3] (or [N,H,W] / [N,H,W,1] grayscale) -> float32 [N,3,S,S], resized (bilinear, antialiased
    when downsizing), scaled to [0,1] and normalised with `MEAN` / `STD`. Deterministic."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise DatasetError(f"to_tensor: expected a uint8 numpy array, got "
                           f"{type(images).__name__} {getattr(images, 'dtype', '')}")
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 1):
        images = _gray_to_rgb(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DatasetError(f"to_tensor: expected shape [N,H,W,3], [N,H,W,1] or [N,H,W], got {list(images.shape)}")
    s = int(image_size)
    if s <= 0:
        raise DatasetError(f"to_tensor: image_size must be positive, got {image_size!r}")
    n, h, w, _ = images.shape
    out = torch.empty((n, 3, s, s), dtype=torch.float32)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    inv_std = 1.0 / torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    antialias = s < h or s < w
    for lo in range(0, n, _TENSOR_CHUNK):
        chunk = np.ascontiguousarray(images[lo: lo + _TENSOR_CHUNK])
        x = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
        if (h, w) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=antialias)
            x.clamp_(0.0, 1.0)
        out[lo: lo + x.shape[0]] = (x - mean) * inv_std
    return out
