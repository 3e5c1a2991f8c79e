#!/usr/bin/env python
"""Choose the meta-learning schedule and objective on the meta-validation tasks only: meta-train one predictor per
(lr, weight decay, ranking-term weight, objective, seed) setting in a grid (plain PyTorch,
`metatrain.train_local`, the same computation as the Ray Train path with one worker) and report each one's mean
Spearman on the meta-validation tasks with the teacher-guided adaptation step, with it gated as the search gates
it (no step for a teacher outside the meta-training teachers' accuracy range), with the step's teacher residual
clipped (a trust region, `CLIPS`), and without it. Meta-test tasks are never loaded.

    python scripts/sweep_meta.py --metadataset artifacts/metadataset --lr 5e-4,1e-3,2e-3,4e-3 --weight-decay 0,0.01,0.1 \
        [--rank-weight 0,1] --output artifacts/metaval_sweep.json

Settings run in parallel, one process and one torch thread each (`--jobs`, default: the machine's CPUs).
Objectives (`--train-adaptation`, `--task-weight`, see `metatrain.episode_loss_sum`) are grid dimensions too; with
several `--seed`s every setting is trained once per seed and its seed-ensemble (mean prediction) is evaluated.
Last line: one JSON object {"runs": [...], "best": {...}[, "ensembles": [...]]} (best = highest mean validation
Spearman with adaptation; the --output file adds each run's per-student validation predictions).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()


CLIPS = (0.05, 0.1, 0.2)  # trust-region radii evaluated for every trained predictor (accuracy units)


def _one(args: tuple) -> dict:
    root, scale_name, episodes, lr, wd, rank_weight, seed, train_adaptation, task_weight = args
    import torch

    torch.set_num_threads(1)
    from dass_ray.core.config import get_scale
    from dass_ray.offline.metadataset import load_meta_tasks
    from dass_ray.offline.metatrain import MetaTrainConfig, evaluate, predict_task, train_local
    from dass_ray.core.space import get_space

    scale = get_scale(scale_name)
    train, val = load_meta_tasks(root, ("train",)), load_meta_tasks(root, ("val",))
    cfg = MetaTrainConfig(episodes=episodes, lr=lr, weight_decay=wd, inner_lr=scale.meta_inner_lr,
                          query_size=scale.meta_query_size, eval_every=scale.meta_eval_every, seed=seed,
                          rank_weight=rank_weight, train_adaptation=train_adaptation, task_weight=task_weight,
                          # model selection as the predictor would be used: a shift-trained one has no step
                          adaptation="none" if train_adaptation == "shift" else "step")
    t0 = time.time()
    model, info = train_local(get_space(scale.space), train, val, cfg)
    model.adaptation = "step"
    ev = evaluate(model, val, True)
    preds = {"step": {t.task_id: predict_task(model, t).tolist() for t in val}}
    clipped = {}
    for c in CLIPS:  # the trust-region alternative to the gate: the teacher's residual clipped to +-c
        model.adaptation, model.inner_clip = "clip", c
        clipped[str(c)] = evaluate(model, val, True)
    model.adaptation = "none"  # the ranking without a step (scores shifted to the teacher's accuracy)
    ev0 = evaluate(model, val, True)
    preds["none"] = {t.task_id: predict_task(model, t).tolist() for t in val}
    accs = [t.teacher_acc for t in train]
    model.adaptation, model.teacher_acc_range = "gate", (min(accs), max(accs))  # outside the range: no step
    evg = evaluate(model, val, True)
    return {"lr": lr, "weight_decay": wd, "rank_weight": rank_weight, "train_adaptation": train_adaptation,
            "task_weight": task_weight, "episodes": episodes, "seed": seed,
            "val_spearman": ev["mean_spearman"], "val_spearman_no_adapt": ev0["mean_spearman"],
            "val_spearman_gated": evg["mean_spearman"],
            "val_spearman_clipped": {c: e["mean_spearman"] for c, e in clipped.items()},
            "per_task_by_method": {"step": {k: v["spearman"] for k, v in ev["tasks"].items()},
                                   "gated": {k: v["spearman"] for k, v in evg["tasks"].items()},
                                   "none": {k: v["spearman"] for k, v in ev0["tasks"].items()},
                                   **{f"clip{c}": {k: v["spearman"] for k, v in e["tasks"].items()}
                                      for c, e in clipped.items()}},
            "val_teacher_acc": {t.task_id: round(t.teacher_acc, 3) for t in val},
            "per_task": {k: v["spearman"] for k, v in ev["tasks"].items()},
            "best_episode": info["best_episode"], "wall_s": round(time.time() - t0, 1),
            "val_predictions": preds, "val_labels": {t.task_id: t.acc.tolist() for t in val}}


SETTING = ("lr", "weight_decay", "rank_weight", "train_adaptation", "task_weight", "episodes")


def ensembles(runs: list[dict]) -> list[dict]:
    """For every setting trained with several seeds: the validation Spearman of the seed-ensemble (the mean of its
    members' predictions) beside the members' own, per adaptation ("step", "none")."""
    import numpy as np

    from dass_ray.core.meta import spearman

    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in SETTING), []).append(r)
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        row = {**dict(zip(SETTING, key)), "seeds": [m["seed"] for m in members]}
        for mode in ("step", "none"):
            per = {}
            for task, y in members[0]["val_labels"].items():
                p = np.mean([m["val_predictions"][mode][task] for m in members], axis=0)
                per[task] = spearman(p, y)
            judged = [v for v in per.values() if np.isfinite(v)]
            key_single = "val_spearman" if mode == "step" else "val_spearman_no_adapt"
            row[mode] = {"ensemble": float(np.mean(judged)), "per_task": per,
                         "members": [m[key_single] for m in members],
                         "members_mean": float(np.mean([m[key_single] for m in members]))}
        out.append(row)
    return out


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(field: str):
    from dass_ray.offline.metatrain import TASK_WEIGHTS, TRAIN_ADAPTATIONS

    allowed = {"train_adaptation": TRAIN_ADAPTATIONS, "task_weight": TASK_WEIGHTS}[field]

    def parse(s: str) -> list[str]:
        names = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(allowed)}, got {s!r}")
        return names
    return parse


def main(argv=None) -> int:
    import os

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", required=True, help="meta-dataset directory (scripts/build_metadataset.py)")
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--lr", type=_floats, default=[5e-4], help="comma-separated meta learning rates")
    ap.add_argument("--weight-decay", type=_floats, default=[0.0], help="comma-separated AdamW weight decays")
    ap.add_argument("--rank-weight", type=_floats, default=[0.0], help="comma-separated weights of the pairwise "
                    "ranking term of the query loss (0: MSE only)")
    ap.add_argument("--train-adaptation", type=_names("train_adaptation"), default=["step"],
                    help="comma-separated meta-objectives: step (learn the teacher-guided step), shift (learn "
                         "accuracies relative to the teacher's)")
    ap.add_argument("--task-weight", type=_names("task_weight"), default=["equal"],
                    help="comma-separated task weightings: equal, spread (each task's MSE over its accuracies' "
                         "variance)")
    ap.add_argument("--seed", type=_ints, default=[0], help="comma-separated seeds; with several, each setting is "
                    "trained once per seed and the seed-ensemble (mean prediction) is evaluated too")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--output", default=None, help="write the runs as JSON here too")
    args = ap.parse_args(argv)
    if (args.episodes < 1 or args.jobs < 1 or any(x <= 0 for x in args.lr) or any(x < 0 for x in args.weight_decay)
            or any(x < 0 for x in args.rank_weight)):
        print("error: --episodes and --jobs must be >= 1, --lr > 0, --weight-decay and --rank-weight >= 0",
              file=sys.stderr)
        return 2
    from dass_ray.offline.metadataset import load_meta_tasks

    try:
        if not load_meta_tasks(args.metadataset, ("train",)) or not load_meta_tasks(args.metadataset, ("val",)):
            print(f"error: {args.metadataset}: needs finished students of train and val tasks", file=sys.stderr)
            return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    grid = [(args.metadataset, args.scale, args.episodes, lr, wd, rw, seed, ta, tw) for lr in args.lr
            for wd in args.weight_decay for rw in args.rank_weight for ta in args.train_adaptation
            for tw in args.task_weight for seed in args.seed]
    t0 = time.time()
    runs = []
    with ProcessPoolExecutor(max_workers=min(args.jobs, len(grid))) as ex:
        for r in ex.map(_one, grid):
            runs.append(r)
            clip = ", ".join(f"clip {c} {v:.3f}" for c, v in r["val_spearman_clipped"].items())
            print(f"lr {r['lr']:g} wd {r['weight_decay']:g} rank {r['rank_weight']:g} train "
                  f"{r['train_adaptation']} weight {r['task_weight']}: val Spearman "
                  f"{r['val_spearman']:.3f} (gated {r['val_spearman_gated']:.3f}, {clip}, no adapt "
                  f"{r['val_spearman_no_adapt']:.3f}), best episode {r['best_episode']}", file=sys.stderr, flush=True)
    best = max(runs, key=lambda r: r["val_spearman"] if r["val_spearman"] == r["val_spearman"] else -float("inf"))
    out = {"runs": runs, "best": {k: best[k] for k in ("lr", "weight_decay", "rank_weight", "train_adaptation",
                                                        "task_weight", "seed", "val_spearman", "best_episode")}}
    if len(args.seed) > 1:
        out["ensembles"] = ensembles(runs)
        for e in out["ensembles"]:
            print(f"lr {e['lr']:g} wd {e['weight_decay']:g} rank {e['rank_weight']:g} train {e['train_adaptation']} "
                  f"weight {e['task_weight']}, {len(e['seeds'])} seeds: ensemble val Spearman step "
                  f"{e['step']['ensemble']:.3f} (members' mean {e['step']['members_mean']:.3f}), none "
                  f"{e['none']['ensemble']:.3f} (members' mean {e['none']['members_mean']:.3f})",
                  file=sys.stderr, flush=True)
    if args.output:
        from dass_ray.offline.metadataset import code_version, machine

        man = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "code_version": code_version(),
               "machine": machine(), "wall_s": round(time.time() - t0, 1), "metadataset": args.metadataset}
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({**out, "manifest": man}, indent=1))
    # the last line without the per-student predictions (the --output file keeps them)
    print(json.dumps({**out, "runs": [{k: v for k, v in r.items() if k not in ("val_predictions", "val_labels")}
                                      for r in runs]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
