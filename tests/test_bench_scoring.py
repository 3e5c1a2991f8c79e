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


def _check(res: dict, n: int) -> None:
    for k in REQUIRED:
        assert k in res, k
    assert res["n"] == n and res["threads"] == 1
    for k in ("candidates_per_s", "achieved_gflops", "matmul_peak_gflops", "ratio", "embed_s", "score_s",
              "executed_gflops"):
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]) and res[k] > 0, (k, res[k])
    assert res["ratio"] == pytest.approx(res["achieved_gflops"] / res["matmul_peak_gflops"], rel=1e-9)
    if res["repeats"] == 1:  # end to end: embed + score
        assert res["candidates_per_s"] == pytest.approx(n / (res["embed_s"] + res["score_s"]), rel=1e-9)
    assert 0 < res["row_fraction"] <= 1


def test_bench_scoring_random_teacher_with_reference():
    res = _run("--n", "12", "--repeats", "1", "--reference", "2")
    _check(res, 12)
    assert res["space"] == "cpu" and res["teacher"].startswith("random")
    assert res["reference_n"] == 2 and res["reference_candidates_per_s"] > 0
    # own FLOPs of 12 CPU-preset students: between 12 smallest and 12 teachers
    from dass_ray.core.space import get_space

    sp = get_space("cpu", 10)
    fc = 2 * sp.stage_widths[-1] * sp.num_classes
    lo, hi = 12 * (sp.flops(sp.smallest()) - fc), 12 * (sp.flops(sp.teacher()) - fc)
    assert lo <= res["gflop_per_draw"] * 1e9 <= hi


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
