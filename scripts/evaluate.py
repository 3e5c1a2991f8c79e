#!/usr/bin/env python
"""Evaluate student-ranking methods on the meta-test tasks of a meta-dataset.

Methods: `posterior`, what the search does by default before its first trial (the mean of the search posterior,
`dass_ray.core.posterior`: a blend of the predictor and model size learnt across the meta-training tasks), and how
its 90% intervals cover the students not yet measured after 0, 1 and 3 measured ones (and the mean absolute error
then); `dass_size` (`dass_ray.core.ranking.size_blend`: DaSS's ranking blended with parameter count when the
teacher is well above chance); `dass`, the predictor's scores alone
(its own teacher-guided adaptation); DaSS with each other adaptation (`dass_step`, `dass_gate`, `dass_clip`,
`dass_none`: no step); an architecture-only meta-predictor trained on the same meta-dataset (no functional
embeddings: the non-distillation-aware baseline); FLOPs, parameter count, SynFlow and NASWOT computed on the
remapped students; `kd_start`, minus the KD loss each remapped student starts distillation from
(`dass_ray.core.kd.kd_start_loss`; artifacts/weak_signals); and random order (mean over 200 draws).
Metrics per task: Spearman (with a 95% bootstrap interval over students), Kendall tau-b, top-1 / top-5 regret
(accuracy points lost vs the best student of the pool), and for the predictors the mean absolute error between
predicted and measured accuracy. The mean over tasks has a bootstrap interval over tasks and students, and the
difference of every method from the search's default has one too. Labels: the mean of the two KD seeds
where every student of a task has both (--label mean), and each task's label-noise ceiling for the labels used.

    python scripts/evaluate.py --metadataset artifacts/metadataset --predictor dass_ray/assets/predictor/cpu.pt \
        --output artifacts/eval
Last printed line: one JSON object {"tasks": ..., "mean_spearman": ..., "mean_spearman_ci": ...,
"noise_ceiling": ...}. A meta-dataset with no meta-training tasks (your own test tasks only) is evaluated without
the architecture-only baseline unless --arch-only names a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
import sys
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

import numpy as np
import torch


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
    ap.add_argument("--label", default="mean", choices=["mean", "first"],
                    help="task label: the mean of the two KD seeds where every student has both (default), or the "
                         "first seed's accuracy")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    ap.add_argument("--prior", default=None, help="the search posterior's prior (default: the shipped one, "
                    "dass_ray/assets/predictor/posterior_prior.json)")
    args = ap.parse_args(argv)
    t_start = time.time()

    from dass_ray.core.config import get_scale
    from dass_ray.core.tasks import load_tasks
    from dass_ray.core.kd import init_student, load_teacher
    from dass_ray.offline.metadataset import MetaDatasetStore, load_meta_tasks, task_data, task_kd_start
    from dass_ray.offline.metatrain import MetaTrainConfig, predict_task, task_batches, train_local
    from dass_ray.core.meta import load_predictor
    from dass_ray.core.posterior import PoolModel, calibration_after, load_prior
    from dass_ray.core.proxies import score_all
    from dass_ray.core.ranking import (DEFAULT_ORDER, bootstrap_mean, bootstrap_task, label_ceiling, ranking_metrics,
                                       size_blend)
    from dass_ray.core.space import get_space

    torch.set_num_threads(max(1, torch.get_num_threads()))
    scale = get_scale(args.scale)
    space = get_space(scale.space)
    root = Path(args.metadataset)
    try:
        tasks = load_meta_tasks(root, tuple(args.roles.split(",")), label=args.label)
        dass, dass_blob = load_predictor(args.predictor, space)
        arch_only = load_predictor(args.arch_only, space)[0] if args.arch_only else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not tasks:
        print(f"error: {root}: no finished students for roles {args.roles}", file=sys.stderr)
        return 2
    cfg = None
    if arch_only is None:
        train_tasks, val_tasks = load_meta_tasks(root, ("train",)), load_meta_tasks(root, ("val",))
        if not train_tasks:
            print(f"note: {root} has no meta-training tasks: the architecture-only baseline is skipped (pass "
                  f"--arch-only CHECKPOINT to include one)", file=sys.stderr)
        else:
            # the same schedule as the DaSS predictor's (its manifest), else the scale's
            sched = (dass_blob.get("meta") or {}).get("config") or {}
            cfg = MetaTrainConfig(episodes=int(sched.get("episodes", scale.meta_episodes)),
                                  lr=float(sched.get("lr", scale.meta_lr)),
                                  query_size=int(sched.get("query_size", scale.meta_query_size)),
                                  eval_every=int(sched.get("eval_every", scale.meta_eval_every)),
                                  seed=int(sched.get("seed", 0)), weight_decay=float(sched.get("weight_decay", 0.0)),
                                  use_functional=False, adapt=False)
            arch_only, _ = train_local(space, train_tasks, val_tasks, cfg)
    specs = {t.task_id: t for t in load_tasks(root / "tasks.json")}
    store = MetaDatasetStore(root)
    cache: dict = {}  # datasets loaded once
    from dass_ray.core.meta import ADAPTATIONS

    default_mode = dass.adaptation
    prior = load_prior(args.prior)
    results, ceilings, scored, mae, meta, calib = {}, {}, [], {}, {}, {}
    for k, t in enumerate(tasks):
        acc = t.acc.numpy()
        # dass: what the search does by default (the checkpoint's own adaptation); dass_<mode>: the same predictor
        # with each other adaptation of ADAPTATIONS (step: always; gate: skipped outside the meta-training teachers'
        # accuracy range; clip: the trust region; none: the output bias only, i.e. the unadapted ranking)
        s = {"dass": predict_task(dass, t, adapt=True)}
        for mode in ADAPTATIONS:
            if mode != default_mode:
                dass.adaptation = mode
                s[f"dass_{mode}"] = predict_task(dass, t, adapt=True)
                dass.adaptation = default_mode
        mae[t.task_id] = {m: float(100 * np.mean(np.abs(v - acc))) for m, v in s.items()}
        # dass_size: the predictor's ranking blended with parameter count for a teacher well above chance
        s["dass_size"] = size_blend(s["dass"], t.params, t.teacher_acc, t.num_classes)
        # posterior: the search's posterior before any trial (its mean: the learnt blend of predictor and size);
        # then how its 90% intervals and mean hold up on the untried students after 0, 1 and 3 measured ones
        post = lambda: PoolModel(prior, s["dass"], t.params, t.flops, t.teacher_acc, t.num_classes,  # noqa: E731
                                 t.codes.numpy())
        s["posterior"] = post().mean()
        calib[t.task_id] = {str(k): calibration_after(post(), acc, k) for k in (0, 1, 3)}
        if arch_only is not None:
            s["arch_only"] = predict_task(arch_only, t, adapt=False)
        s.update({"flops": t.flops.astype(float), "params": t.params.astype(float)})
        ck = load_teacher(store.teacher_path(t.task_id)) if store.teacher_path(t.task_id).exists() else None
        if ck is not None:
            data = task_data(specs[t.task_id], space.image_size, args.data_root, cache)
            x = data.x_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:args.proxy_batch]]
            models = [init_student(a, ck.space, ck.state_dict, ck.arch) for a in t.archs]
            s.update(score_all(models, x, space.image_size))
            # kd_start: minus the KD loss each remapped student starts from
            s["kd_start"] = -task_kd_start(store, specs[t.task_id], t, scale, args.data_root, cache)
        per = {m: ranking_metrics(v, acc) for m, v in s.items()}
        for m, ci in bootstrap_task(s, acc, args.bootstrap, seed=k).items():
            per[m]["spearman_ci"] = ci
        rng = np.random.default_rng(0)
        draws = [ranking_metrics(rng.permutation(len(acc)).astype(float), acc) for _ in range(200)]
        per["random"] = {k2: float(np.nanmean([d[k2] for d in draws])) for k2 in draws[0]}
        results[t.task_id] = per
        scored.append((s, acc))
        ceilings[t.task_id] = label_ceiling(t.seed_pairs, t.label_seeds, args.bootstrap)
        meta[t.task_id] = {"source": t.source, "classes": t.num_classes, "students": len(acc),
                           "teacher_acc": round(float(t.teacher_acc), 4), "label_seeds": t.label_seeds,
                           "adaptation_gated": bool(dass.gated(task_batches(t)[0]))}
        print(f"{t.task_id}: " + ", ".join(f"{m} {v['spearman']:.3f}" for m, v in per.items()), file=sys.stderr)
    methods = list(next(iter(results.values())))
    mean = {m: float(np.nanmean([results[t][m]["spearman"] for t in results if m in results[t]])) for m in methods}
    common = [m for m in methods if m != "random" and all(m in sc for sc, _ in scored)]
    default = DEFAULT_ORDER  # what the search does by default: its order (`posterior`, `dass_size` or `dass`)
    calib_mean = {k: {m: float(np.nanmean([c[k][m] for c in calib.values()])) for m in ("coverage", "mae_points")}
                  for k in ("0", "1", "3")}
    boot = bootstrap_mean([({m: sc[m] for m in common}, a) for sc, a in scored], reference=default,
                          n_boot=args.bootstrap)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.md").write_text(_markdown(results, meta, mean, boot, ceilings, mae, args.label, default)
                                 + _calibration_markdown(calib, calib_mean))
    _plot(out / "eval.png", results, ceilings, mean, boot, methods)
    summary = {"default_method": default, "adaptation": default_mode, "label": args.label,
               "tasks": {t: {m: {k: v[k] for k in ("spearman", "spearman_ci", "kendall", "top1_regret", "top5_regret")
                                 if k in v} for m, v in per.items()} for t, per in results.items()},
               "task_info": meta, "mean_spearman": mean, "mean_spearman_ci": boot["mean"],
               "diff_vs_default_ci": boot["diff_vs_" + default], "mae_points": mae,
               "posterior_intervals": {"per_task": calib, "mean": calib_mean, "level": 0.9,
                                       "after": "0, 1 and 3 students measured by the posterior search"},
               "noise_ceiling": {k: (v["ceiling"] if v else None) for k, v in ceilings.items()},
               "noise_ceiling_detail": ceilings,
               "sources": sorted({v["source"] for v in meta.values()})}
    summary = _finite(summary)
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    from dass_ray.fileutil import sha256_file
    from dass_ray.offline.metadataset import code_version, machine

    manifest = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "code_version": code_version(),
                "machine": machine(), "wall_s": round(time.time() - t_start, 1),
                "predictor": {"path": args.predictor, "sha256": sha256_file(args.predictor)},
                "arch_only": ({"path": args.arch_only, "sha256": sha256_file(args.arch_only)} if args.arch_only
                              else {"trained_here": cfg.to_dict()} if cfg else {"skipped": "no meta-training tasks"}),
                "metadataset": str(root), "tasks": list(results)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps(summary))
    return 0


def _calibration_markdown(calib: dict, mean: dict) -> str:
    lines = ["", "The search posterior's predictions on the students not yet measured, after 0, 1 and 3 measured by "
             "the posterior search: coverage of the 90% intervals, mean absolute error (points).", "",
             "| task | coverage @0 | MAE @0 | coverage @1 | MAE @1 | coverage @3 | MAE @3 |", "|---|---|---|---|---|---|---|"]
    for tid, c in list(calib.items()) + [("mean", mean)]:
        lines.append(f"| {tid} | " + " | ".join(f"{c[k]['coverage']:.2f} | {c[k]['mae_points']:.2f}"
                                                for k in ("0", "1", "3")) + " |")
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def _markdown(results, meta, mean, boot, ceilings, mae, label, default) -> str:
    lines = ["| task | source | classes | teacher acc | method | Spearman [95% CI] | Kendall | top-1 regret (pts) | "
             "top-5 regret (pts) |", "|---|---|---|---|---|---|---|---|---|"]
    for tid, per in results.items():
        i = meta[tid]
        for m, v in per.items():
            lines.append(f"| {tid} | {i['source']} | {i['classes']} | {i['teacher_acc']:.3f} | {m} | "
                         f"{v['spearman']:.3f} {_ci(v.get('spearman_ci'))} | {v['kendall']:.3f} | "
                         f"{v['top1_regret']:.2f} | {v['top5_regret']:.2f} |")
    lines += ["", f"| method | mean Spearman | 95% CI (tasks and students) | difference from {default} (the search's "
              "default), 95% CI |",
              "|---|---|---|---|"]
    for m, v in mean.items():
        lines.append(f"| {m} | {v:.3f} | {_ci(boot['mean'].get(m))} | {_ci(boot['diff_vs_' + default].get(m))} |")
    lines += ["", f"Labels: {'mean of two KD seeds where every student has both, else the first seed' if label == 'mean' else 'first KD seed'}.",
              "Label-noise ceiling (seed-to-seed Spearman r; reliability of the label used: r for one seed, 2r/(1+r) for "
              "the mean of two; ceiling = sqrt(reliability), what a perfect predictor would reach):", ""]
    for k, c in ceilings.items():
        lines.append(f"- {k}: " + (f"r {c['seed_spearman']:.3f} {_ci(c['seed_spearman_ci'])} over {c['students']} "
                                   f"students, label of {c['label_seeds']} seed(s), ceiling {c['ceiling']:.3f}"
                                   if c else "n/a (no second seed)"))
    lines += ["", "Mean absolute error of the predicted accuracy (points): "
              + "; ".join(f"{k}: " + ", ".join(f"{m} {v:.1f}" for m, v in d.items()) for k, d in mae.items())]
    return "\n".join(lines) + "\n"


def _plot(path, results, ceilings, mean, boot, methods) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 1]})
        w = 0.8 / max(1, len(results))
        for i, (tid, per) in enumerate(results.items()):
            ys = [per[m]["spearman"] if m in per else np.nan for m in methods]
            err = np.array([[y - per[m]["spearman_ci"][0], per[m]["spearman_ci"][1] - y]
                            if m in per and per[m].get("spearman_ci") else [0, 0] for m, y in zip(methods, ys)]).T
            ax.bar(np.arange(len(methods)) + i * w, ys, w, yerr=err, capsize=1, label=tid, color=f"C{i % 10}",
                   error_kw={"lw": 0.5})
            c = ceilings.get(tid)
            if c:
                ax.hlines(c["ceiling"], -0.5, len(methods) - 0.5, ls=":", lw=0.7, color=f"C{i % 10}")
        ax.set_xticks(np.arange(len(methods)) + 0.4 - w / 2, methods, rotation=30)
        ax.set_ylabel("Spearman vs measured KD accuracy")
        ax.set_title("per task (bars: 95% bootstrap CI over students; dotted: label-noise ceiling)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
        ms = [m for m in methods if m in mean]
        ys = [mean[m] for m in ms]
        err = np.array([[y - boot["mean"][m][0], boot["mean"][m][1] - y] if boot["mean"].get(m) else [0, 0]
                        for m, y in zip(ms, ys)]).T
        ax2.bar(range(len(ms)), ys, yerr=err, capsize=2, color="gray")
        ax2.set_xticks(range(len(ms)), ms, rotation=45, fontsize=7)
        ax2.set_title("mean over tasks (95% CI over tasks and students)", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    except Exception as e:  # the table and JSON are the result; a plot failure is reported, not fatal
        print(f"warning: plot failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
