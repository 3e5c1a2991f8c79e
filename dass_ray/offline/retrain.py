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

from dass_ray.core.meta import load_predictor, save_predictor
from dass_ray.core.space import SpaceConfig
from dass_ray.fileutil import code_version
from dass_ray.offline.metadataset import MetaTask, atomic_write_text, load_history, load_meta_tasks
from dass_ray.offline.metatrain import MetaTrainConfig, evaluate, new_model
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
    m = evaluate(model, tasks)["mean_spearman"] if tasks else float("nan")
    return round(m, 4) if np.isfinite(m) else None


def _run_name(version: int, parent: str | Path, cfg: MetaTrainConfig) -> str:
    """The Ray Train run name: the same version, parent and options rerun after an interruption resume its
    checkpoint (with the data as it is then: a history that grew meanwhile adds its new tasks); other options or
    another parent start afresh."""
    import hashlib

    from dass_ray.fileutil import sha256_file

    key = json.dumps([sha256_file(parent), cfg.to_dict()], sort_keys=True, default=str)
    return f"v{version}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


class _Events:
    """The retrain's progress as the search's event log (`events.jsonl`, read by the service), when asked for;
    reopened for each line because the Ray Train controller writes some of them from its own process."""

    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        """Append one line with the next sequence number (never rewrites the file: the service reads it meanwhile;
        a torn last line from a kill is cut by the service before it relaunches)."""
        if self.path is None:
            return
        import os

        from dass_ray.contract import STAGES

        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        seq = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    seq = int(json.loads(line)["seq"]) + 1
                except (ValueError, KeyError):
                    break
        ev = {"seq": seq, "time": time.time(), "stage": stage, "done": int(done), "total": int(total),
              "message": message}
        with open(self.path, "a") as f:
            f.write(json.dumps(ev) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _locked(d: Path):
    """An exclusive lock on the history's predictor directory: one retrain of a history at a time."""
    import fcntl

    f = open(d / ".retrain.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"{d.parent}: another retrain of this history is running; wait for it to finish") from None
    return f


def promotion(before: dict, after: dict) -> tuple[bool, str]:
    """Whether a new version may become `latest`, and why (mean validation Spearman of the parent, `before`, and of
    the new version, `after`: on the meta-validation tasks, on the held-out tasks of the history, and on both).

    The user's own domain decides: a version is promoted only when it ranks the held-out tasks of the history at
    least as well as its parent and is not worse on all validation tasks together. A history with no held-out
    task to judge (fewer than two tasks with >= 3 measured students) gives no evidence about the user's domain,
    so nothing is promoted: better on the meta-validation tasks alone is not enough (measured: two versions
    promoted that way both ranked their user's next MNIST task worse; docs/history.md)."""
    hb, ha = before["history_held_out"], after["history_held_out"]
    if ha is None or hb is None:
        return False, ("no held-out task of the history to validate on (needs two or more tasks with >= 3 measured "
                       "students); run more searches with --history, then retrain")
    if ha < hb:
        return False, f"worse than its parent on the held-out history tasks ({ha:.3f} < {hb:.3f})"
    if after["all"] is not None and before["all"] is not None and after["all"] < before["all"]:
        return False, f"worse than its parent on all validation tasks ({after['all']:.3f} < {before['all']:.3f})"
    return True, f"at least as good as its parent on the held-out history tasks ({ha:.3f} >= {hb:.3f}) and overall"


def retrain(history: str | Path, metadataset: str | Path, parent: str | Path, space: SpaceConfig, *,
            episodes: int = 100, lr: float = 2e-4, holdout: float = 0.25, seed: int = 0, workers: int = 1,
            threads: int = 1, command: str = "", events: str | Path | None = None) -> dict:
    """Write the next version; returns its manifest. `events`: also write progress lines there (the search's
    event-log format). Rerun with the same inputs after an interruption, it resumes from its last checkpoint."""
    emit = _Events(Path(events) if events else None)
    emit("load", 0, 1, "loading the history and the meta-dataset")
    hist = load_history(history)
    hist_train, hist_val = split_history(hist, holdout, seed)
    train = load_meta_tasks(metadataset, ("train",)) + hist_train
    meta_val = [t for t in load_meta_tasks(metadataset, ("val",)) if len(t.acc) >= 3]  # a rank needs 3 points
    val = meta_val + hist_val
    parent_model, parent_blob = load_predictor(parent, space)
    d = versions_dir(history)
    d.mkdir(parents=True, exist_ok=True)
    lock = _locked(d)
    try:
        version = _next_version(d)
        pcfg = (parent_blob.get("meta") or {}).get("config") or {}  # the parent's objective carries over
        cfg = MetaTrainConfig(episodes=episodes, lr=lr, eval_every=max(1, episodes // 10), seed=seed,
                              rank_weight=float(pcfg.get("rank_weight", 0.0)),
                              rank_temperature=float(pcfg.get("rank_temperature", 0.02)),
                              adaptation=parent_model.adaptation, inner_clip=parent_model.inner_clip)
        name = _run_name(version, parent, cfg)
        n_hist = sum(len(t.acc) for t in hist)
        emit("load", 1, 1, f"v{version}: {len(hist)} history tasks ({n_hist} students; {len(hist_train)} train, "
             f"{len(hist_val)} held out) + {len(train) - len(hist_train)} meta-training tasks; validation on "
             f"{len(val)} tasks")

        def progress(m: dict) -> None:
            sp = m.get("val_spearman")
            emit("retrain", int(m.get("episode", 0)), episodes,
                 f"episode {m.get('episode')}/{episodes}, loss {m.get('loss', float('nan')):.4f}"
                 + (f", validation Spearman {sp:.3f}" if sp is not None else ""))

        t0 = time.time()
        out = meta_train(space, train, val, cfg, num_workers=workers, threads=threads, storage=d / "ray",
                         name=name, init={k: v.clone() for k, v in parent_model.state_dict().items()},
                         progress=progress if events else None)
        model = new_model(space, cfg, train)  # adapts to a teacher as its parent does (judged the same way)
        model.load_state_dict(out["best"])
        teachers = [t.teacher_acc for t in train]
        before = {"meta_val": _mean_spearman(parent_model, meta_val),
                  "history_held_out": _mean_spearman(parent_model, hist_val), "all": _mean_spearman(parent_model, val)}
        after = {"meta_val": _mean_spearman(model, meta_val),
                 "history_held_out": _mean_spearman(model, hist_val), "all": _mean_spearman(model, val)}
        promoted, why = promotion(before, after)
        meta = {"version": f"v{version}", "parent": str(parent), "parent_version": (parent_blob.get("meta") or {}).get(
                    "version", "shipped"),
                "command": command, "code_version": code_version(), "wall_s": round(time.time() - t0, 1),
                "created_unix_s": time.time(), "run_name": name, "resumed_from_episode": out["resumed_from"],
                "config": cfg.to_dict(), "metadataset": str(metadataset), "history": str(history),
                "history_tasks": len(hist), "history_students": n_hist,
                "train_tasks": [t.task_id for t in train], "val_tasks": [t.task_id for t in val],
                "history_train_tasks": [t.task_id for t in hist_train],
                "history_val_tasks": [t.task_id for t in hist_val],
                "val_spearman_before": before, "val_spearman_after": after, "best_episode": out["best_episode"],
                "train_teacher_acc_range": [min(teachers), max(teachers)], "adaptation": model.adaptation,
                **({"inner_clip": model.inner_clip} if model.adaptation == "clip" else {}), "promoted": promoted,
                "promotion": why}
        path = d / f"v{version}.pt"
        save_predictor(path, model, space, meta)
        atomic_write_text(path.with_suffix(".json"), json.dumps(meta, indent=1))
        if promoted:
            atomic_write_text(d / LATEST, path.name + "\n")
    finally:
        lock.close()
    return meta


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def summary(meta: dict) -> str:
    """One line for people: the version, validation before/after, and whether it became latest."""
    b, a = meta["val_spearman_before"]["all"], meta["val_spearman_after"]["all"]
    return (f"{meta['version']}: validation Spearman {_fmt(b)} (parent {meta['parent_version']}) -> {_fmt(a)}; "
            + ("now latest" if meta["promoted"] else f"not made latest: {meta.get('promotion', '')}"))


def parser():
    """`scripts/retrain.py`'s options."""
    import argparse

    from dass_ray.search.rayutil import ADDRESS_HELP, NUM_CPUS_HELP

    from dass_ray.fileutil import REPO_ROOT

    ap = argparse.ArgumentParser(
        prog="retrain.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Retrain the predictor on a search history (the students that searches run with --history "
        "measured).\n\n  python scripts/retrain.py --history ~/dass-history\n  python scripts/search.py "
        "--history ~/dass-history --predictor latest --dataset ...\n\nFine-tunes with Ray Train on the shipped "
        "meta-dataset's training tasks plus the history's tasks, selects on the meta-validation tasks plus held-out "
        "history tasks, writes <history>/predictors/vN.pt and vN.json, and makes it LATEST only if it is at least "
        "as good as its parent there. Rerunning after an interruption resumes.")
    ap.add_argument("--history", required=True, help="search history directory (scripts/search.py --history)")
    ap.add_argument("--metadataset", default=str(REPO_ROOT / "artifacts" / "metadataset"),
                    help="meta-dataset whose train/val tasks are kept (default: the shipped one)")
    ap.add_argument("--parent", default=None, help="predictor to fine-tune (default: the history's latest, "
                    "else the shipped predictor)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4, help="meta learning rate (Adam)")
    ap.add_argument("--holdout", type=float, default=0.25, help="fraction of history tasks held out for selection")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    ap.add_argument("--address", default=None, help=ADDRESS_HELP)
    ap.add_argument("--num-cpus", type=int, default=None, help=NUM_CPUS_HELP)
    ap.add_argument("--output", default=None, help="also write progress (events.jsonl) and the new version's "
                    "manifest (retrain.json) here (what the service's retrain jobs read)")
    return ap


def _release_train_coordinator() -> None:
    """Ray Train creates a detached `AutoscalingCoordinator` actor on the cluster (one per cluster, on first use)
    and never removes it: on a long-lived head (the service's), a retrain would leave it running. It is removed
    when no other Train run on the cluster is alive (they share it)."""
    import sys

    import ray

    if not ray.is_initialized():
        return
    try:
        actor = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
    except ValueError:  # none (or a Ray that names it otherwise)
        return
    try:
        from ray.util.state import list_actors

        mine = ray.get_runtime_context().get_job_id()  # this run's controller may not have exited yet
        others = [a for a in list_actors(filters=[("class_name", "=", "TrainController"), ("state", "=", "ALIVE")])
                  if a.job_id != mine]
    except Exception as e:  # noqa: BLE001 - no state API (a head without a dashboard): leave it
        print(f"Ray Train's AutoscalingCoordinator actor is left on the cluster (cannot list Train runs: {e})",
              file=sys.stderr)
        return
    if others:
        print(f"Ray Train's AutoscalingCoordinator actor is left on the cluster: {len(others)} other Train run(s) "
              f"use it", file=sys.stderr)
    else:
        ray.kill(actor)


def main(argv=None) -> int:
    """`scripts/retrain.py` (and `python -m dass_ray.offline.retrain`, which the service runs as a job)."""
    import shlex
    import sys

    ap = parser()
    args = ap.parse_args(argv)
    if args.episodes < 1:
        ap.error(f"--episodes must be >= 1, got {args.episodes}")
    if not 0.0 <= args.holdout < 1.0:
        ap.error(f"--holdout must be in [0, 1), got {args.holdout}")

    from dass_ray.core.space import get_space
    from dass_ray.search.history import latest_predictor
    from dass_ray.search.inputs import DEFAULT_PREDICTOR
    from dass_ray.search.rayutil import init_ray

    out = Path(args.output) if args.output else None
    events = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        events = out / "events.jsonl"
    emit = _Events(events)
    parent = args.parent or latest_predictor(args.history) or DEFAULT_PREDICTOR
    try:
        init_ray(args.address, args.num_cpus)
        meta = retrain(args.history, args.metadataset, parent, get_space("cpu"), episodes=args.episodes,
                       lr=args.lr, holdout=args.holdout, seed=args.seed, workers=args.workers, events=events,
                       command="python " + " ".join(shlex.quote(a) for a in sys.argv))
    except ValueError as e:
        emit("failed", 0, 0, str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import ray

        _release_train_coordinator()
        ray.shutdown()
    if out is not None:
        atomic_write_text(out / "retrain.json", json.dumps(meta, indent=1))
    emit("done", 1, 1, summary(meta))
    print(summary(meta), file=sys.stderr)
    print(json.dumps({k: meta[k] for k in ("version", "parent", "val_spearman_before", "val_spearman_after",
                                           "promoted", "resumed_from_episode", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
