"""Loading datasets: a registry of adapters (name -> function) dispatched by `load_dataset`.

* ``parquet``     -- a file with columns ``image`` (encoded PNG/JPEG bytes), ``label`` (int), ``label_name`` (str);
* ``split_dir``   -- a directory holding ``train.parquet`` / ``test.parquet`` / ``all.parquet``; ``split`` picks one;
* ``npz``         -- arrays ``images`` (uint8 [N,H,W] or [N,H,W,1|3]), ``labels`` (int), optional ``class_names``;
* ``imagefolder`` -- ``root/<class_name>/*.png|jpg|jpeg`` with classes sorted by name.

Every bad input raises `DatasetError` naming the file, the row (or the image file inside a folder), the field and
what was expected. Nothing is skipped silently.
"""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dass_ray.core.images import (_PARQUET_COLUMNS, IMAGE_EXTENSIONS, DatasetError, ImageDataset, _err)

# ----------------------------------------------------------------------------------------------------------------
# Decoding helpers
# ----------------------------------------------------------------------------------------------------------------


def _as_hw(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h <= 0 or w <= 0:
        raise DatasetError(f"image_size must be positive, got {image_size!r}")
    return h, w


def _pil_to_array(im) -> np.ndarray:
    """PIL image -> uint8 [H,W] (gray) or [H,W,3]."""
    if im.mode == "RGB":
        return np.asarray(im)
    if im.mode == "L":
        return np.asarray(im)
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


def _resize_array(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    if a.shape[:2] == hw:
        return a
    return np.asarray(Image.fromarray(a).resize((hw[1], hw[0]), Image.BILINEAR))


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _open_image(data: bytes):
    """Open encoded bytes; JPEG and PNG go straight to their plugin (skips format probing, ~20% faster)."""
    from PIL import Image, JpegImagePlugin, PngImagePlugin

    fp = io.BytesIO(data)
    if data[:3] == _JPEG_MAGIC:
        im = JpegImagePlugin.JpegImageFile(fp)
    elif data[:8] == _PNG_MAGIC:
        im = PngImagePlugin.PngImageFile(fp)
    else:
        return Image.open(fp)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.size[0] * im.size[1] > limit:
        raise ValueError(f"image of {im.size[0]}x{im.size[1]} pixels exceeds PIL's MAX_IMAGE_PIXELS ({limit})")
    return im


def _decode_one(data: bytes, hw: tuple[int, int] | None) -> np.ndarray:
    with _open_image(data) as im:
        im.load()
        a = _pil_to_array(im)
    if a.ndim not in (2, 3) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"decoded to an unusable array of shape {a.shape}")
    if hw is not None:
        a = _resize_array(a, hw)
    return a


def _decode_all(
    payloads: Sequence[bytes | None],
    where: Callable[[int], tuple[str, int | None]],
    hw: tuple[int, int] | None,
) -> tuple[np.ndarray, int]:
    """Decode encoded images to uint8 [N,H,W,3] and their channels (1 if all are grayscale, else 3); `where(i)` ->
    (source, row) for error messages.

    A plain loop: PIL's per-image Python overhead dominates for small images, and threads measured slower (GIL)."""
    arrays: list[np.ndarray] = []
    for i, data in enumerate(payloads):
        if data is None or not isinstance(data, (bytes, bytearray, memoryview)):
            src, row = where(i)
            got = "null" if data is None else type(data).__name__
            raise _err(src, f"expected encoded image bytes (PNG or JPEG), got {got}", row=row, field="image")
        try:
            arrays.append(_decode_one(bytes(data), hw))
        except Exception as e:  # PIL raises a zoo of types (UnidentifiedImageError, OSError, SyntaxError, ...)
            src, row = where(i)
            raise _err(src, "could not decode image bytes as PNG/JPEG (corrupt or another format)",
                       row=row, field="image") from e
    gray = all(a.ndim == 2 or a.shape[2] == 1 for a in arrays)
    return _stack(arrays, hw), 1 if gray else 3


def _stack(arrays: list[np.ndarray], hw: tuple[int, int] | None) -> np.ndarray:
    """Stack [H,W] / [H,W,1] / [H,W,3] uint8 arrays into [N,H,W,3], resizing odd sizes to `hw` or the most common."""
    if hw is None:
        sizes = Counter(a.shape[:2] for a in arrays)
        hw = sizes.most_common(1)[0][0] if sizes else (0, 0)
    out = np.empty((len(arrays), hw[0], hw[1], 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a.shape[:2] != hw:
            a = _resize_array(a, hw)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        out[i] = a[:, :, None] if a.ndim == 2 else a
    return out


def _gray_to_rgb(images: np.ndarray) -> np.ndarray:
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 3:
        return np.ascontiguousarray(np.broadcast_to(images[..., None], images.shape + (3,)))
    return np.ascontiguousarray(images)


def _check_label_values(labels: np.ndarray, num_classes: int, src: str, how: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        r = int(bad[0])
        raise _err(src, f"expected an integer label in 0..{num_classes - 1} ({how}), got {int(labels[r])}",
                   row=r, field="label")


def _check_no_empty_class(labels: np.ndarray, class_names: Sequence[str], src: str, field: str) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        c = int(empty[0])
        raise _err(src, f"class {c} ('{class_names[c]}') is declared but has no images "
                        f"({empty.size} empty class(es) in total)", field=field)


def _integer_labels(values: np.ndarray, src: str, field: str = "label") -> np.ndarray:
    """Integer labels as int64; floats only when integral; anything else names the first bad row."""
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(values) | (values != np.round(values)))
        if bad.size:
            r = int(bad[0])
            raise _err(src, f"expected an integer label, got {values[r]!r}", row=r, field=field)
        return values.astype(np.int64)
    if values.dtype == np.bool_:
        raise _err(src, "expected integer labels, got booleans", row=0, field=field)
    for r, v in enumerate(values.tolist()):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
            raise _err(src, f"expected an integer label, got {v!r} ({type(v).__name__})", row=r, field=field)
    return values.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Adapter registry
# ----------------------------------------------------------------------------------------------------------------

Adapter = Callable[..., ImageDataset]
_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str) -> Callable[[Adapter], Adapter]:
    """Register `fn(path: Path, *, split, image_size) -> ImageDataset` under `name`."""

    def deco(fn: Adapter) -> Adapter:
        if name in _ADAPTERS:
            raise ValueError(f"dataset adapter {name!r} already registered")
        _ADAPTERS[name] = fn
        return fn

    return deco


def list_adapters() -> list[str]:
    return sorted(_ADAPTERS)


def _detect_format(path: Path, split: str | None) -> str:
    if path.is_dir():
        if any(p.suffix == ".parquet" and p.is_file() for p in path.iterdir()):
            return "split_dir"
        return "imagefolder"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".npz":
        return "npz"
    raise DatasetError(f"{path}: cannot tell the dataset format (expected a .parquet or .npz file, a directory with "
                       f"train.parquet/test.parquet, or an ImageFolder directory)")


def load_dataset(
    path: str | Path,
    *,
    split: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    format: str | None = None,
) -> ImageDataset:
    """Load a dataset. `split` picks ``<split>.parquet`` (or ``<split>/``) inside a directory; `image_size` (int or
    (H, W)) resizes every image at load, otherwise mixed sizes are resized to the most common one; `format` forces an
    adapter (see `list_adapters`)."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or directory")
    hw = _as_hw(image_size)
    name = format or _detect_format(p, split)
    if name not in _ADAPTERS:
        raise DatasetError(f"{p}: unknown dataset format {name!r}; known: {', '.join(list_adapters())}")
    return _ADAPTERS[name](p, split=split, image_size=hw)


def _no_split(path: Path, split: str | None, kind: str) -> None:
    if split is not None:
        raise DatasetError(f"{path}: split={split!r} given, but a {kind} holds a single split "
                           f"(pass the directory that contains <split>.parquet instead)")


@register_adapter("parquet")
def _load_parquet(path: Path, *, split: str | None = None, image_size: tuple[int, int] | None = None) -> ImageDataset:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    _no_split(path, split, "parquet file")
    src = str(path)
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise DatasetError(f"{src}: not a readable Parquet file (expected columns image (PNG/JPEG bytes), label, "
                           f"label_name)") from e
    missing = [c for c in _PARQUET_COLUMNS if c not in schema.names]
    if missing:
        raise _err(src, f"missing column(s) {missing}; expected columns {list(_PARQUET_COLUMNS)}, "
                        f"found {schema.names}", field=missing[0])
    try:
        table = pq.read_table(path, columns=list(_PARQUET_COLUMNS))
    except Exception as e:
        raise DatasetError(f"{src}: the Parquet data is corrupt or truncated") from e
    n = table.num_rows
    if n == 0:
        raise DatasetError(f"{src}: zero rows; expected at least one image")

    for col in _PARQUET_COLUMNS:
        c = table[col]
        if c.null_count:
            r = int(np.flatnonzero(pc.is_null(c).to_numpy(zero_copy_only=False))[0])
            raise _err(src, "expected a value, got null", row=r, field=col)
    t_img, t_lab, t_name = (table[c].type for c in _PARQUET_COLUMNS)
    if not (pa.types.is_binary(t_img) or pa.types.is_large_binary(t_img)):
        raise _err(src, f"expected a binary column of encoded PNG/JPEG bytes, got type {t_img}", field="image")
    if not (pa.types.is_integer(t_lab) or pa.types.is_floating(t_lab)):
        raise _err(src, f"expected an integer column, got type {t_lab}", row=0, field="label")
    if not (pa.types.is_string(t_name) or pa.types.is_large_string(t_name)):
        raise _err(src, f"expected a string column, got type {t_name}", field="label_name")

    labels = _integer_labels(table["label"].to_numpy(), src)
    names = np.asarray(table["label_name"].to_pylist(), dtype=object)
    uniq_names, name_idx = np.unique(names, return_inverse=True)
    uniq_labels, label_idx = np.unique(labels, return_inverse=True)
    name_idx, label_idx = name_idx.reshape(-1), label_idx.reshape(-1)
    num_classes = len(uniq_names)

    # label -> label_name must be a function, and label_name -> label too (checked before the range, so that a
    # name shared by two labels is reported as such rather than as a label out of range).
    order = np.arange(n)[::-1]
    first_row_of_label = np.empty(len(uniq_labels), dtype=np.int64)
    first_row_of_label[label_idx[order]] = order  # last write wins -> the first row
    bad = np.flatnonzero(name_idx[first_row_of_label[label_idx]] != name_idx)
    if bad.size:
        r = int(bad[0])
        r0 = int(first_row_of_label[label_idx[r]])
        raise _err(src, f"label {int(labels[r])} has label_name {names[r]!r} here but {names[r0]!r} at row {r0}; "
                        f"expected one label_name per label", row=r, field="label_name")
    first_row_of_name = np.empty(num_classes, dtype=np.int64)
    first_row_of_name[name_idx[order]] = order
    bad = np.flatnonzero(labels[first_row_of_name[name_idx]] != labels)
    if bad.size:
        r = int(bad[0])
        r0 = int(first_row_of_name[name_idx[r]])
        raise _err(src, f"label_name {names[r]!r} has label {int(labels[r])} here but label {int(labels[r0])} at "
                        f"row {r0}; expected one label per label_name", row=r, field="label_name")
    _check_label_values(labels, num_classes, src, f"there are {num_classes} distinct label_name values")
    # Bijection labels <-> names with labels in 0..C-1 means every class is present.
    class_names = tuple(str(names[first_row_of_label[c]]) for c in range(num_classes))  # uniq_labels == 0..C-1
    _check_no_empty_class(labels, class_names, src, "label")

    payloads = table["image"].to_pylist()
    images, channels = _decode_all(payloads, lambda i: (src, i), image_size)
    return ImageDataset(images, labels, class_names, src, channels)


@register_adapter("split_dir")
def _load_split_dir(path: Path, *, split: str | None = None, image_size: tuple[int, int] | None = None) -> ImageDataset:
    available = sorted(p.stem for p in path.iterdir() if p.suffix == ".parquet" and p.is_file())
    if split is None:
        if len(available) == 1:
            split = available[0]
        else:
            raise DatasetError(f"{path}: holds several splits {available}; pass split=<one of them>")
    f = path / f"{split}.parquet"
    if not f.is_file():
        raise DatasetError(f"{path}: no split {split!r} (no {f.name}); available splits: {available}")
    return _load_parquet(f, image_size=image_size)


@register_adapter("npz")
def _load_npz(path: Path, *, split: str | None = None, image_size: tuple[int, int] | None = None) -> ImageDataset:
    _no_split(path, split, ".npz file")
    src = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise DatasetError(f"{src}: not a readable .npz file (expected a NumPy archive with arrays images "
                           f"[N, H, W] or [N, H, W, C] and labels [N], no pickled objects)") from e
    for key in ("images", "labels"):
        if key not in arrays:
            raise _err(src, f"missing array '{key}'; expected arrays 'images', 'labels' and optional "
                            f"'class_names', found {sorted(arrays)}", field=key)
    images, labels = arrays["images"], arrays["labels"]
    if images.dtype != np.uint8:
        raise _err(src, f"expected dtype uint8, got {images.dtype}", field="images")
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise _err(src, f"expected shape [N,H,W] or [N,H,W,1|3], got {list(images.shape)}", field="images")
    n = images.shape[0]
    if n == 0:
        raise DatasetError(f"{src}: zero rows; expected at least one image")
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise _err(src, f"expected non-empty images, got shape {list(images.shape)}", field="images")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise _err(src, f"expected shape [{n}] (one label per image), got {list(labels.shape)}", field="labels")
    labels = _integer_labels(labels, src, "labels")
    if "class_names" in arrays:
        cn = arrays["class_names"]
        if cn.ndim != 1 or cn.dtype.kind not in "US":
            raise _err(src, f"expected a 1-D array of strings, got dtype {cn.dtype} shape {list(cn.shape)}",
                       field="class_names")
        class_names = tuple(str(c) for c in cn.tolist())
        if len(set(class_names)) != len(class_names):
            dup = next(c for c, k in Counter(class_names).items() if k > 1)
            raise _err(src, f"expected distinct class names, {dup!r} appears twice", field="class_names")
        how = f"'class_names' declares {len(class_names)} classes"
    else:
        if labels.min() < 0:
            _check_label_values(labels, int(labels.max()) + 1, src, "labels must be non-negative")
        class_names = tuple(str(i) for i in range(int(labels.max()) + 1))
        how = "no 'class_names' array"
    _check_label_values(labels, len(class_names), src, how)
    _check_no_empty_class(labels, class_names, src, "labels")
    channels = 1 if images.ndim == 3 or images.shape[-1] == 1 else 3
    images = _gray_to_rgb(images)
    if image_size is not None and images.shape[1:3] != image_size:
        images = _stack([images[i] for i in range(n)], image_size)
    return ImageDataset(images, labels, class_names, src, channels)


@register_adapter("imagefolder")
def _load_imagefolder(path: Path, *, split: str | None = None, image_size: tuple[int, int] | None = None) -> ImageDataset:
    root = path
    if split is not None:
        root = path / split
        if not root.is_dir():
            raise DatasetError(f"{path}: no split directory {split!r} ({root} does not exist)")
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    stray = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if stray:
        raise DatasetError(f"{stray[0]}: image directly under the ImageFolder root {root}; expected "
                           f"root/<class_name>/<image>")
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    if not class_dirs:
        raise DatasetError(f"{root}: zero rows; expected class subdirectories root/<class_name>/*.png|jpg|jpeg")
    files: list[Path] = []
    labels: list[int] = []
    for c, d in enumerate(class_dirs):
        count = 0
        for f in sorted(d.iterdir(), key=lambda p: p.name):
            if f.name.startswith("."):
                continue  # hidden files (.DS_Store, editor swap files) are not data
            if f.is_dir():
                raise DatasetError(f"{f}: nested directory inside class '{d.name}'; expected only image files "
                                   f"{list(IMAGE_EXTENSIONS)}")
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DatasetError(f"{f}: field 'image': unsupported file type {f.suffix!r} in class '{d.name}'; "
                                   f"expected one of {list(IMAGE_EXTENSIONS)}")
            files.append(f)
            labels.append(c)
            count += 1
        if count == 0:
            raise DatasetError(f"{d}: field 'label': class {c} ('{d.name}') is an empty class directory; expected at "
                               f"least one image {list(IMAGE_EXTENSIONS)}")

    def read(i: int) -> bytes:
        try:
            return files[i].read_bytes()
        except OSError as e:
            raise DatasetError(f"{files[i]}: field 'image': cannot read file ({e})") from None

    payloads = [read(i) for i in range(len(files))]
    images, channels = _decode_all(payloads, lambda i: (str(files[i]), None), image_size)
    return ImageDataset(images, np.asarray(labels, dtype=np.int64), tuple(d.name for d in class_dirs), str(root),
                        channels)
