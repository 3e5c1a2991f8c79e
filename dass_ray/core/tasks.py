"""Tasks: class subsets of one source dataset with explicit row indices (`TaskSpec`), so a task id always means
the same images; `save_tasks` / `load_tasks` keep them in one JSON file; `dataset_task` makes a user's dataset
(or some of its classes) one task for a search."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from dass_ray.core.config import ScaleConfig
from dass_ray.core.data import load_dataset, resolve_dataset_path
from dass_ray.core.images import DatasetError, ImageDataset
from dass_ray.core.kd import TensorData
from dass_ray.core.space import get_space

# ----------------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------------


def _int_tuple(v: object, field: str, task_id: object) -> tuple[int, ...]:
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise DatasetError(f"task {task_id!r}: field '{field}': expected a list of integers, got {type(v).__name__}")
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or int(x) < 0:
            raise DatasetError(f"task {task_id!r}: field '{field}'[{i}]: expected a non-negative integer, got {x!r}")
        out.append(int(x))
    return tuple(out)


@dataclass(frozen=True)
class TaskSpec:
    """A class-subset task of one source dataset. Task label i is source class ``classes[i]``; indices are rows of
    the source dataset (``path`` relative to a data root)."""

    task_id: str
    source: str
    path: str
    classes: tuple[int, ...]
    train_indices: tuple[int, ...]
    val_indices: tuple[int, ...]
    seed: int

    def __post_init__(self) -> None:
        tid = self.task_id
        for f in ("task_id", "source", "path"):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise DatasetError(f"task {tid!r}: field '{f}': expected a non-empty string, got {getattr(self, f)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise DatasetError(f"task {tid!r}: field 'seed': expected an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        for f in ("classes", "train_indices", "val_indices"):
            object.__setattr__(self, f, _int_tuple(getattr(self, f), f, tid))
        if not self.classes:
            raise DatasetError(f"task {tid!r}: field 'classes': expected at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise DatasetError(f"task {tid!r}: field 'classes': expected distinct class ids, got {self.classes}")
        for f in ("train_indices", "val_indices"):
            if len(set(getattr(self, f))) != len(getattr(self, f)):
                raise DatasetError(f"task {tid!r}: field '{f}': expected distinct row indices")
        both = set(self.train_indices) & set(self.val_indices)
        if both:
            raise DatasetError(f"task {tid!r}: fields 'train_indices'/'val_indices': expected disjoint rows, "
                               f"{len(both)} shared (e.g. row {min(both)})")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no whitespace)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSpec":
        if not isinstance(d, dict):
            raise DatasetError(f"task: expected a JSON object, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in d]
        extra = sorted(set(d) - set(names))
        if missing or extra:
            raise DatasetError(f"task {d.get('task_id')!r}: expected fields {names}; missing {missing}, "
                               f"unexpected {extra}")
        return cls(**{n: d[n] for n in names})

    @classmethod
    def from_json(cls, s: str | dict) -> "TaskSpec":
        if isinstance(s, dict):
            return cls.from_dict(s)
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise DatasetError(f"task: invalid JSON ({e})") from None
        return cls.from_dict(d)

    def fingerprint(self) -> str:
        """sha256 (hex) of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


def make_class_subset_tasks(
    dataset: ImageDataset,
    *,
    source: str,
    path: str,
    num_tasks: int,
    classes_per_task: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    disjoint: bool = False,
    prefix: str,
    class_pool: Sequence[int] | None = None,
) -> list[TaskSpec]:
    """Deterministic class-subset tasks (only `np.random.default_rng` seeded from `seed`). Task i depends only on
    (seed, i) and, for non-disjoint tasks, on the class sets of tasks < i, so a shorter list is a prefix of a longer.
    Per class, `train_per_class` + `val_per_class` distinct rows are drawn; train and val never overlap.
    `class_pool`: the source classes tasks may use (default all), e.g. to keep validation classes disjoint from
    training classes."""
    pool = np.arange(dataset.num_classes) if class_pool is None else np.asarray(sorted(set(class_pool)))
    if class_pool is not None and (pool.size == 0 or pool.min() < 0 or pool.max() >= dataset.num_classes):
        raise DatasetError(f"{dataset.source}: class_pool must be class ids in 0..{dataset.num_classes - 1}, "
                           f"got {list(class_pool)}")
    C = int(pool.size)
    for name, v, lo in (("num_tasks", num_tasks, 1), ("classes_per_task", classes_per_task, 1),
                        ("train_per_class", train_per_class, 1), ("val_per_class", val_per_class, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise DatasetError(f"{dataset.source}: {name} must be an integer >= {lo}, got {v!r}")
    if classes_per_task > C:
        where = "the dataset" if class_pool is None else "the class pool"
        raise DatasetError(f"{dataset.source}: classes_per_task={classes_per_task} but {where} has {C} classes")
    if disjoint and num_tasks * classes_per_task > C:
        raise DatasetError(f"{dataset.source}: {num_tasks} disjoint tasks of {classes_per_task} classes need "
                           f"{num_tasks * classes_per_task} classes, the dataset has {C}")
    need = train_per_class + val_per_class
    rows_by_class = {int(c): np.flatnonzero(dataset.labels == c) for c in pool}

    perm = np.random.default_rng([int(seed), 0]).permutation(C) if disjoint else None
    max_sets = _n_choose_k(C, classes_per_task)
    seen: set[tuple[int, ...]] = set()
    tasks = []
    for t in range(num_tasks):
        rng = np.random.default_rng([int(seed), 1, t])
        if disjoint:
            classes = tuple(sorted(int(pool[c]) for c in perm[t * classes_per_task: (t + 1) * classes_per_task]))
        else:
            while True:  # avoid repeating a class set while unseen ones remain
                classes = tuple(sorted(int(pool[c]) for c in rng.choice(C, size=classes_per_task, replace=False)))
                if classes not in seen or len(seen) >= max_sets:
                    break
            seen.add(classes)
        train, val = [], []
        for c in classes:
            rows = rows_by_class[c]
            if rows.size < need:
                raise DatasetError(f"{dataset.source}: class {c} ('{dataset.class_names[c]}') has {rows.size} "
                                   f"images; a task needs {need} (train {train_per_class} + val {val_per_class})")
            pick = rng.permutation(rows)[:need]
            train.extend(int(i) for i in np.sort(pick[:train_per_class]))
            val.extend(int(i) for i in np.sort(pick[train_per_class:]))
        tasks.append(TaskSpec(task_id=f"{prefix}-{t:03d}", source=source, path=path, classes=classes,
                              train_indices=tuple(train), val_indices=tuple(val), seed=int(seed)))
    return tasks


def _n_choose_k(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def load_task_data(task: TaskSpec, dataset: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) of `task` from its source `dataset`, labels remapped to 0..k-1, class names carried."""
    n = len(dataset)
    lookup = np.full(dataset.num_classes, -1, dtype=np.int64)
    for i, c in enumerate(task.classes):
        if c >= dataset.num_classes:
            raise DatasetError(f"task {task.task_id!r}: field 'classes': class {c} does not exist in "
                               f"{dataset.source} ({dataset.num_classes} classes); wrong dataset?")
        lookup[c] = i
    names = tuple(dataset.class_names[c] for c in task.classes)
    parts = []
    for field in ("train_indices", "val_indices"):
        idx = np.asarray(getattr(task, field), dtype=np.int64)
        if idx.size and idx.max() >= n:
            raise DatasetError(f"task {task.task_id!r}: field '{field}': row {int(idx.max())} out of range for "
                               f"{dataset.source} ({n} rows); wrong dataset?")
        mapped = lookup[dataset.labels[idx]]
        bad = np.flatnonzero(mapped < 0)
        if bad.size:
            r = int(idx[bad[0]])
            raise DatasetError(f"task {task.task_id!r}: field '{field}': row {r} of {dataset.source} has class "
                               f"{int(dataset.labels[r])}, not one of the task's classes {task.classes}; wrong dataset?")
        parts.append(ImageDataset(dataset.images[idx], mapped, names, dataset.source, dataset.channels))
    return parts[0], parts[1]


def save_tasks(path: str | Path, tasks: Iterable[TaskSpec]) -> None:
    """Write tasks as one JSON list (one canonical task per line)."""
    tasks = list(tasks)
    ids = Counter(t.task_id for t in tasks)
    dup = [k for k, v in ids.items() if v > 1]
    if dup:
        raise DatasetError(f"{path}: duplicate task id {dup[0]!r}")
    body = ",\n".join(t.to_json() for t in tasks)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("[\n" + body + ("\n" if body else "") + "]\n", encoding="utf-8")
    os.replace(tmp, p)


def load_tasks(path: str | Path) -> list[TaskSpec]:
    """Read tasks written by `save_tasks`; errors name the file and the entry."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise DatasetError(f"{p}: cannot read task file ({e})") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise DatasetError(f"{p}: expected a JSON list of tasks, got {type(data).__name__}")
    tasks, seen = [], set()
    for i, d in enumerate(data):
        try:
            t = TaskSpec.from_dict(d)
        except DatasetError as e:
            raise DatasetError(f"{p}: entry {i}: {e}") from None
        if t.task_id in seen:
            raise DatasetError(f"{p}: entry {i}: field 'task_id': duplicate task id {t.task_id!r}")
        seen.add(t.task_id)
        tasks.append(t)
    return tasks


def dataset_task(path: str | Path, scale: ScaleConfig, seed: int = 0, data_root: str | Path | None = None,
                 pick_classes: Callable[[tuple[str, ...]], list[int]] | None = None,
                 image_size: Callable[[tuple[int, int]], int] | None = None
                 ) -> tuple[TaskSpec, TensorData] | tuple[TaskSpec, TensorData, TensorData]:
    """A user dataset as one task over all its classes, or over those `pick_classes(class_names)` answers (label
    numbers; the task's labels follow the dataset's label order): per class up to `scale.train_per_class` training
    and `scale.val_per_class` validation images (fewer, 80/20, when a class is small). Deterministic in `seed`.

    The data come at the scale's space size (what the predictor ranks at). With `image_size` (a function of the
    images' native (H, W) giving a side in pixels) a third item holds the same split at that size."""
    p = resolve_dataset_path(path, data_root)
    ds = load_dataset(p)
    pool = sorted(pick_classes(ds.class_names)) if pick_classes else list(range(ds.num_classes))
    counts = ds.class_counts()
    small_c = min(pool, key=lambda c: counts[c])
    if counts[small_c] < 2:
        raise DatasetError(f"{p}: class {small_c} ('{ds.class_names[small_c]}') has "
                           f"{int(counts[small_c])} image(s); every class needs at least 2 (train + validation)")
    small = int(counts[small_c])
    tpc, vpc = scale.train_per_class, scale.val_per_class
    if small < tpc + vpc:
        vpc = max(1, small // 5)
        tpc = min(tpc, small - vpc)
    task = make_class_subset_tasks(ds, source=p.stem if p.stem not in ("all", "train") else p.parent.name,
                                   path=str(p), num_tasks=1, classes_per_task=len(pool), train_per_class=tpc,
                                   val_per_class=vpc, seed=seed, prefix="search",
                                   class_pool=pool if pick_classes else None)[0]
    tr, va = load_task_data(task, ds)
    data = TensorData.from_datasets(tr, va, get_space(scale.space).image_size)
    if image_size is None:
        return task, data
    size = int(image_size(tuple(ds.image_size)))
    return task, data, (data if size == data.x_train.shape[-1] else TensorData.from_datasets(tr, va, size))
