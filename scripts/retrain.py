#!/usr/bin/env python
"""Retrain the predictor on a search history (the students that searches run with --history measured):

    python scripts/retrain.py --history ~/dass-history            # parent: the history's latest, else shipped
    python scripts/search.py --history ~/dass-history --predictor latest --dataset ...   # use it

Fine-tunes with Ray Train on the shipped meta-dataset's training tasks plus the history's tasks, selects on the
meta-validation tasks plus held-out history tasks, writes <history>/predictors/vN.pt and vN.json, and makes it
LATEST only if it is at least as good as its parent there. Rerunning after an interruption resumes.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--history", required=True, help="search history directory (scripts/search.py --history)")
    ap.add_argument("--metadataset", default=str(ROOT / "artifacts" / "metadataset"),
                    help="meta-dataset whose train/val tasks are kept (default: the shipped one)")
    ap.add_argument("--parent", default=None, help="predictor to fine-tune (default: the history's latest, "
                    "else the shipped predictor)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-4, help="meta learning rate (Adam)")
    ap.add_argument("--holdout", type=float, default=0.25, help="fraction of history tasks held out for selection")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: a local Ray)")
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args(argv)

    from dass_ray.core.space import get_space
    from dass_ray.offline.retrain import retrain
    from dass_ray.search.history import latest_predictor
    from dass_ray.search.inputs import DEFAULT_PREDICTOR
    from dass_ray.search.rayutil import init_ray

    parent = args.parent or latest_predictor(args.history) or DEFAULT_PREDICTOR
    init_ray(args.address, args.num_cpus)
    try:
        meta = retrain(args.history, args.metadataset, parent, get_space("cpu"), episodes=args.episodes,
                       lr=args.lr, holdout=args.holdout, seed=args.seed, workers=args.workers,
                       command="python " + " ".join(shlex.quote(a) for a in sys.argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        import ray

        ray.shutdown()
    print(json.dumps({k: meta[k] for k in ("version", "parent", "val_spearman_before", "val_spearman_after",
                                           "promoted", "wall_s")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
