"""The search benchmark (benchmarks/bench_search.py): budgets, strategies and reliability on hand-built pools whose
answers are worked out by hand below, and one end-to-end run on a two-task copy of meta-validation tasks."""

import importlib.util
import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dass_ray.core.posterior import FEATURES, PoolData, Prior

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", ROOT / "benchmarks" / "bench_search.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_search"] = mod
    spec.loader.exec_module(mod)
    return mod


def _pool(tid, acc, params, flops, teacher_acc=0.95, num_classes=10):
    n = len(acc)
    return PoolData(tid, scores=np.linspace(0.3, 0.6, n), params=np.asarray(params, float),
                    flops=np.asarray(flops, float), acc=np.asarray(acc, float), teacher_acc=teacher_acc,
                    num_classes=num_classes, codes=np.random.default_rng(n).random((n, 6)))


def _toy(bench):
    """Four tasks. A: agreeing seeds; B; C: seeds that disagree completely (ceiling 0: unreliable); D: no pairs."""
    acc_a = [0.50, 0.70, 0.60, 0.80, 0.90]
    a = _pool("A", acc_a, params=[30, 10, 20, 50, 40], flops=[1, 2, 3, 4, 5])
    b = _pool("B", [0.60, 0.604, 0.70, 0.50], params=[4, 3, 2, 1], flops=[4, 3, 2, 1])
    acc_c = [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
    c = _pool("C", acc_c, params=[6, 5, 4, 3, 2, 1], flops=[1, 2, 3, 4, 5, 6])
    d = _pool("D", [0.9, 0.5, 0.5], params=[1, 2, 3], flops=[1, 2, 3])
    pairs_a = np.array([[x, x + 0.01] for x in acc_a])
    pairs_c = np.array([acc_c, acc_c[::-1]]).T
    ceil = {k: bench.task_ceiling(SimpleNamespace(seed_pairs=p, label_seeds=2))
            for k, p in (("A", pairs_a), ("C", pairs_c), ("D", None))}
    assert ceil["D"] is None and ceil["A"] > 0.9 and ceil["C"] < 0.5
    rng = np.random.default_rng(0)
    return [bench.BenchTask(a, rng.random((5, 8)), ceil["A"]), bench.BenchTask(b, rng.random((4, 8)), None),
            bench.BenchTask(c, rng.random((6, 8)), ceil["C"]), bench.BenchTask(d, rng.random((3, 8)), ceil["D"])]


def _size_prior():
    """A prior that is sure the accuracy rises with log parameter count and nothing else."""
    return Prior(w_mean=tuple(1.0 if f == "z_log_params" else 0.0 for f in FEATURES),
                 w_sd=tuple(1e-3 for _ in FEATURES), rbf_sd=0.0, rbf_len=1.0, noise_sd=1.0)


def test_toy_budgets_params_and_exclusion(bench):
    tasks = _toy(bench)
    out = bench.run_benchmark(tasks, _size_prior(), strategies=("params", "random", "posterior", "optuna_tpe"),
                             seeds=2)
    # pool sizes: A's FLOPs 1..5 have median 3 and 25th percentile 2; B's 1..4: 2.5 and 1.75
    assert out["budget_pool_sizes"]["none"] == {"A": 5, "B": 4, "C": 6, "D": 3}
    assert out["budget_pool_sizes"]["p50"]["A"] == 3 and out["budget_pool_sizes"]["p25"]["A"] == 2
    assert out["budget_pool_sizes"]["p50"]["B"] == 2 and out["budget_pool_sizes"]["p25"]["B"] == 1
    tr = {b: out["budgets"][b]["trials"]["params"] for b in ("none", "p50", "p25")}
    r1 = {b: out["budgets"][b]["regret_at"]["1"]["params"] for b in ("none", "p50", "p25")}
    # A, largest first: 3 (0.80), 4 (0.90 = best) -> 2 trials, 10 points after one
    assert tr["none"]["A"] == 2 and r1["none"]["A"] == pytest.approx(10.0)
    # A under p50 keeps 0, 1, 2 (best 0.70): order 0 (0.50), 2 (0.60), 1 (0.70) -> 3 trials, 20 points after one
    assert tr["p50"]["A"] == 3 and r1["p50"]["A"] == pytest.approx(20.0)
    assert out["budgets"]["p50"]["regret_at"]["3"]["params"]["A"] == pytest.approx(0.0)
    # A under p25 keeps 0, 1: order 0, 1 -> 2 trials
    assert tr["p25"]["A"] == 2 and r1["p25"]["A"] == pytest.approx(20.0)
    # B: 0 (0.60), 1 (0.604, still 9.6 points short), 2 (0.70) -> 3; under p50 only 2 (0.70), 3 -> 1 trial
    assert tr["none"]["B"] == 3 and tr["p50"]["B"] == 1 and tr["p25"]["B"] == 1
    # C (unreliable) is reported but left out: the mean over A, B, D is (2 + 3 + 3) / 3, not (2 + 3 + 6 + 3) / 4
    assert tr["none"]["C"] == 6 and tr["none"]["D"] == 3
    assert tr["none"]["mean"] == pytest.approx(8 / 3, abs=1e-3)
    lo, hi = tr["none"]["ci"]
    assert 2 <= lo <= 8 / 3 <= hi <= 3
    assert list(out["excluded"]) == ["C"] and out["excluded"]["C"] < 0.5
    assert out["trials_to_within_0_5pt"] == out["budgets"]["none"]["trials"]
    # D: the best of three is one student: a random order finds it after 2 trials on average
    assert out["budgets"]["none"]["trials"]["random"]["D"] == pytest.approx(2.0, abs=0.25)
    # a posterior sure that bigger is better orders as largest-first does
    for b in ("none", "p50", "p25"):
        for t in "ABCD":
            assert out["budgets"][b]["trials"]["posterior"][t] == tr[b][t]
    for s in ("optuna_tpe",):  # (the GP sampler is slow on these flat toys; it runs in the next test)
        row = out["budgets"]["none"]["trials"][s]
        assert all(1 <= row[t] <= out["budget_pool_sizes"]["none"][t] for t in "ABCD")
        assert "spread" in row and row["spread"] >= 0
        reg = out["budgets"]["none"]["regret_at"]
        assert all(reg["1"][s][t] >= reg["3"][s][t] >= reg["5"][s][t] >= 0 for t in "ABCD")
    assert out["budgets"]["none"]["regret_at"]["5"]["params"]["A"] == 0.0  # all five of A measured


def test_optuna_order_is_a_permutation_that_never_repeats(bench):
    rng = np.random.default_rng(1)
    acc = rng.random(12)
    for kind in ("optuna_tpe", "optuna_gp"):
        order = bench.optuna_order(rng.random((12, 8)), acc, kind, seed=0)
        assert sorted(order) == list(range(12))


def _tiny_metadataset(tmp: Path, n_tasks: int = 2) -> list[str]:
    import pyarrow.parquet as pq

    src = ROOT / "artifacts" / "metadataset"
    tasks = pq.read_table(src / "tasks.parquet")
    ids = sorted(t for t, r in zip(tasks["task_id"].to_pylist(), tasks["role"].to_pylist()) if r == "val")[:n_tasks]
    tmp.mkdir()
    pq.write_table(tasks.filter(np.isin(np.array(tasks["task_id"].to_pylist()), ids)), tmp / "tasks.parquet")
    st = pq.read_table(src / "students.parquet")
    pq.write_table(st.filter(np.isin(np.array(st["task_id"].to_pylist()), ids)), tmp / "students.parquet")
    return ids


def test_main_end_to_end(bench, tmp_path):
    ids = _tiny_metadataset(tmp_path / "md")
    prior = tmp_path / "prior.json"
    prior.write_text(_size_prior().to_json())
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bench.main(["--metadataset", str(tmp_path / "md"), "--roles", "val", "--seeds", "1",
                         "--prior", str(prior)])
    assert rc == 0
    out = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert set(out["budgets"]) == {"none", "p50", "p25"}
    assert sorted(out["pool_sizes"]) == ids and out["tolerance_pts"] == 0.5
    assert out["prior"] == str(prior)
    for b, res in out["budgets"].items():
        assert set(res["trials"]) == set(bench.STRATEGIES)
        assert set(res["regret_at"]) == {"1", "3", "5"}
        assert res["trials"]["default"] == res["trials"][out["default_is"]]
        for t in ids:
            size = out["budget_pool_sizes"][b][t]
            assert size <= out["pool_sizes"][t]
            for s in bench.STRATEGIES:
                assert 1 <= res["trials"][s][t] <= size
                assert res["regret_at"]["1"][s][t] >= res["regret_at"]["3"][s][t] >= res["regret_at"]["5"][s][t]
        assert out["budget_pool_sizes"]["p25"][ids[0]] <= out["budget_pool_sizes"]["p50"][ids[0]]
    assert out["trials_to_within_0_5pt"] == out["budgets"]["none"]["trials"]
