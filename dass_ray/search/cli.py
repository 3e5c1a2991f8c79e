"""`scripts/search.py` / `dass-ray search`: find the student that distills best from a teacher on a dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dass_ray.search import InputError, SearchConfig
from dass_ray.service.contract import add_request_arguments


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="search.py", description="DaSS search: score many candidate students with the meta-trained predictor "
        "(adapted on the teacher), then distil only the top-K and return the best measured one.")
    add_request_arguments(ap)  # every per-search knob, from the contract's one table
    d = SearchConfig()
    ap.add_argument("--output", default=d.output, help="output directory (default: %(default)s)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    ap.add_argument("--data-root", default=None, help="directory relative dataset paths are resolved in")
    ap.add_argument("--storage", default=None,
                    help="where KD-trial checkpoints go: on a multi-node cluster a directory every node mounts "
                         "(NFS/EFS) or a URI (s3://bucket/prefix, gs://...); default $DASS_RAY_STORAGE, else "
                         "<output>/tune (one machine only)")
    ap.add_argument("--history", default=None, help="search history directory: the distilled students are "
                    "appended to it (exactly once, also across --resume) for retraining the predictor")
    ap.add_argument("--job-id", default=None, help=argparse.SUPPRESS)  # set by the service
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = SearchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)})
    from dass_ray.search import SearchRun, prepare

    try:
        prep = prepare(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dass_ray.search.rayutil import init_ray

    init_ray(cfg.address, cfg.num_cpus)
    try:
        result = SearchRun(prep).run()
    except Exception as e:
        print(f"error: search failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:  # disconnect (and stop a local Ray) before the interpreter exits, not from its atexit hooks
        import ray

        ray.shutdown()
    b = result.best
    print(json.dumps({"output": cfg.output, "best_measured_acc": b.measured_acc, "best_predicted_acc":
                      b.predicted_acc, "flops": b.flops, "params": b.params, "teacher_acc": result.teacher_acc,
                      "timings_s": result.timings_s}))
    return 0
