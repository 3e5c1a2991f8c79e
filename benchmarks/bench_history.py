#!/usr/bin/env python
"""History benchmark: does retraining on a user's own search history help on their next task of that domain?

For every meta-test source with several tasks, each of its tasks is held out in turn; the user's history is the
measured students of the source's other tasks (the meta-dataset's real rows, written as a search history). The
predictor a search with `--predictor latest` would then use (retrained from the shipped one by
`dass_ray.offline.retrain` with its defaults, if it was promoted -- which needs a held-out task of the history to
validate on, so a source with two tasks never promotes; else the shipped one) is compared with the shipped predictor on the
held-out task: Spearman between predicted and measured post-KD accuracy, and KD trials in predicted order until a
student within 0.5 points of the task's best is measured. Tasks with fewer than 3 measured students, or whose
students all measured the same accuracy, have no ranking to judge and are skipped (listed in `skipped`).

    python benchmarks/bench_history.py [--episodes 100]

Last line: one JSON object with tasks, spearman_without, spearman_with, trials_without, trials_with (means over
the held-out tasks; "with" is the predictor the search would use: the retrained version if promoted, else the
shipped one), spearman_retrained / trials_retrained (the retrained version whether promoted or not), promoted (how
many were) and the per-task figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", default=str(ROOT / "artifacts" / "metadataset"))
    ap.add_argument("--predictor", default=str(ROOT / "dass_ray" / "assets" / "predictor" / "cpu.pt"))
    ap.add_argument("--episodes", type=int, default=100, help="fine-tuning episodes of each retrain")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args(argv)

    from dass_ray.core.meta import load_predictor, spearman
    from dass_ray.core.ranking import trials_needed
    from dass_ray.core.space import get_space
    from dass_ray.offline.metadataset import load_meta_tasks
    from dass_ray.offline.metatrain import predict_task
    from dass_ray.offline.retrain import history_from_metadataset, retrain
    from dass_ray.search.history import latest_predictor, versions_dir
    from dass_ray.search.rayutil import init_ray

    space = get_space("cpu")
    tests = load_meta_tasks(args.metadataset, ("test",))
    by_source: dict[str, list] = {}
    for t in tests:
        by_source.setdefault(t.source, []).append(t)
    shipped, _ = load_predictor(args.predictor, space)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(None, args.num_cpus)
    rows, skipped = [], []
    t0 = time.time()
    try:
        for source, ts in sorted(by_source.items()):
            if len(ts) < 2:
                continue
            for held in ts:
                if len(held.acc) < 3 or np.ptp(held.acc.numpy()) == 0:  # no ranking to judge
                    skipped.append(held.task_id)
                    continue
                others = [t.task_id for t in ts if t is not held]
                acc = held.acc.numpy()
                with tempfile.TemporaryDirectory(prefix="bench-history-") as d:
                    history_from_metadataset(args.metadataset, others, d)
                    meta = retrain(d, args.metadataset, args.predictor, space, episodes=args.episodes, lr=args.lr)
                    used = latest_predictor(d)
                    model = load_predictor(used, space)[0] if used else shipped
                    # the version itself, promoted or not: what the retrain learned, shown beside what is used
                    version = load_predictor(versions_dir(d) / f"{meta['version']}.pt", space)[0]
                row = {"task": held.task_id, "source": source, "students": len(acc),
                       "history_students": int(sum(len(t.acc) for t in ts if t is not held)),
                       "promoted": meta["promoted"], "promotion": meta["promotion"]}
                for name, m in (("without", shipped), ("with", model), ("retrained", version)):
                    p = predict_task(m, held)
                    row[f"spearman_{name}"] = round(float(spearman(p, acc)), 4)
                    row[f"trials_{name}"] = trials_needed(list(np.argsort(-p, kind="mergesort")), acc)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        import ray

        ray.shutdown()
    mean = (lambda k: round(float(np.mean([r[k] for r in rows])), 4) if rows else None)
    print(json.dumps({"tasks": len(rows), "spearman_without": mean("spearman_without"),
                      "spearman_with": mean("spearman_with"), "trials_without": mean("trials_without"),
                      "trials_with": mean("trials_with"), "spearman_retrained": mean("spearman_retrained"),
                      "trials_retrained": mean("trials_retrained"), "promoted": sum(r["promoted"] for r in rows),
                      "skipped": skipped, "episodes": args.episodes, "wall_s": round(time.time() - t0, 1),
                      "per_task": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
