"""Plans of a meta-dataset: which tasks (source, classes, images per class, teacher training) get how many students.

`PLANS` holds the built-in plans ("cpu": the first meta-dataset; "broad": 40 tasks from 13 sources; "broad3": broad
plus a third test task per test source; "broad4": broad3 plus near-chance-teacher meta-training/validation tasks;
"tiny": tests); `load_plan` also reads a JSON plan file; `make_tasks` turns a plan into deterministic class-subset
tasks.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from dass_ray.core.config import ScaleConfig
from dass_ray.core.data import load_dataset, resolve_dataset_path
from dass_ray.core.tasks import TaskSpec, make_class_subset_tasks

ROLES = ("train", "val", "test")

# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskGroup:
    """`num_tasks` class-subset tasks of one source, all with one role, and how much to run for each.

    Counts left at None take the scale's value: `students` = `students_per_task` (`students_per_test_task` for
    test tasks); `second_seed` (students KD-trained again with a second seed: the label-noise ceiling and a
    two-seed label) = `noise_ceiling_students` for test tasks, 0 otherwise; `teacher_epochs` = the scale's teacher
    epochs (fewer make the weak teachers users also bring)."""

    role: str
    source: str
    path: str  # relative to the data root
    split: str | None
    num_tasks: int
    seed: int
    classes_per_task: int | None = None  # None: the scale's
    train_per_class: int | None = None
    val_per_class: int | None = None
    disjoint: bool = False
    skip: int = 0  # drop the first `skip` generated tasks (keeps groups of one source class-set disjoint)
    class_pool: tuple[int, ...] | None = None  # source classes the tasks draw from (None: all)
    students: int | None = None
    second_seed: int | None = None
    teacher_epochs: int | None = None
    id_prefix: str | None = None  # task ids are f"{id_prefix}-{i:03d}"; default f"{role}-{source}-s{seed}"

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["class_pool"] = list(self.class_pool) if self.class_pool is not None else None
        return d

    @property
    def prefix(self) -> str:
        return self.id_prefix or f"{self.role}-{self.source}-s{self.seed}"

    def num_students(self, scale: ScaleConfig) -> int:
        if self.students is not None:
            return self.students
        return scale.students_per_test_task if self.role == "test" else scale.students_per_task

    def num_second_seed(self, scale: ScaleConfig) -> int:
        if self.second_seed is not None:
            return min(self.second_seed, self.num_students(scale))
        return scale.noise_ceiling_students if self.role == "test" else 0

    def teacher_scale(self, scale: ScaleConfig) -> ScaleConfig:
        return scale if self.teacher_epochs is None else scale.replace(teacher={"epochs": self.teacher_epochs})


_CPU_PLAN = [
    TaskGroup("train", "cifar10", "cifar10/train.parquet", None, 4, seed=11),
    TaskGroup("train", "fashion_mnist", "fashion_mnist/train.parquet", None, 4, seed=12),
    TaskGroup("val", "cifar10", "cifar10/train.parquet", None, 1, seed=21),
    TaskGroup("val", "fashion_mnist", "fashion_mnist/train.parquet", None, 1, seed=22),
    TaskGroup("test", "mnist5k", "mnist5k/all.parquet", None, 1, seed=31),
    TaskGroup("test", "omniglot_small", "omniglot_small/all.parquet", None, 1, seed=32,
              classes_per_task=20, train_per_class=15, val_per_class=5),
]


def _g(role: str, source: str, path: str, seed: int, classes: int, train: int, val: int, teacher_epochs: int,
       pool: range | None = None, **kw) -> TaskGroup:
    return TaskGroup(role, source, path, None, 1, seed=seed, classes_per_task=classes, train_per_class=train,
                     val_per_class=val, teacher_epochs=teacher_epochs,
                     class_pool=tuple(pool) if pool is not None else None, **kw)


# Source classes of the sources that give both meta-training and meta-validation tasks: disjoint pools.
_GTSRB, _TINY, _CHARS = "gtsrb/train.parquet", "tiny_imagenet50/train.parquet", "chars74k_fonts/all.parquet"
_POOLS = {"gtsrb": (range(0, 30), range(30, 43)), "tiny_imagenet50": (range(0, 35), range(35, 50)),
          "chars74k_fonts": (range(0, 24), range(24, 34))}

# The broad plan: the "cpu" plan's tasks (rows kept; its two validation tasks move to meta-training, since their
# classes overlap the training tasks'), plus tasks that vary what users vary -- 2 to 20 classes, 10 to 200
# training images per class, 13 sources, teachers from near chance (1-3 epochs, few images) to ~1.0.
# Meta-validation classes are disjoint from meta-training classes; meta-test sources are never used before.
# Every test task gets a second KD seed for all 50 students: its label is the mean of the two seeds.
_BROAD_PLAN = [
    *_CPU_PLAN[:2],
    dataclasses.replace(_CPU_PLAN[2], role="train", id_prefix="val-cifar10-s21"),
    dataclasses.replace(_CPU_PLAN[3], role="train", id_prefix="val-fashion_mnist-s22"),
    dataclasses.replace(_CPU_PLAN[4], second_seed=50),
    dataclasses.replace(_CPU_PLAN[5], second_seed=50),
    # meta-training: 16 new tasks from 7 more sources (30 students each)
    _g("train", "gtsrb", _GTSRB, 41, 10, 60, 20, 10, _POOLS["gtsrb"][0], students=30),
    _g("train", "gtsrb", _GTSRB, 42, 20, 15, 20, 3, _POOLS["gtsrb"][0], students=30),
    _g("train", "gtsrb", _GTSRB, 43, 2, 100, 50, 10, _POOLS["gtsrb"][0], students=30),
    _g("train", "tiny_imagenet50", _TINY, 44, 10, 100, 40, 10, _POOLS["tiny_imagenet50"][0], students=30),
    _g("train", "tiny_imagenet50", _TINY, 45, 20, 30, 20, 2, _POOLS["tiny_imagenet50"][0], students=30),
    _g("train", "tiny_imagenet50", _TINY, 46, 5, 150, 50, 1, _POOLS["tiny_imagenet50"][0], students=30),
    _g("train", "chars74k_fonts", _CHARS, 47, 20, 40, 20, 10, _POOLS["chars74k_fonts"][0], students=30),
    _g("train", "chars74k_fonts", _CHARS, 48, 5, 10, 40, 10, _POOLS["chars74k_fonts"][0], students=30),
    _g("train", "intel_scenes", "intel_scenes/train.parquet", 49, 6, 150, 50, 10, students=30),
    _g("train", "intel_scenes", "intel_scenes/train.parquet", 50, 3, 20, 50, 1, students=30),
    _g("train", "flowers5", "flowers5/all.parquet", 51, 5, 200, 60, 10, students=30),
    _g("train", "flowers5", "flowers5/all.parquet", 52, 2, 30, 50, 2, students=30),
    _g("train", "kannada_mnist", "kannada_mnist/all.parquet", 53, 10, 80, 30, 10, students=30),
    _g("train", "kannada_mnist", "kannada_mnist/all.parquet", 54, 4, 10, 40, 1, students=30),
    _g("train", "pacs_cartoon", "pacs_cartoon/all.parquet", 55, 7, 100, 30, 10, students=30),
    _g("train", "pacs_cartoon", "pacs_cartoon/all.parquet", 56, 3, 40, 40, 3, students=30),
    # meta-validation: 6 tasks from 3 sources, classes disjoint from every training task's
    _g("val", "gtsrb", _GTSRB, 61, 10, 60, 20, 10, _POOLS["gtsrb"][1], students=30),
    _g("val", "gtsrb", _GTSRB, 62, 4, 15, 30, 2, _POOLS["gtsrb"][1], students=30),
    _g("val", "tiny_imagenet50", _TINY, 63, 10, 100, 40, 10, _POOLS["tiny_imagenet50"][1], students=30),
    _g("val", "tiny_imagenet50", _TINY, 64, 15, 20, 20, 3, _POOLS["tiny_imagenet50"][1], students=30),
    _g("val", "chars74k_fonts", _CHARS, 65, 10, 40, 20, 10, _POOLS["chars74k_fonts"][1], students=30),
    _g("val", "chars74k_fonts", _CHARS, 66, 3, 10, 40, 1, _POOLS["chars74k_fonts"][1], students=30),
    # meta-test: 6 more tasks; 4 sources in all (MNIST, Omniglot, sign-language digits, PACS sketches)
    _g("test", "mnist5k", "mnist5k/all.parquet", 71, 10, 30, 40, 2, students=50, second_seed=50),
    _g("test", "omniglot_small", "omniglot_small/all.parquet", 72, 20, 15, 5, 10, students=50, second_seed=50),
    _g("test", "sign_digits", "sign_digits/all.parquet", 73, 10, 100, 50, 10, students=50, second_seed=50),
    _g("test", "sign_digits", "sign_digits/all.parquet", 74, 5, 20, 60, 3, students=50, second_seed=50),
    _g("test", "pacs_sketch", "pacs_sketch/all.parquet", 75, 7, 50, 30, 10, students=50, second_seed=50),
    _g("test", "pacs_sketch", "pacs_sketch/all.parquet", 76, 3, 20, 40, 2, students=50, second_seed=50),
]

# broad3: the broad plan plus a third meta-test task for each test source, so that a simulated user history
# (benchmarks/bench_history.py: the other tasks of the same source) holds two tasks and one can be held out for
# model selection. Same label recipe as the other test tasks (50 students, two KD seeds each).
_BROAD3_PLAN = [
    *_BROAD_PLAN,
    _g("test", "mnist5k", "mnist5k/all.parquet", 77, 5, 100, 40, 10, students=50, second_seed=50),
    _g("test", "omniglot_small", "omniglot_small/all.parquet", 78, 10, 15, 5, 10, students=50, second_seed=50),
    _g("test", "sign_digits", "sign_digits/all.parquet", 79, 6, 60, 50, 10, students=50, second_seed=50),
    _g("test", "pacs_sketch", "pacs_sketch/all.parquet", 80, 4, 50, 30, 10, students=50, second_seed=50),
]

# broad4: broad3 plus meta-training and meta-validation tasks in the regime where the predictor was weakest: a
# teacher near chance (1-3 epochs on 10-30 images per class) over 5-6 classes with enough validation images per class
# that the students' accuracies still separate. Train/val class pools stay disjoint; no test source is used.
_CIFAR, _FASHION, _KANNADA = "cifar10/train.parquet", "fashion_mnist/train.parquet", "kannada_mnist/all.parquet"
_FLOWERS, _INTEL, _CARTOON = "flowers5/all.parquet", "intel_scenes/train.parquet", "pacs_cartoon/all.parquet"
_BROAD4_PLAN = [
    *_BROAD3_PLAN,
    _g("train", "cifar10", _CIFAR, 81, 5, 20, 50, 2, students=30),
    _g("train", "cifar10", _CIFAR, 82, 5, 30, 50, 1, students=30),
    _g("train", "fashion_mnist", _FASHION, 83, 5, 20, 50, 1, students=30),
    _g("train", "fashion_mnist", _FASHION, 84, 6, 10, 50, 2, students=30),
    _g("train", "kannada_mnist", _KANNADA, 85, 5, 20, 60, 2, students=30),
    _g("train", "kannada_mnist", _KANNADA, 86, 6, 15, 50, 1, students=30),
    _g("train", "flowers5", _FLOWERS, 87, 5, 20, 50, 2, students=30),
    _g("train", "intel_scenes", _INTEL, 88, 5, 20, 50, 2, students=30),
    _g("train", "pacs_cartoon", _CARTOON, 89, 5, 20, 40, 3, students=30),
    _g("train", "gtsrb", _GTSRB, 90, 5, 20, 50, 3, _POOLS["gtsrb"][0], students=30),
    _g("train", "tiny_imagenet50", _TINY, 91, 5, 20, 50, 3, _POOLS["tiny_imagenet50"][0], students=30),
    _g("train", "chars74k_fonts", _CHARS, 92, 5, 20, 40, 3, _POOLS["chars74k_fonts"][0], students=30),
    _g("val", "gtsrb", _GTSRB, 93, 5, 20, 50, 3, _POOLS["gtsrb"][1], students=30),
    _g("val", "tiny_imagenet50", _TINY, 94, 5, 20, 50, 3, _POOLS["tiny_imagenet50"][1], students=30),
    _g("val", "chars74k_fonts", _CHARS, 95, 5, 20, 40, 2, _POOLS["chars74k_fonts"][1], students=30),
]

# weak_holdout: new weak-teacher meta-test tasks (the regime of sign digits s74, where every signal we have ranks
# below zero), one per test source, built in a directory of their own (artifacts/weak_holdout), not merged into the
# shipped meta-dataset: a weak-teacher ranking method chosen on meta-training and meta-validation tasks is judged on
# them once, on tasks no one has looked at. Same label recipe as the other test tasks (50 students, two KD seeds).
_WEAK_HOLDOUT_PLAN = [
    _g("test", "sign_digits", "sign_digits/all.parquet", 101, 5, 20, 60, 2, students=50, second_seed=50),
    _g("test", "mnist5k", "mnist5k/all.parquet", 102, 5, 20, 40, 1, students=50, second_seed=50),
    _g("test", "pacs_sketch", "pacs_sketch/all.parquet", 103, 5, 20, 40, 2, students=50, second_seed=50),
    _g("test", "omniglot_small", "omniglot_small/all.parquet", 104, 10, 10, 8, 3, students=50, second_seed=50),
]

PLANS: dict[str, list[TaskGroup]] = {
    # Meta-train on CIFAR-10 and Fashion-MNIST class subsets; meta-validate on other subsets of the same sources;
    # meta-test on MNIST and Omniglot, never seen in meta-training.
    "cpu": _CPU_PLAN,
    "broad": _BROAD_PLAN,
    "broad3": _BROAD3_PLAN,
    "broad4": _BROAD4_PLAN,
    "weak_holdout": _WEAK_HOLDOUT_PLAN,
    # Tests: bundled data only, seconds.
    "tiny": [
        TaskGroup("train", "mnist5k", "mnist5k.parquet", None, 2, seed=1),
        TaskGroup("val", "mnist5k", "mnist5k.parquet", None, 1, seed=2),
        TaskGroup("test", "omniglot_small", "omniglot_small.parquet", None, 1, seed=3,
                  classes_per_task=3, train_per_class=10, val_per_class=5),
    ],
}

_INT_FIELDS = {"num_tasks": 1, "seed": 0, "classes_per_task": 1, "train_per_class": 1, "val_per_class": 0,
               "skip": 0, "students": 1, "second_seed": 0, "teacher_epochs": 1}
_STR_FIELDS = ("role", "source", "path", "split", "id_prefix")
_REQUIRED = ("role", "source", "path", "num_tasks", "seed")


def group_from_dict(d: object, where: str) -> TaskGroup:
    """One task group from a plan file's JSON object; every problem raises ValueError naming `where` and the
    field."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object with fields {list(_REQUIRED)}, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(TaskGroup)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    kw = dict(d)
    kw.setdefault("split", None)
    for k, lo in _INT_FIELDS.items():
        v = kw.get(k)
        if (v is not None or k in _REQUIRED) and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise ValueError(f"{where}: field {k!r}: expected an integer >= {lo}{'' if k in _REQUIRED else ' or null'}"
                             f", got {v!r}")
    for k in _STR_FIELDS:
        v = kw.get(k)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}: field {k!r}: expected a string, got {v!r}")
    if kw["role"] not in ROLES:
        raise ValueError(f"{where}: field 'role': expected one of {list(ROLES)}, got {kw['role']!r}")
    if "disjoint" in kw and not isinstance(kw["disjoint"], bool):
        raise ValueError(f"{where}: field 'disjoint': expected true or false, got {kw['disjoint']!r}")
    pool = kw.get("class_pool")
    if pool is not None:
        if not isinstance(pool, list) or not pool or not all(isinstance(c, int) and not isinstance(c, bool)
                                                             and c >= 0 for c in pool):
            raise ValueError(f"{where}: field 'class_pool': expected a non-empty list of class ids >= 0, got {pool!r}")
        kw["class_pool"] = tuple(pool)
    return TaskGroup(**kw)


def load_plan(spec: str) -> list[TaskGroup]:
    """A built-in plan name (PLANS) or the path of a JSON plan file: {"groups": [{TaskGroup fields}, ...]}."""
    if spec in PLANS:
        return list(PLANS[spec])
    p = Path(spec)
    if not p.is_file():
        raise ValueError(f"plan {spec!r}: neither a built-in plan ({', '.join(sorted(PLANS))}) nor a plan file")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a JSON plan file: {e}") from None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{p}: expected a JSON object with a non-empty list 'groups' of task groups")
    return [group_from_dict(g, f"{p}: groups[{i}]") for i, g in enumerate(groups)]


def make_tasks(groups: list[TaskGroup], scale: ScaleConfig, data_root: str | Path | None = None
               ) -> list[tuple[TaskSpec, TaskGroup]]:
    """Deterministic (TaskSpec, group) pairs of a plan."""
    out = []
    for g in groups:
        if g.role not in ROLES:
            raise ValueError(f"task group {g.source}: role must be one of {ROLES}, got {g.role!r}")
        ds = load_dataset(resolve_dataset_path(g.path, data_root), split=g.split)
        tasks = make_class_subset_tasks(
            ds, source=g.source, path=g.path, num_tasks=g.num_tasks + g.skip,
            classes_per_task=g.classes_per_task or scale.classes_per_task,
            train_per_class=g.train_per_class or scale.train_per_class,
            val_per_class=g.val_per_class if g.val_per_class is not None else scale.val_per_class,
            seed=g.seed, disjoint=g.disjoint, prefix=g.prefix, class_pool=g.class_pool)
        out.extend((t, g) for t in tasks[g.skip:])
    ids = [t.task_id for t, _ in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"plan: task ids {dup} occur twice (two groups with the same role, source and seed; "
                         f"give one a different seed or id_prefix)")
    return out
