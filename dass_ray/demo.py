"""Core demo (no Ray): sample candidates at the CPU preset, remap + embed them, score with a predictor.

Used by `make run` until the search pipeline ships its trained teacher and predictor.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dass_ray.embed import Embedder
from dass_ray.meta import MetaSGD, teacher_support
from dass_ray.nets import build
from dass_ray.predictor import Predictor, PredictorBatch, PredictorConfig
from dass_ray.space import get_space


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", default="runs/demo")
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    space = get_space("cpu", num_classes=10)
    teacher = build(space.teacher(), space, seed=args.seed).eval()
    t0 = time.perf_counter()
    archs = space.sample_many(np.random.default_rng(args.seed), args.candidates)
    emb = Embedder(teacher.state_dict(), space, seed=args.seed)
    maps = emb.embed(archs)
    t_embed = time.perf_counter() - t0
    pred = MetaSGD(Predictor(PredictorConfig(space.feature_channels, space.encoding_size)))
    tmap = emb.teacher_embedding()
    sup = teacher_support(tmap, torch.from_numpy(space.encode(space.teacher())), 0.9)
    q = PredictorBatch(maps, tmap, torch.from_numpy(space.encode_many(archs)))
    scores = pred.predict(sup, q)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    best = int(scores.argmax())
    res = {"candidates": len(archs), "embed_seconds": round(t_embed, 3),
           "candidates_per_s": round(len(archs) / t_embed, 1), "top_arch": archs[best].to_dict(),
           "note": "untrained teacher and predictor: a throughput demo of the core, not a search"}
    (out / "demo.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
