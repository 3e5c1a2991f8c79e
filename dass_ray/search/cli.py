"""`scripts/search.py` / `dass-ray search`: find the student that distills best from a teacher on a dataset."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from dass_ray.search import InputError, SearchConfig
from dass_ray.search.rayutil import ADDRESS_HELP, NUM_CPUS_HELP
from dass_ray.contract import add_request_arguments


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="search.py", description="DaSS search: score many candidate students with the meta-trained predictor "
        "(adapted on the teacher), then distil only the top-K and return the best measured one.")
    add_request_arguments(ap)  # every per-search knob, from the contract's one table
    d = SearchConfig()
    ap.add_argument("--output", default=d.output, help="output directory (default: %(default)s)")
    ap.add_argument("--address", default=None, help=ADDRESS_HELP)
    ap.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    ap.add_argument("--num-cpus", type=int, default=None, help=NUM_CPUS_HELP)
    ap.add_argument("--data-root", default=None, help="directory relative dataset paths are resolved in")
    ap.add_argument("--storage", default=None,
                    help="where KD-trial checkpoints go: on a multi-node cluster a directory every node mounts "
                         "(NFS/EFS) or a URI (s3://bucket/prefix, gs://...); default $DASS_RAY_STORAGE, else "
                         "<output>/tune (one machine only)")
    ap.add_argument("--cache", default=None, help="where a foreign teacher's soft labels and proxy teacher are "
                    "cached by content digest (default: $DASS_RAY_CACHE, else <output>/cache; docs/teachers.md)")
    ap.add_argument("--history", default=None, help="search history directory: the distilled students are "
                    "appended to it (exactly once, also across --resume) for retraining the predictor")
    ap.add_argument("--max-flops-ratio", type=float, default=None, metavar="R",
                    help="budget relative to the teacher: at most R times the teacher's FLOPs (0 < R <= 1; e.g. "
                         "0.25 for a student 4x cheaper); instead of --max-flops")
    ap.add_argument("--verbose", action="store_true", help="also show Ray Tune's own output and the workers' logs "
                    "(default: the search's progress lines only)")
    ap.add_argument("--job-id", default=None, help=argparse.SUPPRESS)  # set by the service
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = SearchConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SearchConfig)})
    from dass_ray.search import SearchRun, prepare

    try:
        if args.max_flops_ratio is not None and cfg.max_flops:
            raise InputError("--max-flops-ratio: give either --max-flops or --max-flops-ratio, not both")
        prep = prepare(cfg)
        if args.max_flops_ratio is not None:
            prep.cfg = relative_budget(prep, args.max_flops_ratio)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dass_ray.search.rayutil import VERBOSE_ENV, init_ray

    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    init_ray(cfg.address, cfg.num_cpus, quiet=not args.verbose)
    try:
        result = SearchRun(prep).run()
    except Exception as e:
        print(f"error: search failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:  # disconnect (and stop a local Ray) before the interpreter exits, not from its atexit hooks
        import ray

        ray.shutdown()
    from dass_ray.search.report import summary

    print(summary(result, cfg.output), flush=True)  # everything else (timings, trials) is in result.json
    return 0


def relative_budget(prep, ratio: float):
    """`prep.cfg` with `max_flops` = `ratio` x the teacher's FLOPs (`--max-flops-ratio`); InputError when `ratio`
    is not in (0, 1] or no student of the space fits that budget."""
    if not 0 < ratio <= 1:
        raise InputError(f"--max-flops-ratio: must be in (0, 1] (a fraction of the teacher's FLOPs), got {ratio:g}")
    teacher = prep.deploy_space.flops(prep.space.teacher())  # at the size the student is exported at
    max_flops = int(ratio * teacher)
    try:
        prep.deploy_space.check_budget(max_flops=max_flops, max_params=prep.cfg.max_params or None)
    except ValueError as e:
        raise InputError(f"--max-flops-ratio {ratio:g} ({max_flops:,} of the teacher's {teacher:,} FLOPs): "
                         f"{e}") from None
    return dataclasses.replace(prep.cfg, max_flops=max_flops)
