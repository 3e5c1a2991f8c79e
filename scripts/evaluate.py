#!/usr/bin/env python
"""Evaluate student-ranking methods on the meta-test tasks of a meta-dataset.

Methods: DaSS (teacher-guided adaptation), DaSS without the adaptation step, an architecture-only meta-predictor
trained on the same meta-dataset (no functional embeddings: the non-distillation-aware baseline), FLOPs, parameter
count, SynFlow and NASWOT computed on the remapped students, and random order (mean over 200 draws).
Metrics per task: Spearman, Kendall tau-b, top-1 / top-5 regret (accuracy points lost vs the best student of the pool).

    python scripts/evaluate.py --metadataset artifacts/metadataset --predictor dass_ray/assets/predictor/cpu.pt \
        --output artifacts/eval
Last printed line: one JSON object {"tasks": ..., "mean_spearman": ..., "noise_ceiling": ...}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
import sys
from pathlib import Path

import numpy as np
import torch


def ranking_metrics(scores: np.ndarray, acc: np.ndarray) -> dict:
    from dass_ray.meta import kendall, spearman

    order = np.argsort(-scores, kind="mergesort")
    best = acc.max()
    return {"spearman": spearman(scores, acc), "kendall": kendall(scores, acc),
            "top1_regret": float(100 * (best - acc[order[0]])), "top5_regret": float(100 * (best - acc[order[:5]].max()))}


def noise_ceiling(root, task_id: str) -> float | None:
    from dass_ray.meta import spearman
    from dass_ray.metadataset import MetaDatasetStore

    rows = [r for r in MetaDatasetStore(root).students().to_pylist() if r["task_id"] == task_id and r["status"] == "ok"]
    a = {r["arch_digest"]: r["best_acc"] for r in rows if r["replicate"] == 0}
    b = {r["arch_digest"]: r["best_acc"] for r in rows if r["replicate"] == 1}
    common = sorted(set(a) & set(b))
    if len(common) < 3:
        return None
    return {"spearman": spearman([a[k] for k in common], [b[k] for k in common]), "students": len(common)}


def _finite(x):
    """nan/inf -> None, so the output is strict JSON (a constant ranking has no correlation)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", required=True)
    ap.add_argument("--predictor", required=True, help="DaSS predictor checkpoint")
    ap.add_argument("--arch-only", default=None, help="architecture-only baseline checkpoint "
                    "(default: trained here on the same meta-dataset with the DaSS predictor's schedule)")
    ap.add_argument("--output", default="artifacts/eval")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--roles", default="test", help="comma-separated task roles to evaluate")
    ap.add_argument("--proxy-batch", type=int, default=64, help="images for NASWOT")
    args = ap.parse_args(argv)
    t_start = time.time()

    from dass_ray.config import get_scale
    from dass_ray.data import load_tasks
    from dass_ray.kd import init_student, load_teacher
    from dass_ray.metadataset import MetaDatasetStore, load_meta_tasks, task_data
    from dass_ray.metatrain import MetaTrainConfig, load_predictor, predict_task, train_local
    from dass_ray.proxies import score_all
    from dass_ray.space import get_space

    torch.set_num_threads(max(1, torch.get_num_threads()))
    scale = get_scale(args.scale)
    space = get_space(scale.space)
    root = Path(args.metadataset)
    try:
        tasks = load_meta_tasks(root, tuple(args.roles.split(",")))
        dass, dass_blob = load_predictor(args.predictor, space)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not tasks:
        print(f"error: {root}: no finished students for roles {args.roles}", file=sys.stderr)
        return 2
    if args.arch_only:
        arch_only, _ = load_predictor(args.arch_only, space)
    else:
        # the same schedule as the DaSS predictor's (its manifest), else the scale's
        sched = (dass_blob.get("meta") or {}).get("config") or {}
        cfg = MetaTrainConfig(episodes=int(sched.get("episodes", scale.meta_episodes)),
                              lr=float(sched.get("lr", scale.meta_lr)),
                              query_size=int(sched.get("query_size", scale.meta_query_size)),
                              eval_every=int(sched.get("eval_every", scale.meta_eval_every)),
                              seed=int(sched.get("seed", 0)), weight_decay=float(sched.get("weight_decay", 0.0)),
                              use_functional=False, adapt=False)
        arch_only, _ = train_local(space, load_meta_tasks(root, ("train",)), load_meta_tasks(root, ("val",)), cfg)
    specs = {t.task_id: t for t in load_tasks(root / "tasks.json")}
    store = MetaDatasetStore(root)
    results, ceilings = {}, {}
    for t in tasks:
        acc = t.acc.numpy()
        s = {"dass": predict_task(dass, t, adapt=True), "dass_no_adapt": predict_task(dass, t, adapt=False),
             "arch_only": predict_task(arch_only, t, adapt=False),
             "flops": t.flops.astype(float), "params": t.params.astype(float)}
        ck = load_teacher(store.teacher_path(t.task_id)) if store.teacher_path(t.task_id).exists() else None
        if ck is not None:
            data = task_data(specs[t.task_id], space.image_size, args.data_root)
            x = data.x_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:args.proxy_batch]]
            models = [init_student(a, ck.space, ck.state_dict, ck.arch) for a in t.archs]
            s.update(score_all(models, x, space.image_size))
        per = {m: ranking_metrics(v, acc) for m, v in s.items()}
        rng = np.random.default_rng(0)
        draws = [ranking_metrics(rng.permutation(len(acc)).astype(float), acc) for _ in range(200)]
        per["random"] = {k: float(np.nanmean([d[k] for d in draws])) for k in draws[0]}
        results[t.task_id] = per
        ceilings[t.task_id] = noise_ceiling(root, t.task_id)
        print(f"{t.task_id}: " + ", ".join(f"{m} {v['spearman']:.3f}" for m, v in per.items()), file=sys.stderr)
    methods = list(next(iter(results.values())))
    mean = {m: float(np.nanmean([results[t][m]["spearman"] for t in results if m in results[t]])) for m in methods}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| task | method | Spearman | Kendall | top-1 regret (pts) | top-5 regret (pts) |", "|---|---|---|---|---|---|"]
    for tid, per in results.items():
        for m, v in per.items():
            lines.append(f"| {tid} | {m} | {v['spearman']:.3f} | {v['kendall']:.3f} | {v['top1_regret']:.2f} | "
                         f"{v['top5_regret']:.2f} |")
    lines += ["", "| method | mean Spearman |", "|---|---|"] + [f"| {m} | {v:.3f} |" for m, v in mean.items()]
    lines += ["", "Noise ceiling (Spearman between two KD seeds of the same students):", ""]
    lines += [f"- {k}: {('%.3f over %d students' % (v['spearman'], v['students'])) if v else 'n/a'}"
              for k, v in ceilings.items()]
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 4))
        w = 0.8 / max(1, len(results))
        for i, (tid, per) in enumerate(results.items()):
            ax.bar(np.arange(len(methods)) + i * w, [per[m]["spearman"] for m in methods], w, label=tid)
        for i, (tid, c) in enumerate(ceilings.items()):
            if c:
                ax.axhline(c["spearman"], ls="--", lw=1, color=f"C{i}")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - w / 2, methods, rotation=30)
        ax.set_ylabel("Spearman vs measured KD accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=110)
    except Exception as e:  # the table and JSON are the result; a plot failure is reported, not fatal
        print(f"warning: plot failed: {e}", file=sys.stderr)
    summary = {"tasks": {t: {m: {k: v[k] for k in ("spearman", "kendall", "top1_regret", "top5_regret")}
                             for m, v in per.items()} for t, per in results.items()},
               "mean_spearman": mean, "noise_ceiling": {k: (v["spearman"] if v else None) for k, v in ceilings.items()}}
    summary = _finite(summary)
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    from dass_ray.fileutil import sha256_file
    from dass_ray.metadataset import code_version, machine

    manifest = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "code_version": code_version(),
                "machine": machine(), "wall_s": round(time.time() - t_start, 1),
                "predictor": {"path": args.predictor, "sha256": sha256_file(args.predictor)},
                "arch_only": ({"path": args.arch_only, "sha256": sha256_file(args.arch_only)} if args.arch_only
                              else {"trained_here": cfg.to_dict()}),
                "metadataset": str(root), "tasks": list(results)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
