"""The meta-dataset: real (dataset, teacher) tasks and KD-trained students, stored as Parquet (no Ray here).

Layout of a meta-dataset directory:

    plan.json            the task plan and scale it was built with (written once; a rebuild must match it)
    tasks.json           the TaskSpecs (train/val indices: the same task id always means the same images)
    tasks.parquet        one row per task with a trained teacher: role, teacher accuracy, teacher embedding
    teachers/<id>.pt     teacher checkpoints (float16 weights; the rounded weights are what every stage used)
    parts/*.parquet      one file per finished student run (appended as runs finish; `compact` merges them)
    students.parquet     the compacted student table
    manifest.json        command, code version, wall time, machine, counts

A student row holds its config, encoding, FLOPs, params, best/final accuracy, its functional embedding (float16
bytes, C4 x h x w) and its run metadata, so meta-training needs no teacher weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dass_ray import __version__
from dass_ray.config import ScaleConfig
from dass_ray.data import TaskSpec, load_dataset, load_task_data, make_class_subset_tasks, resolve_dataset_path
from dass_ray.embed import embed_reference, noise_input
from dass_ray.kd import SoftLabels, TensorData, TrainResult, train_kd
from dass_ray.space import ArchConfig, SpaceConfig, get_space

ROLES = ("train", "val", "test")
# Scale fields that only say how much to run (a plan may change them on a resume); the rest define the labels.
_COUNT_FIELDS = ("students_per_task", "students_per_test_task", "noise_ceiling_students", "meta_episodes",
                 "meta_lr", "meta_inner_lr", "meta_query_size", "meta_eval_every", "threads_per_run", "name")

STUDENT_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("role", pa.string()), ("source", pa.string()), ("teacher_acc", pa.float64()),
    ("arch_json", pa.string()), ("arch_digest", pa.string()), ("encoding", pa.list_(pa.float32())),
    ("flops", pa.int64()), ("params", pa.int64()), ("seed", pa.int64()), ("replicate", pa.int64()),
    ("status", pa.string()), ("reason", pa.string()), ("best_acc", pa.float64()), ("final_acc", pa.float64()),
    ("epochs", pa.int64()), ("wall_s", pa.float64()), ("embedding", pa.binary()), ("code_version", pa.string()),
    ("host", pa.string()),
])

TASK_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("role", pa.string()), ("source", pa.string()), ("num_classes", pa.int64()),
    ("teacher_acc", pa.float64()), ("teacher_digest", pa.string()), ("teacher_embedding", pa.binary()),
    ("embedding_shape", pa.list_(pa.int64())), ("train_wall_s", pa.float64()), ("space_json", pa.string()),
])


def code_version() -> str:
    """git commit of the package's checkout (+ '-dirty'), or the package version when not in git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=5).stdout.strip()
            return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"v{__version__}"


def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": str(torch.__version__), "threads": torch.get_num_threads()}


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

PLANS: dict[str, list[TaskGroup]] = {
    # Meta-train on CIFAR-10 and Fashion-MNIST class subsets; meta-validate on other subsets of the same sources;
    # meta-test on MNIST and Omniglot, never seen in meta-training.
    "cpu": _CPU_PLAN,
    "broad": _BROAD_PLAN,
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


def task_data(task: TaskSpec, image_size: int, data_root: str | Path | None = None, cache: dict | None = None
              ) -> TensorData:
    key = (task.path, image_size)
    if cache is not None and key in cache:
        ds = cache[key]
    else:
        ds = load_dataset(resolve_dataset_path(task.path, data_root))
        if cache is not None:
            cache[key] = ds
    tr, va = load_task_data(task, ds)
    return TensorData.from_datasets(tr, va, image_size)


def student_plan(task: TaskSpec, space: SpaceConfig, n: int, seed: int) -> list[ArchConfig]:
    """The task's students: `n` distinct seeded samples (deterministic per task id and seed)."""
    import hashlib

    h = int(hashlib.sha256(task.task_id.encode()).hexdigest()[:8], 16)
    return space.sample_many(np.random.default_rng([seed, h]), n)


# ----------------------------------------------------------------------------------------------------------------
# One student run (what a Ray worker executes)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TaskContext:
    """What every student run of one task needs: shipped once per task (e.g. through the object store)."""

    task_id: str
    role: str
    source: str
    space: SpaceConfig
    teacher_sd: dict
    teacher_acc: float
    data: TensorData
    soft: SoftLabels
    probe_seed: int = 0
    extra: dict = field(default_factory=dict)


def run_student(ctx: TaskContext, arch: ArchConfig, scale: ScaleConfig, seed: int, replicate: int = 0,
                threads: int | None = None) -> dict:
    """KD-train one student and return its meta-dataset row (a failed run is a row with status 'failed')."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        res = train_kd(arch, ctx.space, ctx.teacher_sd, ctx.data, scale.kd, seed=seed, soft=ctx.soft)
    except Exception as e:  # recorded, never fatal for the batch
        res = TrainResult("failed", 0.0, 0.0, 0, time.perf_counter() - t0, reason=f"{type(e).__name__}: {e}")
    return student_row(ctx, arch, seed, replicate, res, time.perf_counter() - t0)


def student_row(ctx: TaskContext, arch: ArchConfig, seed: int, replicate: int, res: TrainResult,
                wall_s: float) -> dict:
    """The meta-dataset row of one student run (its functional embedding is computed here)."""
    emb = embed_reference(ctx.teacher_sd, [arch], ctx.space, noise_input(ctx.space, ctx.probe_seed))
    return {
        "task_id": ctx.task_id, "role": ctx.role, "source": ctx.source, "teacher_acc": float(ctx.teacher_acc),
        "arch_json": arch.to_json(), "arch_digest": arch.digest(),
        "encoding": ctx.space.encode(arch).astype(np.float32).tolist(),
        "flops": int(ctx.space.flops(arch)), "params": int(ctx.space.params(arch)), "seed": int(seed),
        "replicate": int(replicate), "status": res.status, "reason": res.reason, "best_acc": float(res.best_acc),
        "final_acc": float(res.final_acc), "epochs": int(res.epochs), "wall_s": float(wall_s),
        "embedding": emb.squeeze(0).to(torch.float16).numpy().tobytes(), "code_version": code_version(),
        "host": platform.node(),
    }


def run_key(task_id: str, arch_digest: str, seed: int) -> tuple[str, str, int]:
    return (task_id, arch_digest, int(seed))


# ----------------------------------------------------------------------------------------------------------------
# Store
# ----------------------------------------------------------------------------------------------------------------


class MetaDatasetStore:
    """Append-only Parquet store in a directory (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.parts = self.root / "parts"
        self.teachers = self.root / "teachers"

    def init(self, plan: dict) -> None:
        """Create the directory, or check that `plan` may continue it: the same seed and the same scale up to its
        counts (a plan may add groups, raise counts or change a task's role; `labelgen.build` checks that every
        recorded task keeps its images). The directory's plan.json becomes `plan`."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.parts.mkdir(exist_ok=True)
        self.teachers.mkdir(exist_ok=True)
        p = self.root / "plan.json"
        plan = json.loads(json.dumps(plan))
        if p.exists():
            old = json.loads(p.read_text())

            def fixed(pl: dict) -> dict:
                return {"seed": pl.get("seed"),
                        "scale": {k: v for k, v in pl.get("scale", {}).items() if k not in _COUNT_FIELDS}}

            if fixed(old) != fixed(plan):
                diff = sorted(k for k in set(fixed(old)["scale"]) | set(fixed(plan)["scale"])
                              if fixed(old)["scale"].get(k) != fixed(plan)["scale"].get(k))
                raise ValueError(f"{p}: this directory was built with another scale or seed (differs in "
                                 f"{diff or ['seed']}; stored scale {old.get('scale', {}).get('name')!r}); use a "
                                 f"new --output or the same options")
        if not p.exists() or json.loads(p.read_text()) != plan:
            atomic_write_text(p, json.dumps(plan, indent=1, sort_keys=True))

    # students -------------------------------------------------------------------------------------------------

    def append(self, rows: list[dict]) -> Path:
        """Durably add rows (one new part file, written atomically)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=STUDENT_SCHEMA)
        p = self.parts / f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = p.with_name(p.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, p)
        return p

    def students(self) -> pa.Table:
        """Every recorded student (compacted file + parts), de-duplicated on (task, arch, seed)."""
        tables = []
        main = self.root / "students.parquet"
        if main.exists():
            tables.append(pq.read_table(main))
        if self.parts.exists():
            tables.extend(pq.read_table(p) for p in sorted(self.parts.glob("*.parquet")))
        if not tables:
            return STUDENT_SCHEMA.empty_table()
        t = pa.concat_tables([x.select(STUDENT_SCHEMA.names).cast(STUDENT_SCHEMA) for x in tables])
        keys = list(zip(t["task_id"].to_pylist(), t["arch_digest"].to_pylist(), t["seed"].to_pylist()))
        seen, keep = set(), []
        for i, k in enumerate(keys):
            if k not in seen:
                seen.add(k)
                keep.append(i)
        return t.take(keep) if len(keep) != len(keys) else t

    def done_keys(self) -> set[tuple[str, str, int]]:
        t = self.students()
        return {run_key(a, b, c) for a, b, c in
                zip(t["task_id"].to_pylist(), t["arch_digest"].to_pylist(), t["seed"].to_pylist())}

    def compact(self) -> int:
        """Merge parts into students.parquet (sorted by task, replicate, seed, arch); returns the row count."""
        t = self.students()
        t = t.sort_by([("task_id", "ascending"), ("replicate", "ascending"), ("arch_digest", "ascending")])
        main = self.root / "students.parquet"
        tmp = main.with_name(main.name + ".tmp")
        pq.write_table(t, tmp, compression="zstd")
        os.replace(tmp, main)
        for p in self.parts.glob("*.parquet"):
            p.unlink()
        return t.num_rows

    # tasks ----------------------------------------------------------------------------------------------------

    def teacher_path(self, task_id: str) -> Path:
        return self.teachers / f"{task_id}.pt"

    def task_rows(self) -> pa.Table:
        p = self.root / "tasks.parquet"
        return pq.read_table(p) if p.exists() else TASK_SCHEMA.empty_table()

    def put_task(self, row: dict) -> None:
        rows = [r for r in self.task_rows().to_pylist() if r["task_id"] != row["task_id"]] + [row]
        rows.sort(key=lambda r: r["task_id"])
        p = self.root / "tasks.parquet"
        tmp = p.with_name(p.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=TASK_SCHEMA), tmp)
        os.replace(tmp, p)


def atomic_write_text(p: Path, text: str) -> None:
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


# ----------------------------------------------------------------------------------------------------------------
# Reading for meta-training / evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class MetaTask:
    """One task's tensors for the predictor: teacher map/code/acc and its students (ok runs).

    `acc` is the label: the seed-0 KD accuracy, or with `label="mean"` the mean over the two KD seeds when every
    student of the task has both (`label_seeds` says which). `seed_pairs` [M, 2]: both seeds' accuracies of the M
    students that have a second seed (the label-noise ceiling), None when there are none."""

    task_id: str
    role: str
    source: str
    teacher_acc: float
    teacher_map: torch.Tensor  # [1, C, h, w]
    teacher_code: torch.Tensor  # [D]
    maps: torch.Tensor  # [N, C, h, w]
    codes: torch.Tensor  # [N, D]
    acc: torch.Tensor  # [N] best KD accuracy (fraction)
    flops: np.ndarray
    params: np.ndarray
    archs: list[ArchConfig]
    num_classes: int = 0
    label_seeds: int = 1
    seed_pairs: np.ndarray | None = None


LABELS = ("first", "mean")


def load_meta_tasks(root: str | Path, roles: tuple[str, ...] = ROLES, label: str = "first") -> list[MetaTask]:
    """The tasks of `roles` with their ok students. `label`: "first" (the seed-0 accuracy, what meta-training
    uses) or "mean" (the mean of the two KD seeds where every student has both: a more reliable label)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    store = MetaDatasetStore(root)
    tasks = store.task_rows().to_pylist()
    if not tasks:
        raise ValueError(f"{root}: no tasks.parquet (is this a meta-dataset directory?)")
    st = store.students().to_pylist()
    by_task: dict[str, list[dict]] = {}
    for r in st:
        if r["status"] == "ok":
            by_task.setdefault(r["task_id"], []).append(r)
    out = []
    for tr in tasks:
        if tr["role"] not in roles:
            continue
        space = SpaceConfig.from_dict(json.loads(tr["space_json"]))
        shape = tuple(tr["embedding_shape"])
        rows = [r for r in by_task.get(tr["task_id"], []) if r["replicate"] == 0]
        rows.sort(key=lambda r: r["arch_digest"])
        if not rows:
            continue
        second = {r["arch_digest"]: r["best_acc"] for r in by_task.get(tr["task_id"], []) if r["replicate"] == 1}
        both = all(r["arch_digest"] in second for r in rows)
        pairs = np.array([[r["best_acc"], second[r["arch_digest"]]] for r in rows if r["arch_digest"] in second])
        acc = pairs.mean(1) if (label == "mean" and both) else np.array([r["best_acc"] for r in rows])

        def emb(b: bytes) -> torch.Tensor:
            return torch.from_numpy(np.frombuffer(b, dtype=np.float16).astype(np.float32).reshape(shape))

        out.append(MetaTask(
            task_id=tr["task_id"], role=tr["role"], source=tr["source"], teacher_acc=tr["teacher_acc"],
            teacher_map=emb(tr["teacher_embedding"]).unsqueeze(0),
            teacher_code=torch.from_numpy(space.encode(space.teacher()).astype(np.float32)),
            maps=torch.stack([emb(r["embedding"]) for r in rows]),
            codes=torch.tensor([r["encoding"] for r in rows], dtype=torch.float32),
            acc=torch.tensor(acc, dtype=torch.float32),
            flops=np.array([r["flops"] for r in rows]), params=np.array([r["params"] for r in rows]),
            archs=[ArchConfig.from_json(r["arch_json"]) for r in rows],
            num_classes=int(tr["num_classes"]), label_seeds=2 if (label == "mean" and both) else 1,
            seed_pairs=pairs if len(pairs) else None,
        ))
    return out


def dataset_task(path: str | Path, scale: ScaleConfig, seed: int = 0, data_root: str | Path | None = None,
                 classes: tuple[str, ...] = ()) -> tuple[TaskSpec, TensorData]:
    """A user dataset as one task over all its classes, or over `classes` (names or label numbers; the task's
    labels follow the dataset's label order): per class up to `scale.train_per_class` training and
    `scale.val_per_class` validation images (fewer, 80/20, when a class is small). Deterministic in `seed`."""
    from dass_ray.data import DatasetError
    from dass_ray.service.contract import resolve_classes

    p = resolve_dataset_path(path, data_root)
    ds = load_dataset(p)
    pool = sorted(resolve_classes(classes, ds.class_names)) if classes else list(range(ds.num_classes))
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
                                   class_pool=pool if classes else None)[0]
    tr, va = load_task_data(task, ds)
    return task, TensorData.from_datasets(tr, va, get_space(scale.space).image_size)
