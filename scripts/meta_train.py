#!/usr/bin/env python
"""Meta-train the DaSS predictor on a meta-dataset with Ray Train; write a checkpoint + manifest.

    python scripts/meta_train.py --metadataset artifacts/metadataset --output dass_ray/assets/predictor/cpu.pt
    python scripts/meta_train.py ... --arch-only --output artifacts/baselines/arch_only.pt   # the baseline
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()


def main(argv=None) -> int:
    from dass_ray.search.rayutil import ADDRESS_HELP

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", required=True, help="meta-dataset directory (scripts/build_metadataset.py)")
    ap.add_argument("--output", required=True, help="predictor checkpoint to write (.pt)")
    ap.add_argument("--scale", default="cpu", help="scale whose meta-learning schedule is the default")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers (tasks of an episode are split)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--arch-only", action="store_true", help="train the architecture-only baseline "
                    "(no functional embeddings, no teacher-guided adaptation)")
    ap.add_argument("--lr", type=float, default=None, help="meta learning rate (Adam; default: the scale's)")
    ap.add_argument("--weight-decay", type=float, default=0.0,
                    help="decoupled (AdamW) weight decay on the predictor's weights, not on the step sizes")
    ap.add_argument("--rank-weight", type=float, default=0.0, help="weight of the pairwise ranking term of the "
                    "query loss (0: MSE only)")
    ap.add_argument("--adaptation", default="none", choices=["gate", "step", "clip", "none"],
                    help="how a search adapts the predictor to its teacher (stored in the checkpoint; "
                         "dass_ray.core.meta.ADAPTATIONS): gate = the step, skipped for a teacher outside the "
                         "meta-training teachers' accuracy range; step = always; clip = the step with the teacher's "
                         "residual clipped to +-INNER_CLIP; none = the output bias only (default: %(default)s, "
                         "the mode chosen on meta-validation with scripts/sweep_meta.py)")
    ap.add_argument("--inner-clip", type=float, default=0.1, help="trust-region radius of --adaptation clip "
                    "(accuracy units)")
    ap.add_argument("--train-adaptation", default="step", choices=["step", "shift"],
                    help="meta-objective: step = learn the teacher-guided step (default); shift = learn accuracies "
                         "relative to the teacher's (what --adaptation none uses)")
    ap.add_argument("--task-weight", default="equal", choices=["equal", "spread"],
                    help="equal (default) or spread: each task's MSE divided by the variance of its accuracies")
    ap.add_argument("--teachers", default="all", choices=["all", "weak", "strong"],
                    help="meta-train and select on the tasks whose teacher is weak (strength below the search's "
                         "size-blend threshold, dass_ray.core.ranking.SIZE_BLEND_STRENGTH), strong, or all (default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--address", default=None, help=ADDRESS_HELP)
    ap.add_argument("--storage", default=None, help="Ray Train storage (default: <metadataset>/ray_meta)")
    args = ap.parse_args(argv)
    if not args.inner_clip > 0:
        ap.error(f"--inner-clip must be > 0 (accuracy units), got {args.inner_clip}")

    from dass_ray.core.config import get_scale
    from dass_ray.offline.metadataset import code_version, load_meta_tasks, machine
    from dass_ray.offline.metatrain import MetaTrainConfig, by_teacher, evaluate, new_model
    from dass_ray.core.meta import save_predictor
    from dass_ray.offline.metatrain_ray import meta_train
    from dass_ray.search.rayutil import init_ray
    from dass_ray.core.space import get_space

    scale = get_scale(args.scale)
    try:
        train = load_meta_tasks(args.metadataset, ("train",))
        val = load_meta_tasks(args.metadataset, ("val",))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val = by_teacher(train, args.teachers), by_teacher(val, args.teachers)
    if not train:
        which = f" with a {args.teachers} teacher" if args.teachers != "all" else ""
        print(f"error: {args.metadataset}: no meta-training task{which} has finished students yet", file=sys.stderr)
        return 2
    space = get_space(scale.space)
    cfg = MetaTrainConfig(episodes=args.episodes or scale.meta_episodes, lr=args.lr or scale.meta_lr,
                          inner_lr=scale.meta_inner_lr, query_size=scale.meta_query_size,
                          eval_every=scale.meta_eval_every, seed=args.seed, use_functional=not args.arch_only,
                          adapt=not args.arch_only, weight_decay=args.weight_decay, rank_weight=args.rank_weight,
                          adaptation=args.adaptation if not args.arch_only else "step", inner_clip=args.inner_clip,
                          train_adaptation=args.train_adaptation, task_weight=args.task_weight)
    init_ray(args.address)
    t0 = time.time()
    name = ("arch-only" if args.arch_only else "dass") + f"-s{args.seed}"
    def progress(m: dict) -> None:  # one line per evaluation: a long run shows where it is
        print(f"[meta-train] episode {m.get('episode')}/{m.get('episodes')} loss {m.get('loss', float('nan')):.5f} "
              f"val Spearman {m.get('val_spearman', float('nan')):.3f} (best {m.get('best_val_spearman', float('nan')):.3f}"
              f" at episode {m.get('best_episode')}) {m.get('wall_s', 0):.0f}s", file=sys.stderr, flush=True)

    print(f"[meta-train] {len(train)} training tasks, {len(val)} validation tasks, {cfg.episodes} episodes, "
          f"adaptation {cfg.adaptation}", file=sys.stderr, flush=True)
    out = meta_train(space, train, val, cfg, num_workers=args.workers, threads=args.threads,
                     storage=args.storage or str(Path(args.metadataset) / "ray_meta"), name=name, progress=progress)
    wall = time.time() - t0
    model = new_model(space, cfg, train)
    model.load_state_dict(out["best"])
    ev = evaluate(model, val, cfg.adapt)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "code_version": code_version(),
            "machine": machine(), "wall_s": round(wall, 1), "config": cfg.to_dict(), "workers": args.workers,
            "teachers": args.teachers, "train_tasks": [t.task_id for t in train], "val_tasks": [t.task_id for t in val],
            "students_per_train_task": {t.task_id: len(t.acc) for t in train},
            "train_teacher_acc_range": [min(t.teacher_acc for t in train), max(t.teacher_acc for t in train)],
            "adaptation": cfg.adaptation, **({"inner_clip": cfg.inner_clip} if cfg.adaptation == "clip" else {}),
            "best_episode": out["best_episode"], "val_spearman": ev["tasks"],
            "mean_val_spearman": ev["mean_spearman"], "metadataset": str(args.metadataset)}
    save_predictor(args.output, model, space, meta)
    Path(args.output).with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({"output": args.output, "mean_val_spearman": ev["mean_spearman"],
                      "best_episode": out["best_episode"], "wall_s": round(wall, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
