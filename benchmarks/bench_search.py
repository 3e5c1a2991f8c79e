#!/usr/bin/env python
"""Search efficiency on meta-test pools with known KD labels: how many KD trials each strategy needs before it has
found a student within 0.5 accuracy points of the pool's best.

Strategies: `default`, exactly what scripts/search.py does with default options (its SearchConfig defaults: its
`order`, `dass_size`, or re-adaptation if that were the default); `dass`, the predicted order of the shipped
predictor after its own teacher-guided adaptation (the checkpoint's `adaptation`: gate, step, clip or none);
`dass_readapt` (after each trial, adapt on the teacher plus the students measured so far and re-rank the rest);
`dass_size`, the DaSS order blended with parameter count for a teacher well above chance
(`dass_ray.core.ranking.size_blend`); random order (mean over 200 permutations); Optuna TPE through Ray Tune
(per-stage depth and width-multiplier parameters, mapped to the nearest pool member by encoding, never proposing a
pool member twice). A "trial" looks up the pool's recorded KD accuracy.

    python benchmarks/bench_search.py --metadataset artifacts/metadataset --predictor dass_ray/assets/predictor/cpu.pt
Labels: the mean of two KD seeds where every student of a task has both (--label). Last line: one JSON object
{"trials_to_within_0_5pt": {strategy: {task: n, "mean": m}}, ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from dass_ray.core.ranking import DEFAULT_ORDER, size_blend, trials_needed


def readapt_order(model, t, budget: int) -> list[int]:
    from dass_ray.core.meta import teacher_support
    from dass_ray.core.predictor import PredictorBatch

    n = len(t.acc)
    order, left = [], list(range(n))
    support = teacher_support(t.teacher_map, t.teacher_code, t.teacher_acc)
    while left and len(order) < budget:
        q = PredictorBatch(t.maps[left], t.teacher_map, t.codes[left])
        s = model.predict(support, q).numpy()
        pick = left[int(np.argmax(s))]
        order.append(pick)
        left.remove(pick)
        idx = torch.tensor(order)
        support = PredictorBatch(torch.cat([t.teacher_map, t.maps[idx]]), t.teacher_map,
                                 torch.cat([t.teacher_code[None], t.codes[idx]]),
                                 torch.cat([torch.tensor([t.teacher_acc]), t.acc[idx]]))
    return order + left


def tpe_order(t, space, seed: int, max_trials: int) -> list[int]:
    """Optuna TPE through Ray Tune over (depth, width multiplier) per stage, mapped to unseen pool members."""
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    feats = np.array([[len(st) for st in a.widths] + [np.mean(st) / w for st, w in zip(a.widths, space.stage_widths)]
                      for a in t.archs], dtype=float)
    lo, hi = feats.min(0), feats.max(0)
    norm = (feats - lo) / np.where(hi > lo, hi - lo, 1)
    acc = t.acc.numpy()
    used: list[int] = []
    param_space = {f"d{s}": tune.uniform(0, 1) for s in range(len(space.stage_widths))}
    param_space.update({f"w{s}": tune.uniform(0, 1) for s in range(len(space.stage_widths))})

    def nearest(cfg):
        x = np.array([cfg[f"d{s}"] for s in range(4)] + [cfg[f"w{s}"] for s in range(4)])
        d = ((norm - x) ** 2).sum(1)
        d[used] = np.inf
        return int(np.argmin(d))

    def trainable(cfg):
        return {"acc": float(cfg["__acc"])}

    # Tune runs trials sequentially; the mapping to unseen pool members happens in the searcher loop below
    searcher = OptunaSearch(metric="acc", mode="max", seed=seed)
    searcher.set_search_properties("acc", "max", param_space)
    for k in range(min(max_trials, len(acc))):
        tid = f"t{k}"
        cfg = searcher.suggest(tid)
        i = nearest(cfg)
        used.append(i)
        result = ray.get(ray.remote(lambda a: {"acc": a}).remote(float(acc[i])))  # the "trial", run as Ray work
        searcher.on_trial_complete(tid, result)
    return used + [i for i in range(len(acc)) if i not in used]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", default="artifacts/metadataset")
    ap.add_argument("--predictor", default="dass_ray/assets/predictor/cpu.pt")
    ap.add_argument("--roles", default="test")
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="mean", choices=["mean", "first"])
    args = ap.parse_args(argv)
    from dass_ray.core.config import get_scale
    from dass_ray.offline.metadataset import load_meta_tasks
    from dass_ray.offline.metatrain import predict_task
    from dass_ray.core.meta import load_predictor
    from dass_ray.search.rayutil import init_ray
    from dass_ray.core.space import get_space

    space = get_space(get_scale(args.scale).space)
    try:
        tasks = load_meta_tasks(args.metadataset, tuple(args.roles.split(",")), label=args.label)
        model, _ = load_predictor(args.predictor, space)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dass_ray.search import SearchConfig

    defaults = SearchConfig()
    if Path(defaults.predictor).resolve() != Path(args.predictor).resolve():
        print(f"note: 'default' uses --predictor {args.predictor}, not the search's default predictor "
              f"{defaults.predictor}", file=sys.stderr)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray(None, 2)
    # what scripts/search.py does with default options: re-adaptation if that were the default, else its order
    default_is = "dass_readapt" if defaults.readapt else (defaults.order or DEFAULT_ORDER)
    out: dict = {"default": {}, "dass": {}, "dass_readapt": {}, "dass_size": {}, "random": {}, "optuna_tpe": {}}
    for t in tasks:
        acc = t.acc.numpy()
        n = len(acc)
        out["dass"][t.task_id] = trials_needed(list(np.argsort(-predict_task(model, t), kind="mergesort")), acc)
        out["dass_readapt"][t.task_id] = trials_needed(readapt_order(model, t, n), acc)
        key = size_blend(predict_task(model, t), t.params, t.teacher_acc, t.num_classes)
        out["dass_size"][t.task_id] = trials_needed(list(np.argsort(-key, kind="mergesort")), acc)
        out["default"][t.task_id] = out[default_is][t.task_id]
        rng = np.random.default_rng(args.seed)
        out["random"][t.task_id] = float(np.mean([trials_needed(list(rng.permutation(n)), acc) for _ in range(200)]))
        out["optuna_tpe"][t.task_id] = trials_needed(tpe_order(t, space, args.seed, n), acc)
        print(t.task_id, {k: v[t.task_id] for k, v in out.items()}, file=sys.stderr)
    for k in out:
        out[k]["mean"] = float(np.mean([v for kk, v in out[k].items()])) if out[k] else None
    import ray

    ray.shutdown()
    print(json.dumps({"trials_to_within_0_5pt": out, "pool_sizes": {t.task_id: len(t.acc) for t in tasks},
                      "label_seeds": {t.task_id: t.label_seeds for t in tasks}, "tolerance_pts": 0.5,
                      "default_is": default_is}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
