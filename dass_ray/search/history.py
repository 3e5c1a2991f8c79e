"""A search history (`--history DIR`): every finished search appends the students it distilled, with its task's
teacher embedding and accuracy, as meta-dataset rows (`dass_ray.core.rows`) plus provenance, so a predictor can be
retrained on a user's own domain without the data leaving their machines.

Layout: `DIR/students/<run id>.parquet` (one row per distilled student) and `DIR/tasks/<run id>.parquet` (the
task's row). A search keeps its run id across resumes (`state.json`) and each file is written whole and renamed
into place, so a search that is killed and resumed appends exactly once. `dass_ray.offline.metadataset.
load_history` reads a history back as meta-learning tasks.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dass_ray.core.embed import Embedder
from dass_ray.core.kd import TeacherCheckpoint
from dass_ray.core.rows import HISTORY_STUDENT_SCHEMA, HISTORY_TASK_SCHEMA
from dass_ray.core.space import ArchConfig, SpaceConfig
from dass_ray.fileutil import code_version


def _write(path: Path, rows: list[dict], schema: pa.Schema) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(path)


def dataset_digest(dataset: str | Path, data_root: str | Path | None = None) -> str:
    """What identifies a dataset in a history: the sha256 of its file (of its files' relative paths and sizes for
    an image directory). Not of the images a search drew from it, which depend on the search's seed and scale: the
    searches of one dataset, teacher and classes make one task whatever their seeds."""
    import hashlib

    from dass_ray.core.data import bundled_path, resolve_dataset_path
    from dass_ray.fileutil import sha256_file

    p = Path(dataset)  # found as the search finds it (dass_ray.search.inputs)
    p = resolve_dataset_path(p if p.exists() else bundled_path(str(dataset)), data_root)
    if p.is_file():
        return sha256_file(p)[:16]
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p)}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def task_id_for(dataset_digest: str, teacher: TeacherCheckpoint, classes: tuple[str, ...],
                image_size: int | None = None) -> str:
    """One history task per (data, teacher, classes, image size): searches of the same task share it. Students
    distilled at another size than the teacher's space (`--image-size`) make a task of their own, so accuracies
    within a task stay comparable."""
    import hashlib

    parts = [dataset_digest, teacher.digest(), list(classes)]
    if image_size is not None and image_size != teacher.space.image_size:
        parts.append(int(image_size))
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
    return f"history-{key}"


def record(history: str | Path, run_id: str, *, job_id: str, dataset_digest: str, source: str,
           classes: tuple[str, ...], teacher: TeacherCheckpoint, space: SpaceConfig, trials: list[dict],
           seed: int = 0, probe_seed: int = 0, image_size: int | None = None) -> int:
    """Append this search's measured students (trials with status "ok") to the history; returns how many."""
    ok = [t for t in trials if t["status"] == "ok" and t["measured_acc"] is not None]
    if not ok:
        return 0
    root = Path(history)
    task_id = task_id_for(dataset_digest, teacher, classes, image_size)
    eng = Embedder(teacher.state_dict, space, seed=probe_seed)
    tmap = eng.teacher_embedding()
    archs = [ArchConfig.from_json(t["arch_json"]) for t in ok]
    maps = eng.embed(archs)
    now, version, host = time.time(), code_version(), platform.node()
    prov = {"job_id": job_id, "dataset_digest": dataset_digest, "recorded_unix_s": now}
    students = [{
        "task_id": task_id, "role": "history", "source": source, "teacher_acc": float(teacher.val_acc),
        "arch_json": a.to_json(), "arch_digest": a.digest(), "encoding": space.encode(a).astype(np.float32).tolist(),
        "flops": int(space.flops(a)), "params": int(space.params(a)), "seed": int(seed), "replicate": 0,
        "status": "ok", "reason": "", "best_acc": float(t["measured_acc"]), "final_acc": float(t["final_acc"]),
        "epochs": int(t["epochs"]), "wall_s": float(t["time_s"]),
        "embedding": m.to(torch.float16).numpy().tobytes(), "code_version": version, "host": host, **prov,
    } for a, t, m in zip(archs, ok, maps)]
    task = {"task_id": task_id, "role": "history", "source": source, "num_classes": int(space.num_classes),
            "teacher_acc": float(teacher.val_acc), "teacher_digest": teacher.digest(),
            "teacher_embedding": tmap.squeeze(0).to(torch.float16).numpy().tobytes(),
            "embedding_shape": list(tmap.shape[1:]), "train_wall_s": 0.0, "space_json": json.dumps(space.to_dict()),
            **prov}
    _write(root / "students" / f"{run_id}.parquet", students, HISTORY_STUDENT_SCHEMA)
    _write(root / "tasks" / f"{run_id}.parquet", [task], HISTORY_TASK_SCHEMA)
    return len(students)


# ---- predictor versions retrained on a history: defined by the contract (the torch-free server reads them) ----
from dass_ray.contract import LATEST, latest_predictor, versions_dir  # noqa: E402,F401 - re-exported

__all__ = ["record", "task_id_for", "LATEST", "latest_predictor", "versions_dir"]
