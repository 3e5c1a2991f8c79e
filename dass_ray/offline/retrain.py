"""Retraining the predictor on a search history (`scripts/retrain.py`).

A new version fine-tunes a parent predictor (the shipped one, or the history's latest) with Ray Train on the
meta-dataset's training tasks plus the history's tasks, and selects its episode on the meta-validation tasks plus
held-out history tasks (those with at least 3 measured students; the rest train). Versions live in
`<history>/predictors/`: `vN.pt` with a manifest `vN.json` (parent, data used, validation before and after), and
`LATEST` naming the newest version that is at least as good as its parent on that validation; a worse one is
written but never made latest. An interrupted retrain resumes from its Ray Train checkpoint when rerun.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from dass_ray.core.meta import load_predictor, make_model, save_predictor
from dass_ray.core.space import SpaceConfig
from dass_ray.fileutil import code_version
from dass_ray.offline.metadataset import MetaTask, atomic_write_text, load_history, load_meta_tasks
from dass_ray.offline.metatrain import MetaTrainConfig, evaluate
from dass_ray.offline.metatrain_ray import meta_train
from dass_ray.search.history import LATEST, versions_dir

def history_from_metadataset(metadataset: str | Path, task_ids: list[str], root: str | Path,
                             students: int | None = None) -> None:
    """Write tasks of a meta-dataset (their seed-0 ok students, the first `students` of each) as a search history
    in `root`: how the benchmark simulates a user's history with real measured rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dass_ray.core.rows import HISTORY_STUDENT_SCHEMA, HISTORY_TASK_SCHEMA
    from dass_ray.offline.metadataset import MetaDatasetStore

    store, root = MetaDatasetStore(metadataset), Path(root)
    prov = {"job_id": "simulated", "dataset_digest": "", "recorded_unix_s": time.time()}
    tasks = {r["task_id"]: r for r in store.task_rows().to_pylist()}
    rows = [r for r in store.students().to_pylist() if r["status"] == "ok" and r["replicate"] == 0]
    for i, tid in enumerate(task_ids):
        mine = [dict(r, role="history", **prov) for r in rows if r["task_id"] == tid][:students]
        for sub, data, schema in (("students", mine, HISTORY_STUDENT_SCHEMA),
                                  ("tasks", [dict(tasks[tid], role="history", **prov)], HISTORY_TASK_SCHEMA)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(data, schema=schema), root / sub / f"sim{i}.parquet")


def _next_version(d: Path) -> int:
    done = [int(m.group(1)) for p in d.glob("v*.pt") if (m := re.fullmatch(r"v(\d+)\.pt", p.name))]
    return max(done, default=0) + 1


def split_history(tasks: list[MetaTask], holdout: float, seed: int) -> tuple[list[MetaTask], list[MetaTask]]:
    """(train, held out): a `holdout` fraction (at least one when two or more qualify) of the tasks with >= 3
    students, chosen by `seed`; every other task trains."""
    ok = sorted((t for t in tasks if len(t.acc) >= 3), key=lambda t: t.task_id)
    k = max(1, round(holdout * len(ok))) if len(ok) >= 2 else 0
    held_ids = {t.task_id for t in np.random.default_rng(seed).permutation(np.array(ok, dtype=object))[:k]}
    return [t for t in tasks if t.task_id not in held_ids], [t for t in tasks if t.task_id in held_ids]


def _mean_spearman(model, tasks: list[MetaTask]) -> float | None:
    """Mean Spearman over the tasks where it is defined (a task whose students all measured the same has none)."""
    per = [v["spearman"] for v in evaluate(model, tasks)["tasks"].values()] if tasks else []
    per = [v for v in per if not np.isnan(v)]
    return round(float(np.mean(per)), 4) if per else None


def retrain(history: str | Path, metadataset: str | Path, parent: str | Path, space: SpaceConfig, *,
            episodes: int = 100, lr: float = 2e-4, holdout: float = 0.25, seed: int = 0, workers: int = 1,
            threads: int = 1, command: str = "") -> dict:
    """Write the next version; returns its manifest."""
    hist = load_history(history)
    hist_train, hist_val = split_history(hist, holdout, seed)
    train = load_meta_tasks(metadataset, ("train",)) + hist_train
    meta_val = [t for t in load_meta_tasks(metadataset, ("val",)) if len(t.acc) >= 3]  # a rank needs 3 points
    val = meta_val + hist_val
    parent_model, parent_blob = load_predictor(parent, space)
    d = versions_dir(history)
    d.mkdir(parents=True, exist_ok=True)
    version = _next_version(d)
    cfg = MetaTrainConfig(episodes=episodes, lr=lr, eval_every=max(1, episodes // 10), seed=seed)
    t0 = time.time()
    out = meta_train(space, train, val, cfg, num_workers=workers, threads=threads, storage=d / "ray",
                     name=f"v{version}", init={k: v.clone() for k, v in parent_model.state_dict().items()})
    model = make_model(space, cfg.use_functional, cfg.inner_lr, cfg.seed)
    model.load_state_dict(out["best"])
    teachers = [t.teacher_acc for t in train]
    before = {"meta_val": _mean_spearman(parent_model, meta_val),
              "history_held_out": _mean_spearman(parent_model, hist_val), "all": _mean_spearman(parent_model, val)}
    after = {"meta_val": _mean_spearman(model, meta_val),
             "history_held_out": _mean_spearman(model, hist_val), "all": _mean_spearman(model, val)}
    promoted = after["all"] is not None and (before["all"] is None or after["all"] >= before["all"])
    meta = {"version": f"v{version}", "parent": str(parent), "parent_version": (parent_blob.get("meta") or {}).get(
                "version", "shipped"),
            "command": command, "code_version": code_version(), "wall_s": round(time.time() - t0, 1),
            "config": cfg.to_dict(), "metadataset": str(metadataset), "history": str(history),
            "train_tasks": [t.task_id for t in train], "val_tasks": [t.task_id for t in val],
            "history_train_tasks": [t.task_id for t in hist_train], "history_val_tasks": [t.task_id for t in hist_val],
            "val_spearman_before": before, "val_spearman_after": after, "best_episode": out["best_episode"],
            "train_teacher_acc_range": [min(teachers), max(teachers)], "promoted": promoted}
    path = d / f"v{version}.pt"
    save_predictor(path, model, space, meta)
    atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
    if promoted:
        atomic_write_text(d / LATEST, path.name + "\n")
    return meta
