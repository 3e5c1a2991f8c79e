#!/usr/bin/env python
"""Fit and check the search's default order (`dass_size`, `dass_ray.core.ranking.size_blend`) on the meta-dataset.

For every teacher-strength threshold, the mean Spearman and the mean KD trials to within 0.5 points of the pool's
best of the blended order, beside the predictor's order alone (`dass`) and parameter count alone, on the
meta-training tasks (where the threshold is fit) and on the meta-validation tasks (which decide whether the blend
is the default). Never on the meta-test tasks. Tasks whose students all measured the same are skipped.
Also, per role, the tasks whose teacher is weak (strength below the chosen threshold, where the order is the
predictor's alone): how the predictor, parameter count, FLOPs and teacher-likeness (the cosine similarity of a
student's functional embedding to the teacher's) rank there, on how many tasks each is below 0, and per task the
students' mean accuracy minus the teacher's and the Spearman between the predictor's score and teacher-likeness.

    python scripts/fit_order.py --output artifacts/order_fit.json

Last line: one JSON object {"roles": {role: {"tasks": n, "dass": {...}, "params": {...},
"dass_size@<threshold>": {"spearman": mean, "trials": mean}, "weak": {"tasks": n, "dass": {"spearman": mean,
"below_zero": n, "per_task": {...}}, "params": {...}, "flops": {...}, "teacher_likeness": {...},
"students_minus_teacher": {task: x}, "dass_vs_teacher_likeness": {task: r}}}}, "chosen": threshold}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6)


def teacher_likeness(t) -> np.ndarray:
    """Per student: the cosine similarity of its functional embedding (remapped from the teacher) to the teacher's."""
    import torch

    return torch.nn.functional.cosine_similarity(t.maps.flatten(1), t.teacher_map.flatten(1)).numpy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", default=str(ROOT / "artifacts" / "metadataset"))
    ap.add_argument("--predictor", default=str(ROOT / "dass_ray" / "assets" / "predictor" / "cpu.pt"))
    ap.add_argument("--label", default="mean", choices=["mean", "first"])
    ap.add_argument("--output", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from dass_ray.core.meta import load_predictor, spearman
    from dass_ray.core.ranking import SIZE_BLEND_STRENGTH, size_blend, teacher_strength, trials_needed
    from dass_ray.core.space import get_space
    from dass_ray.offline.metadataset import load_meta_tasks
    from dass_ray.offline.metatrain import predict_task

    try:
        model, _ = load_predictor(args.predictor, get_space("cpu"))
    except (OSError, ValueError) as e:
        print(f"error: --predictor {args.predictor}: {e}", file=sys.stderr)
        return 2
    out: dict = {"roles": {}, "chosen": SIZE_BLEND_STRENGTH, "label": args.label}
    for role in ("train", "val"):
        tasks = [t for t in load_meta_tasks(args.metadataset, (role,), label=args.label) if np.ptp(t.acc.numpy()) > 0]
        if not tasks:
            print(f"error: {args.metadataset}: no {role} task with a ranking", file=sys.stderr)
            return 2
        keys: dict[str, list] = {"dass": [], "params": [], **{f"dass_size@{th}": [] for th in THRESHOLDS}}
        for t in tasks:
            p = predict_task(model, t)
            keys["dass"].append(p)
            keys["params"].append(t.params.astype(float))
            for th in THRESHOLDS:
                keys[f"dass_size@{th}"].append(size_blend(p, t.params, t.teacher_acc, t.num_classes, strength=th))
        res = {"tasks": len(tasks)}
        for name, per in keys.items():
            sp = [spearman(k, t.acc.numpy()) for k, t in zip(per, tasks)]
            tr = [trials_needed(list(np.argsort(-k, kind="mergesort")), t.acc.numpy()) for k, t in zip(per, tasks)]
            res[name] = {"spearman": round(float(np.mean(sp)), 4), "trials": round(float(np.mean(tr)), 3)}
        weak = [i for i, t in enumerate(tasks) if teacher_strength(t.teacher_acc, t.num_classes) < SIZE_BLEND_STRENGTH]
        res["weak"] = {"tasks": len(weak)}
        for name, per in (("dass", keys["dass"]), ("params", keys["params"]),
                          ("flops", [t.flops.astype(float) for t in tasks]),
                          ("teacher_likeness", [teacher_likeness(t) for t in tasks])):
            sp = {tasks[i].task_id: round(float(spearman(per[i], tasks[i].acc.numpy())), 4) for i in weak}
            res["weak"][name] = {"spearman": round(float(np.mean(list(sp.values()))), 4) if sp else None,
                                 "below_zero": sum(v < 0 for v in sp.values()), "per_task": sp}
        res["weak"]["students_minus_teacher"] = {
            tasks[i].task_id: round(float(tasks[i].acc.mean()) - tasks[i].teacher_acc, 4) for i in weak}
        res["weak"]["dass_vs_teacher_likeness"] = {
            tasks[i].task_id: round(float(spearman(keys["dass"][i], teacher_likeness(tasks[i]))), 4) for i in weak}
        out["roles"][role] = res
        print(f"{role} ({len(tasks)} tasks): " + ", ".join(f"{k} {v['spearman']:.3f} / {v['trials']:.2f}"
                                                          for k, v in res.items() if k not in ("tasks", "weak")),
              file=sys.stderr)
        w = res["weak"]
        print(f"  weak teacher (strength < {SIZE_BLEND_STRENGTH}, {w['tasks']} tasks): " + ", ".join(
            f"{k} {w[k]['spearman']} ({w[k]['below_zero']} below 0)"
            for k in ("dass", "params", "flops", "teacher_likeness")),
            file=sys.stderr)
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
