"""Ranking metrics, bootstrap intervals and the label-noise ceiling (numpy only)."""
import numpy as np
import pytest

from dass_ray.core.meta import spearman
from dass_ray.core.ranking import (bootstrap_mean, bootstrap_task, label_ceiling, ranking_metrics, size_blend,
                                   teacher_strength)


def _task(rng, n=50, noise=0.5):
    acc = rng.uniform(0.5, 0.9, n)
    return {"good": acc + noise * 0.1 * rng.standard_normal(n), "bad": rng.standard_normal(n)}, acc


def test_bootstrap_intervals_bracket_the_estimate_and_separate_real_differences():
    rng = np.random.default_rng(0)
    tasks = [_task(rng) for _ in range(6)]
    for scores, acc in tasks:
        ci = bootstrap_task(scores, acc, n_boot=300)
        for m in scores:
            assert ci[m][0] <= spearman(scores[m], acc) <= ci[m][1]
        assert ci["good"][0] > ci["bad"][1]  # a strong and a random score do not overlap on 50 students
    boot = bootstrap_mean(tasks, reference="good", n_boot=300)
    assert boot["mean"]["good"][0] > 0.5 and boot["mean"]["bad"][0] < 0 < boot["mean"]["bad"][1]
    lo, hi = boot["diff_vs_good"]["bad"]
    assert hi < 0  # the difference is real: its interval excludes 0
    # the same seed gives the same intervals (reproducible figures)
    assert bootstrap_mean(tasks, reference="good", n_boot=300) == boot


def test_label_ceiling_spearman_brown():
    rng = np.random.default_rng(1)
    true = rng.uniform(0, 1, 40)
    same = np.stack([true, true], 1)
    assert label_ceiling(same, 1)["ceiling"] == pytest.approx(1.0)
    noisy = np.stack([true + 0.3 * rng.standard_normal(40), true + 0.3 * rng.standard_normal(40)], 1)
    one, two = label_ceiling(noisy, 1), label_ceiling(noisy, 2)
    r = one["seed_spearman"]
    assert 0 < r < 1 and one["reliability"] == pytest.approx(r)
    assert two["reliability"] == pytest.approx(2 * r / (1 + r)) and two["ceiling"] > one["ceiling"]
    assert one["seed_spearman_ci"][0] <= r <= one["seed_spearman_ci"][1]
    assert label_ceiling(None, 1) is None and label_ceiling(noisy[:2], 1) is None


def test_regret_counts_points_lost_against_the_pool_best():
    acc = np.array([0.5, 0.9, 0.7, 0.8, 0.6, 0.65])
    m = ranking_metrics(np.array([6, 1, 2, 3, 4, 5.0]), acc)  # ranks the worst first
    assert m["top1_regret"] == pytest.approx(40.0) and m["top5_regret"] == pytest.approx(10.0)
    assert ranking_metrics(acc, acc)["spearman"] == pytest.approx(1.0)


def test_size_blend_uses_model_size_only_for_a_teacher_well_above_chance():
    scores = np.array([0.9, 0.5, 0.1, 0.3])  # the predictor's order: 0, 1, 3, 2
    params = np.array([3e3, 1e3, 9e3, 2e3])  # size's ranks: 2, 0, 3, 1
    assert teacher_strength(0.2, 5) == 0.0 and teacher_strength(0.1, 5) == 0.0  # at or below chance
    assert teacher_strength(1.0, 5) == pytest.approx(1.0) and teacher_strength(0.6, 5) == pytest.approx(0.5)
    # weak teacher (0.25 on 5 classes: strength 0.06): exactly the predictor's order
    weak = size_blend(scores, params, 0.25, 5)
    assert list(np.argsort(-weak, kind="mergesort")) == [0, 1, 3, 2]
    # strong teacher: the mean of the two ranks -- the biggest student (2), last by score, moves up to second
    strong = size_blend(scores, params, 0.9, 5)
    assert strong.tolist() == [(3 + 2) / 2, (2 + 0) / 2, (0 + 3) / 2, (1 + 1) / 2]
    assert list(np.argsort(-strong, kind="mergesort")) == [0, 2, 1, 3]
    assert spearman(strong, params) > spearman(weak, params)
    with pytest.raises(ValueError, match="4 scores but 3 parameter counts"):
        size_blend(scores, params[:3], 0.9, 5)


def test_the_default_orders_threshold_is_the_one_fit_on_the_shipped_meta_training_tasks(tmp_path):
    """scripts/fit_order.py on the shipped meta-dataset: SIZE_BLEND_STRENGTH is the best threshold on the
    meta-training tasks, and on the meta-validation tasks the blend ranks and searches at least as well as the
    predictor alone (what made it the search's default)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from dass_ray.core.ranking import SIZE_BLEND_STRENGTH

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, str(root / "scripts" / "fit_order.py"), "--output", str(tmp_path / "o.json")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res == json.loads((tmp_path / "o.json").read_text())
    train, val = res["roles"]["train"], res["roles"]["val"]
    fits = {k: v["spearman"] for k, v in train.items() if k.startswith("dass_size@")}
    assert max(fits, key=fits.get) == f"dass_size@{SIZE_BLEND_STRENGTH}", fits
    best = val[f"dass_size@{SIZE_BLEND_STRENGTH}"]
    assert best["spearman"] >= val["dass"]["spearman"] and best["trials"] <= val["dass"]["trials"], val
