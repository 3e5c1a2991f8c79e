#!/usr/bin/env python
"""Build (or continue) the DaSS meta-dataset on Ray: teachers (Ray Train), soft labels, KD-trained students.

Resumable: rerun the same command to continue; finished teachers and students are skipped.

    python scripts/build_metadataset.py --scale cpu --plan broad --output artifacts/metadataset \
        --data-root ../shared/datasets

Your own tasks: --plan my_plan.json, a JSON file {"groups": [{...}, ...]} whose groups have the fields of
dass_ray.offline.plans.TaskGroup, e.g.
    {"groups": [{"role": "test", "source": "xray", "path": "/data/xray.parquet", "num_tasks": 2, "seed": 1,
                 "classes_per_task": 4, "train_per_class": 50, "val_per_class": 25,
                 "students": 30, "second_seed": 10, "teacher_epochs": 10}]}
A plan may extend a directory built with another plan (same scale and seed): new groups are added, recorded
tasks and their rows are kept.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

from dass_ray.core.config import get_scale
from dass_ray.offline.metadataset import MetaDatasetStore
from dass_ray.offline.plans import PLANS, load_plan
from dass_ray.search.rayutil import ADDRESS_HELP, NUM_CPUS_HELP


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", default="cpu", help="training scale (dass_ray.core.config.SCALES): cpu | tiny | paper")
    ap.add_argument("--plan", default=None, help=f"a built-in task plan ({', '.join(sorted(PLANS))}) or a JSON plan "
                    "file (see above); default: the scale's name")
    ap.add_argument("--output", required=True, help="meta-dataset directory (created; reused to resume)")
    ap.add_argument("--data-root", default=None, help="root of the dataset files named in the plan "
                    "(default: bundled data, then ../shared/datasets)")
    ap.add_argument("--address", default=None, help=ADDRESS_HELP)
    ap.add_argument("--num-cpus", type=int, default=None, help=NUM_CPUS_HELP)
    ap.add_argument("--teacher-cpus", type=int, default=1, help="CPUs (and torch threads) per teacher training")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many student runs (for slicing)")
    ap.add_argument("--students-per-task", type=int, default=None,
                    help="students per train/val task where the plan gives no count (default: the scale's)")
    ap.add_argument("--students-per-test-task", type=int, default=None,
                    help="students per test task where the plan gives no count (default: the scale's)")
    ap.add_argument("--second-seed", type=int, default=None,
                    help="students of each test task KD-trained with a second seed (label-noise ceiling) where the "
                         "plan gives no count (default: the scale's noise_ceiling_students)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", default=None,
                    help="Ray Train storage for teacher checkpoints: on a multi-node cluster a directory every node "
                         "mounts (NFS/EFS) or a URI (s3://bucket/prefix); default $DASS_RAY_STORAGE, else "
                         "<output>/ray_train (one machine only)")
    ap.add_argument("--teacher-parallel", type=int, default=None,
                    help="teachers trained at once (default: the CPUs the cluster has or can autoscale to // "
                         "--teacher-cpus)")
    ap.add_argument("--max-inflight", type=int, default=None,
                    help="student runs queued at once (default: 2 x the CPUs the cluster has or can autoscale to)")
    ap.add_argument("--compact", action="store_true", help="merge appended parts into students.parquet at the end")
    args = ap.parse_args(argv)
    try:
        scale = get_scale(args.scale)
        groups = load_plan(args.plan or args.scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for flag, field in (("students_per_task", "students_per_task"), ("students_per_test_task", "students_per_test_task"),
                        ("second_seed", "noise_ceiling_students")):
        v = getattr(args, flag)
        if v is not None:
            if v < (0 if flag == "second_seed" else 1):
                print(f"error: --{flag.replace('_', '-')} must be >= {0 if flag == 'second_seed' else 1}",
                      file=sys.stderr)
                return 2
            scale = scale.replace(**{field: v})
    for flag in ("max_inflight", "teacher_parallel"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    from dass_ray.offline.labelgen import build
    from dass_ray.search.rayutil import init_ray
    from dass_ray.search.rayutil import resolve_storage

    try:
        storage = resolve_storage(args.storage, Path(args.output) / "ray_train")
    except ValueError as e:
        print(f"error: --storage: {e}", file=sys.stderr)
        return 2

    init_ray(args.address, args.num_cpus)
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    try:
        man = build(args.output, scale, groups, data_root=args.data_root, seed=args.seed, max_runs=args.max_runs,
                    teacher_cpus=args.teacher_cpus, command=cmd, log=lambda m: print(m, flush=True),
                    storage=storage, max_inflight=args.max_inflight, teacher_parallel=args.teacher_parallel)
    except ValueError as e:  # a plan that does not fit the directory or the data: nothing recorded is touched
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import ray

        ray.shutdown()
    if args.compact:
        MetaDatasetStore(args.output).compact()
    print(json.dumps({"students": man["students"], "total_wall_s": man["total_wall_s"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
