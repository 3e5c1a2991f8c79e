"""Scoring benchmark: remap + embed + score N sampled candidates end to end (docs/method.md, sections 2-4 and 8;
issue 2).

    python benchmarks/bench_scoring.py [--n 4096] [--teacher PATH] [--reference K] [--repeats 3]

What is timed, per repeat, on a fresh draw of N distinct candidates at the space of the teacher (the CPU
preset by default):
  embed: `Embedder.embed(archs)` (first-k remapping, BN folded, stage-4 maps on the fixed Gaussian probe);
  score: architecture encodings + `MetaSGD.predict(teacher_support(...), query)` (one inner step on the
         teacher, then the predictor on every candidate).
A warm-up pass on another draw of the same size runs first (oneDNN builds its kernels there; the timed draws
have different group sizes, so the timed passes still meet new shapes, as a real search would).

`achieved_gflops` counts only each candidate's *own* forward FLOPs on the 1-image probe: every conv of the
student up to stage 4, stem included, classifier excluded (`space.flops(arch)` minus the classifier's
2 x C4 x classes), divided by the embed time. Work the engine spends on padding or masking is not credited.
The engine computes a prefix shared by several candidates (the stem, the first blocks) once, so the credited
FLOPs are not the executed ones: `executed_gflops` (from `Embedder.stats`: the conv FLOPs it actually ran,
padding included) and `row_fraction` (activation rows computed / candidate blocks) say what ran.
`matmul_peak_gflops` is the best of several dense fp32 2048^3 matmuls in the same process (taken before and
after the timed passes); `ratio` = achieved / peak. Each figure is the median over repeats. The last line
printed is one JSON object.

Timings on a shared machine: with OpenMP's default (spinning) wait policy, two threads lose most of their
time when another process holds one of the cores; compare runs made under the same load only.

`--reference K` also times the naive per-student path (`embed_reference`: build, copy weights, forward) on
the first K candidates of the first timed draw.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on a 2-core machine that another process shares, spinning threads
# slow a 2-thread run 4-5x (measured); on an idle machine the cost is small. Override by setting the variable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dass_ray.core.embed import Embedder, embed_reference
from dass_ray.core.kd import load_teacher
from dass_ray.core.meta import MetaSGD, teacher_support
from dass_ray.core.nets import build
from dass_ray.core.predictor import Predictor, PredictorBatch, PredictorConfig
from dass_ray.core.space import ArchConfig, SpaceConfig, get_space


def own_flops(space: SpaceConfig, arch: ArchConfig) -> int:
    """The candidate's own conv FLOPs on one image up to stage 4 (stem included, classifier excluded)."""
    conv = sum(2 * ci * co * k * k * hw * hw for name, ci, co, k, hw in space.layer_shapes(arch) if name != "fc")
    fc = 2 * arch.widths[-1][-1] * space.num_classes
    assert conv == space.flops(arch) - fc
    return int(conv)


def random_teacher(space: SpaceConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised teacher with non-trivial BN statistics and affine parameters."""
    net = build(space.teacher(), space, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return {k: v.detach().clone() for k, v in net.eval().state_dict().items()}


def matmul_peak_gflops(size: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """Best-of-`reps` dense fp32 matmul rate in this process on `device` (GFLOP/s; on CUDA with torch's default
    matmul precision, i.e. no TF32, and 8192^3 products so that one product outlasts its launch)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        size = max(size, 8192)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dev)
    b = torch.randn(size, size, generator=g).to(dev)
    out = torch.empty(size, size, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)  # warm-up
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="candidates per timed draw")
    ap.add_argument("--seed", type=int, default=0, help="seed of the candidate draws (and of the random teacher)")
    ap.add_argument("--teacher", default=None, help="a teacher checkpoint (dass_ray.core.kd.save_teacher); default: random")
    ap.add_argument("--space", default="cpu", help="space preset for the random teacher")
    ap.add_argument("--batch-size", type=int, default=2048, help="Embedder.embed batch size")
    ap.add_argument("--repeats", type=int, default=3, help="timed draws; figures are medians")
    ap.add_argument("--reference", type=int, default=0, metavar="K", help="also time embed_reference on K candidates")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--matmul-size", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1 or args.reference < 0:
        ap.error("--n and --repeats must be >= 1, --reference >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.teacher:
        ck = load_teacher(args.teacher)
        space, teacher_arch, teacher_sd, teacher_acc = ck.space, ck.arch, ck.state_dict, ck.val_acc
        teacher_desc = args.teacher
    else:
        space = get_space(args.space, 10)
        teacher_arch, teacher_sd, teacher_acc = space.teacher(), random_teacher(space, args.seed), 0.5
        teacher_desc = f"random(seed={args.seed})"

    pred = Predictor(PredictorConfig(space.feature_channels, space.encoding_size))
    meta = MetaSGD(pred).eval()
    rng = np.random.default_rng(args.seed)

    peak = matmul_peak_gflops(args.matmul_size)

    # setup (not timed): fold BN, embed the teacher, build the support set
    emb = Embedder(teacher_sd, space, teacher_arch=teacher_arch)
    teacher_map = emb.teacher_embedding().clone()  # a normal tensor: adaptation differentiates through it
    support = teacher_support(teacher_map, torch.from_numpy(space.encode(teacher_arch)), teacher_acc)

    def score(archs, maps):
        query = PredictorBatch(maps, teacher_map, torch.from_numpy(space.encode_many(archs)))
        return meta.predict(support, query)

    warm = space.sample_many(rng, args.n)
    score(warm, emb.embed(warm, batch_size=args.batch_size))  # warm-up

    runs = []
    first = None
    for _ in range(args.repeats):
        archs = space.sample_many(rng, args.n)
        first = first or archs
        flops = sum(own_flops(space, a) for a in archs)
        t0 = time.perf_counter()
        maps = emb.embed(archs, batch_size=args.batch_size)
        t1 = time.perf_counter()
        scores = score(archs, maps)
        t2 = time.perf_counter()
        assert scores.shape == (args.n,) and torch.isfinite(scores).all()
        st = getattr(emb, "stats", {})
        runs.append({"embed_s": t1 - t0, "score_s": t2 - t1, "gflop": flops / 1e9,
                     "executed_gflop": st.get("conv_flops", 0) / 1e9,
                     "row_fraction": st.get("rows", 0) / max(1, st.get("candidate_block_rows", 0))})

    peak = max(peak, matmul_peak_gflops(args.matmul_size))
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    achieved = statistics.median(r["gflop"] / r["embed_s"] for r in runs)
    result = {
        "n": args.n,
        "candidates_per_s": statistics.median(args.n / (r["embed_s"] + r["score_s"]) for r in runs),
        "achieved_gflops": achieved,
        "matmul_peak_gflops": peak,
        "ratio": achieved / peak,
        "embed_s": med("embed_s"),
        "score_s": med("score_s"),
        "embed_candidates_per_s": statistics.median(args.n / r["embed_s"] for r in runs),
        "gflop_per_draw": med("gflop"),
        # what the engine actually ran: conv FLOPs incl. padding, over shared prefixes (see Embedder.stats)
        "executed_gflops": statistics.median(r["executed_gflop"] / r["embed_s"] for r in runs),
        "executed_gflop_per_draw": med("executed_gflop"),
        "row_fraction": med("row_fraction"),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine while this ran (see the module doc)
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "space": space.name,
        "teacher": teacher_desc,
        "runs": [{k: round(v, 4) for k, v in r.items()} for r in runs],
    }

    if args.reference:
        ref_archs = first[: args.reference]
        t0 = time.perf_counter()
        embed_reference(teacher_sd, ref_archs, space, emb.x, teacher_arch=teacher_arch)
        dt = time.perf_counter() - t0
        result["reference_n"] = len(ref_archs)
        result["reference_candidates_per_s"] = len(ref_archs) / dt
        result["reference_achieved_gflops"] = sum(own_flops(space, a) for a in ref_archs) / dt / 1e9

    print(
        f"{args.n} candidates x {args.repeats}: embed {result['embed_s']:.3f}s score {result['score_s']:.3f}s "
        f"-> {result['candidates_per_s']:.0f} cand/s; {achieved:.1f} GFLOP/s of {peak:.1f} peak "
        f"(ratio {result['ratio']:.3f}, {result['threads']} threads)",
        file=sys.stderr,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
