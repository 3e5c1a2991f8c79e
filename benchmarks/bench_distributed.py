#!/usr/bin/env python
"""Distribution overhead: the same candidates scored in-process and through the encoder-actor path (issue 7).

    python benchmarks/bench_distributed.py [--n 16384] [--batch-size 1024] [--repeats 3] [--address ADDR]

Per repeat, in this order, on the same N candidates (one draw, `--seed`):
  inprocess  what `score_candidates` computes, in this process, one batch after another with 1 torch thread:
             fold the teacher, embed it, adapt the predictor on it (one inner step), then per batch of
             `--batch-size`: embed (`dass_ray.core.embed.Embedder`), encode, score with the adapted predictor;
  actor_1    `dass_ray.search.scoring.score_candidates(..., encoders=1, predictors=1)`: the whole call as the search runs
             it, actor start-up included (encoder and predictor actors are created and killed inside the call);
  actor_2    the same with 2 encoder actors.
Each encoder actor and predictor replica uses 1 torch thread (`score_candidates` gives an actor
max(1, int(its CPUs)) threads), so `overhead_ratio` = actor_1 / inprocess compares the same amount of compute:
what is lost is orchestration (actor start-up, serialising configs and embeddings through the object store, the
driver's join). The scores of all three paths are checked to agree. Figures are medians over repeats.

Steady state: `steady_candidates_per_s` counts the candidates after the first scored batch over the time from
the first to the last scored batch, leaving out the one-off start-up (actor processes and their imports, teacher
folding, adaptation; `first_batch_s` is the time to the first scored batch); `steady_overhead_ratio` compares
the two paths there.

`--warm` also times the actor path with encoder actors created (and warmed up) before the clock starts, passed
in with `actors=`: the steady state of a long search, without the one-off start-up.

With no `--address` a private local Ray with `--num-cpus` CPUs (default: all) is started (`init_ray`). Last line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

try:
    from dass_ray._deps import require
except ModuleNotFoundError:  # dass_ray is not installed for this python: the checkout's copy says what is missing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dass_ray._deps import require

require()

import numpy as np
import torch


def inprocess_scores(teacher_sd, space, archs, model, teacher_acc, batch_size: int, probe_seed: int = 0,
                     marks: list | None = None):
    """`score_candidates`' computation without Ray: same setup, same batches, same numerics.

    `marks` (optional) gets the `time.perf_counter()` at which each batch was scored."""
    from dass_ray.core.embed import Embedder
    from dass_ray.core.meta import teacher_support
    from dass_ray.core.predictor import PredictorBatch
    from dass_ray.search.scoring import adapted_params

    eng = Embedder(teacher_sd, space, seed=probe_seed)
    tmap = eng.teacher_embedding().clone()
    support = teacher_support(tmap, torch.from_numpy(space.encode(space.teacher()).astype(np.float32)), teacher_acc)
    params = adapted_params(model, support)
    pred = model.predictor.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(archs), batch_size):
            b = archs[i:i + batch_size]
            maps = eng.embed(b)
            codes = torch.from_numpy(space.encode_many(b).astype(np.float32))
            out.append(pred(PredictorBatch(maps, tmap, codes), params).float().numpy())
            if marks is not None:
                marks.append(time.perf_counter())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> dict:
    from dass_ray.search.rayutil import ADDRESS_HELP, NUM_CPUS_HELP

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16384, help="candidates scored by each path")
    ap.add_argument("--batch-size", type=int, default=1024, help="candidates per encoder call (and in-process batch)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default=None, help="teacher checkpoint (default: the bundled CPU teacher)")
    ap.add_argument("--address", default=None, help=ADDRESS_HELP)
    ap.add_argument("--num-cpus", type=int, default=None, help=NUM_CPUS_HELP)
    ap.add_argument("--warm", action="store_true", help="also time the actor path with pre-started encoders")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.repeats < 1:
        ap.error("--n, --batch-size and --repeats must be >= 1")

    import ray

    from dass_ray.core.kd import load_teacher
    from dass_ray.core.meta import make_model
    from dass_ray.search.scoring import EncoderActor, score_candidates
    from dass_ray.search import DEFAULT_TEACHER
    from dass_ray.search.rayutil import init_ray

    torch.set_num_threads(1)  # the in-process path gets what one actor gets
    ck = load_teacher(args.teacher or DEFAULT_TEACHER)
    space = ck.space
    archs = space.sample_many(np.random.default_rng(args.seed), args.n)
    model = make_model(space, seed=args.seed)  # weights do not change the cost
    if not args.address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local instance: no token file written
    init_ray(args.address, args.num_cpus)
    cpus = ray.cluster_resources().get("CPU", 0)

    # warm-up (not timed): oneDNN kernels in this process, worker processes with torch imported in Ray
    w = archs[: min(len(archs), 2 * args.batch_size)]
    inprocess_scores(ck.state_dict, space, w, model, ck.val_acc, args.batch_size)
    score_candidates(ck.state_dict, space, w, model, ck.val_acc, encoders=2, predictors=1,
                     batch_size=args.batch_size)

    times: dict[str, list[float]] = {"inprocess": [], "actor_1": [], "actor_2": []}
    # steady state: candidates after the first scored batch / time from the first to the last scored batch
    # (leaves out the one-off start-up: actor processes, imports, teacher folding, adaptation)
    steady: dict[str, list[float]] = {"inprocess": [], "actor_1": [], "actor_2": []}
    first: dict[str, list[float]] = {"inprocess": [], "actor_1": [], "actor_2": []}
    if args.warm:
        times.update({"warm_1": [], "warm_2": []})
    nb = len(range(0, args.n, args.batch_size))

    def record(key, t0, marks):
        first[key].append(marks[0] - t0)
        if nb > 1:
            steady[key].append((args.n - min(args.batch_size, args.n)) / (marks[-1] - marks[0]))

    ref = None
    for _ in range(args.repeats):
        marks: list[float] = []
        t0 = time.perf_counter()
        ref = inprocess_scores(ck.state_dict, space, archs, model, ck.val_acc, args.batch_size, marks=marks)
        times["inprocess"].append(time.perf_counter() - t0)
        record("inprocess", t0, marks)
        for e in (1, 2):
            marks = []
            t0 = time.perf_counter()
            got = score_candidates(ck.state_dict, space, archs, model, ck.val_acc, encoders=e, predictors=1,
                                   batch_size=args.batch_size, on_progress=lambda k: marks.append(time.perf_counter()))
            times[f"actor_{e}"].append(time.perf_counter() - t0)
            record(f"actor_{e}", t0, marks)
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        if args.warm:
            sd_ref = ray.put(ck.state_dict)
            for e in (1, 2):
                actors = [EncoderActor.options(num_cpus=min(1.0, cpus / 3)).remote(space.to_dict(), 0, 1)
                          for _ in range(e)]
                ray.get([a.embed.remote(0, [x.to_json() for x in w[:8]], [sd_ref]) for a in actors])
                t0 = time.perf_counter()
                got = score_candidates(ck.state_dict, space, archs, model, ck.val_acc, predictors=1,
                                       batch_size=args.batch_size, actors=actors)
                times[f"warm_{e}"].append(time.perf_counter() - t0)
                np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
                for a in actors:
                    ray.kill(a)
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: args.n / v for k, v in med.items()}
    result = {
        "inprocess_candidates_per_s": round(rate["inprocess"], 1),
        "actor_candidates_per_s": {"1": round(rate["actor_1"], 1), "2": round(rate["actor_2"], 1)},
        "overhead_ratio": round(rate["actor_1"] / rate["inprocess"], 3),
        "n": args.n, "batch_size": args.batch_size, "repeats": args.repeats, "ray_cpus": cpus,
        "machine_cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2),
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "first_batch_s": {k: round(statistics.median(v), 3) for k, v in first.items()},
    }
    if nb > 1:
        st = {k: statistics.median(v) for k, v in steady.items()}
        result["steady_candidates_per_s"] = {k: round(v, 1) for k, v in st.items()}
        result["steady_overhead_ratio"] = round(st["actor_1"] / st["inprocess"], 3)
    if args.warm:
        result["warm_actor_candidates_per_s"] = {"1": round(rate["warm_1"], 1), "2": round(rate["warm_2"], 1)}
        result["warm_overhead_ratio"] = round(rate["warm_1"] / rate["inprocess"], 3)
    print(f"{args.n} candidates, batch {args.batch_size}: in-process {rate['inprocess']:.0f}/s, "
          f"1 actor {rate['actor_1']:.0f}/s, 2 actors {rate['actor_2']:.0f}/s "
          f"(ratio {result['overhead_ratio']:.3f}; Ray CPUs {cpus:g}, load {result['loadavg_1m']})", file=sys.stderr)
    ray.shutdown()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
