#!/usr/bin/env python
"""Train a teacher (the search space's largest member) on a dataset and save a checkpoint.

    python scripts/train_teacher.py --dataset mnist5k --output dass_ray/assets/teachers/mnist5k_cpu.pt --half
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="Parquet / ImageFolder / .npz path or a bundled name")
    ap.add_argument("--output", required=True)
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--half", action="store_true", help="store float16 weights (half the size; the rounded "
                    "weights are evaluated and are what users get)")
    args = ap.parse_args(argv)
    import dataclasses

    import torch

    from dass_ray.core.config import get_scale
    from dass_ray.core.data import DatasetError
    from dass_ray.core.kd import evaluate, round_half, save_teacher, train_teacher
    from dass_ray.offline.metadataset import code_version, machine
    from dass_ray.core.tasks import dataset_task
    from dass_ray.core.space import get_space

    if args.threads:
        torch.set_num_threads(args.threads)
    scale = get_scale(args.scale)
    try:
        task, data = dataset_task(args.dataset, scale, args.seed)
    except (DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tcfg = dataclasses.replace(scale.teacher, epochs=args.epochs) if args.epochs else scale.teacher
    space = get_space(scale.space, data.num_classes)
    t0 = time.time()

    class Log:
        def report(self, m, state):
            print(f"epoch {m['epoch']}: loss {m['loss']:.4f} val {m['val_acc']:.4f}", flush=True)

    model, res = train_teacher(space, data, tcfg, seed=args.seed, reporter=Log())
    if args.half:
        model.load_state_dict(round_half(model.state_dict()))
    acc = evaluate(model, data.x_val, data.y_val)
    meta = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "code_version": code_version(),
            "machine": machine(), "wall_s": round(time.time() - t0, 1), "task": task.to_dict(),
            "teacher_config": tcfg.to_dict(), "history": res.history}
    save_teacher(args.output, model, space, acc, data.class_names, meta=meta, half=args.half)
    print(json.dumps({"output": args.output, "val_acc": acc, "wall_s": meta["wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
