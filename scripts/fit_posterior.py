#!/usr/bin/env python
"""Fit the search posterior's prior (`dass_ray.core.posterior`) on the meta-dataset, and check it by leaving each
source out.

The prior's hyperparameters (the weights' means and spreads over the pool features, the residual kernel, the KD
noise) maximise the marginal likelihood of the measured pools of the `--roles` tasks (meta-training and
meta-validation; never the meta-test tasks), scored by the shipped predictor. `--cv` first runs the
meta-validation that chose the search's default: for each source, the prior is fit on the other sources' tasks and
the held-out source's tasks are searched (greedy posterior mean, and the fixed orders) under no budget and FLOPs
budgets at the pool's 50th / 25th percentile; it reports mean KD trials to within 0.5 points of the best and the
regret after 3 trials, and the 90% intervals' coverage and mean absolute error after 0, 1 and 3 measured students.

    python scripts/fit_posterior.py --cv --output dass_ray/assets/predictor/posterior_prior.json

Writes the prior (JSON, with its manifest under "fit": command, code version, tasks, predictor digest, seconds).
Last line: one JSON object {"prior": path, "cv": {...} or null, "seconds": s}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
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
BUDGETS = {"none": None, "p50": 50, "p25": 25}


def pools_from(metadataset: str, roles: tuple[str, ...], predictor: str, scale: str = "cpu"):
    from dass_ray.core.config import get_scale
    from dass_ray.core.meta import load_predictor
    from dass_ray.core.posterior import PoolData
    from dass_ray.core.space import get_space
    from dass_ray.offline.metadataset import load_meta_tasks
    from dass_ray.offline.metatrain import predict_task

    space = get_space(get_scale(scale).space)
    model, _ = load_predictor(predictor, space)
    out = []
    for t in load_meta_tasks(metadataset, roles, label="mean"):
        out.append((t.source, PoolData(t.task_id, predict_task(model, t), np.asarray(t.params, float),
                                       np.asarray(t.flops, float), t.acc.numpy().astype(float), t.teacher_acc,
                                       t.num_classes, t.codes.numpy())))
    return out


def in_budget(pool, pct):
    return pool if pct is None else pool.subset(pool.flops <= np.percentile(pool.flops, pct))


def search_metrics(prior, pool) -> dict:
    """Trials to within 0.5 points and regret after 3 trials of the posterior search and the fixed orders."""
    from dass_ray.core.posterior import PoolModel, simulate_search
    from dass_ray.core.ranking import size_blend, trials_needed

    acc = pool.acc
    orders = {
        "posterior": simulate_search(PoolModel(prior, pool.scores, pool.params, pool.flops, pool.teacher_acc,
                                               pool.num_classes, pool.codes), acc, stop_after_best=3),
        "dass_size": list(np.argsort(-size_blend(pool.scores, pool.params, pool.teacher_acc, pool.num_classes),
                                     kind="mergesort")),
        "dass": list(np.argsort(-pool.scores, kind="mergesort")),
        "params": list(np.argsort(-pool.params, kind="mergesort")),
    }
    return {k: {"trials": trials_needed(o, acc), "regret3": float(100 * (acc.max() - acc[o[:3]].max()))}
            for k, o in orders.items()}


def calibration(prior, pool, measured: int) -> tuple[float, float]:
    from dass_ray.core.posterior import PoolModel, calibration_after

    c = calibration_after(PoolModel(prior, pool.scores, pool.params, pool.flops, pool.teacher_acc, pool.num_classes,
                                    pool.codes), pool.acc, measured)
    return c["coverage"], c["mae_points"]


def cross_validate(pools, rbf: bool, steps: int) -> dict:
    from dass_ray.core.posterior import fit_prior

    sources = sorted({s for s, _ in pools})
    per: dict = {b: {} for b in BUDGETS}
    cal: dict = {k: {"coverage": [], "mae": []} for k in (0, 1, 3)}
    for src in sources:
        prior = fit_prior([p for s, p in pools if s != src], rbf=rbf, steps=steps)
        for s, p in pools:
            if s != src:
                continue
            for b, pct in BUDGETS.items():
                per[b][p.task_id] = search_metrics(prior, in_budget(p, pct))
            for k in cal:
                c, e = calibration(prior, p, k)
                cal[k]["coverage"].append(c)
                cal[k]["mae"].append(e)
        print(f"cv: {src} held out", file=sys.stderr, flush=True)
    summary = {}
    for b, tasks in per.items():
        strategies = next(iter(tasks.values())).keys()
        summary[b] = {k: {m: round(float(np.mean([v[k][m] for v in tasks.values()])), 3) for m in ("trials", "regret3")}
                      for k in strategies}
    return {"tasks": len(pools), "sources": sources, "mean": summary, "per_task": per,
            "calibration": {str(k): {m: round(float(np.mean(v)), 3) for m, v in d.items()} for k, d in cal.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", default=str(ROOT / "artifacts" / "metadataset"))
    ap.add_argument("--predictor", default=str(ROOT / "dass_ray" / "assets" / "predictor" / "cpu.pt"))
    ap.add_argument("--roles", default="train,val", help="tasks the prior is fit on (never the test tasks)")
    ap.add_argument("--no-rbf", action="store_true", help="no residual kernel over architecture encodings")
    ap.add_argument("--steps", type=int, default=300, help="L-BFGS iterations")
    ap.add_argument("--cv", action="store_true", help="leave-one-source-out meta-validation first")
    ap.add_argument("--output", default=str(ROOT / "dass_ray" / "assets" / "predictor" / "posterior_prior.json"))
    args = ap.parse_args(argv)
    roles = tuple(r for r in args.roles.split(",") if r)
    if "test" in roles:
        print("error: --roles: the meta-test tasks decide once, after the choice; fit on train/val only",
              file=sys.stderr)
        return 2
    from dass_ray.core.posterior import fit_prior

    t0 = time.time()
    try:
        pools = pools_from(args.metadataset, roles, args.predictor)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cv = cross_validate(pools, not args.no_rbf, min(args.steps, 100)) if args.cv else None
    prior = fit_prior([p for _, p in pools], rbf=not args.no_rbf, steps=args.steps)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    import dataclasses

    fit = dict(prior.fit, command="python scripts/fit_posterior.py " + " ".join(argv or sys.argv[1:]),
               code_version=commit, metadataset=Path(args.metadataset).name, roles=list(roles),
               predictor=Path(args.predictor).name,
               predictor_sha256=hashlib.sha256(Path(args.predictor).read_bytes()).hexdigest()[:16],
               seconds=round(time.time() - t0, 1))
    if cv is not None:
        fit["cv"] = {k: v for k, v in cv.items() if k != "per_task"}
    prior = dataclasses.replace(prior, fit=fit)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(prior.to_json() + "\n")
    print(json.dumps({"prior": str(out), "cv": cv, "seconds": fit["seconds"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
