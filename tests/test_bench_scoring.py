"""The scoring benchmark runs end to end and reports its figures as one JSON line (behaviour only, no timings)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_scoring.py"
REQUIRED = ("candidates_per_s", "achieved_gflops", "matmul_peak_gflops", "ratio", "embed_s", "score_s", "n", "threads")


def _run(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(BENCH), "--threads", "1", "--matmul-size", "256", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


# The CPU space's own conv FLOPs on one 32x32 image (stem and stage convs, classifier excluded), worked out by hand:
# a 3x3 conv from ci to co channels at an hw x hw output costs 2 * 9 * ci * co * hw^2 FLOPs.
#   smallest ((8,), (16,), (32,), (128,)): stem 3*8*32^2 = 24,576; stage 0 (32x32) 8*8 twice = 131,072;
#     stage 1 (16x16) 8*16 + 16*16 -> 98,304; stage 2 (8x8) 16*32 + 32*32 -> 98,304; stage 3 (4x4) 32*128 +
#     128*128 -> 327,680; 679,936 multiply-adds per pixel-channel pair x 18 = 12,238,848
#   teacher (5 blocks of 16, 32, 64, 128): stem 3*16*32^2 = 49,152; stage 0 ten 16*16 convs at 32^2 = 2,621,440;
#     stages 1-3 one conv from the previous width plus nine at their own, (16*32 + 9*32*32)*16^2 =
#     (32*64 + 9*64*64)*8^2 = (64*128 + 9*128*128)*4^2 = 2,490,368 each; 10,141,696 x 18 = 182,550,528
SMALLEST_FLOPS, TEACHER_FLOPS = 12_238_848, 182_550_528


def _check(res: dict, n: int) -> None:
    for k in REQUIRED:
        assert k in res, k
    assert res["n"] == n and res["threads"] == 1
    for k in ("candidates_per_s", "achieved_gflops", "matmul_peak_gflops", "ratio", "embed_s", "score_s",
              "executed_gflops"):
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    # n draws of the CPU space: each costs between the smallest member and the teacher (hand-computed above)
    assert n * SMALLEST_FLOPS <= res["gflop_per_draw"] * 1e9 <= n * TEACHER_FLOPS, res["gflop_per_draw"]
    assert res["embed_candidates_per_s"] > res["candidates_per_s"]  # embedding alone vs embedding + scoring
    assert 0 < res["row_fraction"] <= 1


def test_the_benchmarks_flop_count_by_hand():
    import importlib.util

    from dass_ray.core.space import ArchConfig, get_space

    spec = importlib.util.spec_from_file_location("bench_scoring", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sp = get_space("cpu", 10)
    assert sp.smallest() == ArchConfig(((8,), (16,), (32,), (128,)))
    assert bench.own_flops(sp, sp.smallest()) == SMALLEST_FLOPS
    assert bench.own_flops(sp, sp.teacher()) == TEACHER_FLOPS
    # one block more in stage 0 (8 -> 8 at 32x32, twice): 2 * 9 * 8 * 8 * 1024 * 2 more
    two = ArchConfig(((8, 8), (16,), (32,), (128,)))
    assert bench.own_flops(sp, two) == SMALLEST_FLOPS + 2_359_296


def test_bench_scoring_random_teacher_with_reference():
    res = _run("--n", "12", "--repeats", "1", "--reference", "2")
    _check(res, 12)
    assert res["space"] == "cpu" and res["teacher"].startswith("random")
    assert res["reference_n"] == 2 and res["reference_candidates_per_s"] > 0


def test_bench_scoring_with_teacher_checkpoint(tmp_path):
    from dass_ray.core.kd import save_teacher
    from dass_ray.core.nets import build
    from dass_ray.core.space import get_space

    sp = get_space("cpu", 10)
    path = tmp_path / "teacher.pt"
    save_teacher(path, build(sp.teacher(), sp, seed=1).eval(), sp, 0.7, [f"c{i}" for i in range(10)])
    res = _run("--n", "8", "--repeats", "2", "--teacher", str(path))
    _check(res, 8)
    assert res["teacher"] == str(path) and res["repeats"] == 2 and len(res["runs"]) == 2
