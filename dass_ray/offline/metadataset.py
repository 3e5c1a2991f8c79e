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

import json
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dass_ray.core.config import ScaleConfig
from dass_ray.core.data import load_dataset, resolve_dataset_path
from dass_ray.core.tasks import TaskSpec, load_task_data
from dass_ray.core.embed import embed_reference, noise_input
from dass_ray.core.kd import SoftLabels, TensorData, TrainResult, train_kd
from dass_ray.core.space import ArchConfig, SpaceConfig
from dass_ray.core.rows import STUDENT_SCHEMA, TASK_SCHEMA  # noqa: F401 - the store's schemas
from dass_ray.fileutil import code_version
from dass_ray.offline.plans import ROLES

# Scale fields that only say how much to run (a plan may change them on a resume); the rest define the labels.
_COUNT_FIELDS = ("students_per_task", "students_per_test_task", "noise_ceiling_students", "meta_episodes",
                 "meta_lr", "meta_inner_lr", "meta_query_size", "meta_eval_every", "threads_per_run", "name")

def machine() -> dict:
    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "torch": str(torch.__version__), "threads": torch.get_num_threads()}


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
                threads: int | None = None, device: str = "auto") -> dict:
    """KD-train one student on `device` (`dass_ray.core.kd.resolve_device`) and return its meta-dataset row (a
    failed run is a row with status 'failed')."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        res = train_kd(arch, ctx.space, ctx.teacher_sd, ctx.data, scale.kd, seed=seed, soft=ctx.soft, device=device)
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
    return meta_tasks_from_rows(tasks, store.students().to_pylist(), roles, label)


def load_history(root: str | Path) -> list[MetaTask]:
    """A search history (`scripts/search.py --history DIR`, `dass_ray.search.history`) as meta-learning tasks
    (role "history"; several searches of the same data, teacher and classes make one task)."""
    root = Path(root)
    parts = {k: sorted((root / k).glob("*.parquet")) for k in ("tasks", "students")}
    if not parts["tasks"]:
        raise ValueError(f"{root}: no search history here (expected tasks/*.parquet written by --history)")
    tasks = {r["task_id"]: r for p in parts["tasks"] for r in pq.read_table(p).to_pylist()}
    seen, students = set(), []
    for p in parts["students"]:
        for r in pq.read_table(p).to_pylist():
            if (r["task_id"], r["arch_digest"]) not in seen:  # a student measured by two searches counts once
                seen.add((r["task_id"], r["arch_digest"]))
                students.append(r)
    return meta_tasks_from_rows(list(tasks.values()), students, ("history",), "first")


def meta_tasks_from_rows(tasks: list[dict], st: list[dict], roles: tuple[str, ...], label: str) -> list[MetaTask]:
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


def task_kd_start(store: MetaDatasetStore, spec: TaskSpec, task: MetaTask, scale: ScaleConfig,
                  data_root: str | Path | None = None, cache: dict | None = None) -> np.ndarray | None:
    """Per student of `task`, the KD loss its remapped student starts distillation from
    (`dass_ray.core.kd.kd_start_loss` over `kd_start_images`), with the task's teacher and soft labels from `store`
    (soft labels recomputed if absent). None when the store holds no teacher checkpoint for the task
    (meta-training and validation teachers are not kept)."""
    from dass_ray.core.kd import compute_soft_labels, init_student, kd_start_images, kd_start_loss, load_teacher

    tp = store.teacher_path(task.task_id)
    if not tp.exists():
        return None
    ck = load_teacher(tp)
    data = task_data(spec, ck.space.image_size, data_root, cache)
    sp = store.root / "soft" / f"{task.task_id}.parquet"
    soft = (SoftLabels.load(sp, expect={"teacher": ck.digest(), "data": data.fingerprint()}) if sp.exists()
            else compute_soft_labels(ck.model(), data.x_train, views=2 if scale.kd.flip else 1, device="cpu"))
    idx = kd_start_images(len(data.y_train))
    x, y, logits = data.x_train[idx], data.y_train[idx], soft.logits[:, idx]
    return np.array([kd_start_loss(init_student(a, ck.space, ck.state_dict, ck.arch, scale.kd.remap), x, y, logits,
                                   scale.kd) for a in task.archs])
