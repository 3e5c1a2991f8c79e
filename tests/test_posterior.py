"""The search posterior (dass_ray.core.posterior) and its Tune searcher: hand-computed updates, resume, budget,
trials in flight, the early stop. No Ray cluster is needed (the searcher is driven directly)."""
import math

import numpy as np
import pytest

from dass_ray.core.posterior import FEATURES, PoolModel, Prior, load_prior, pool_features, simulate_search


def intercept_only(sd=2.0, noise=1.0, mean=0.0) -> Prior:
    """A prior whose only uncertain weight is the intercept: every student is the teacher + an unknown shift."""
    w_mean = [mean] + [0.0] * (len(FEATURES) - 1)
    w_sd = [sd] + [0.0] * (len(FEATURES) - 1)
    return Prior(w_mean=tuple(w_mean), w_sd=tuple(w_sd), noise_sd=noise)


def pool(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return dict(scores=rng.uniform(0.8, 0.9, n), params=rng.integers(10_000, 200_000, n).astype(float),
                flops=rng.integers(1_000_000, 9_000_000, n).astype(float), teacher_acc=0.9, num_classes=10)


def test_one_measurement_moves_every_candidate_by_the_hand_computed_amount():
    m = PoolModel(intercept_only(sd=2.0, noise=1.0), **pool())
    assert np.allclose(m.mean(), 0.9)  # prior: the teacher's accuracy
    assert np.allclose(m.sd(), math.sqrt(4 + 1) / 100)
    m.observe(0, 0.95)  # 5 points above the teacher
    # posterior of the shift: gain 4 / (4 + 1) = 0.8 -> +4 points; variance 4 * 1 / 5 = 0.8 (+ noise 1)
    assert np.allclose(m.mean(), 0.94)
    assert np.allclose(m.sd(), math.sqrt(0.8 + 1) / 100)
    lo, hi = m.interval()
    assert np.allclose(hi - lo, 2 * 1.6448536 * math.sqrt(1.8) / 100)


def test_features_are_standardised_over_the_pool():
    p = pool(n=8)
    f = pool_features(p["scores"], p["params"], p["flops"], 0.9, 10)
    assert f.shape == (8, len(FEATURES))
    assert np.allclose(f[:, 0], 1)
    assert np.allclose(f[:, 1], 100 * (p["scores"] - 0.9))
    assert abs(f[:, 2].mean()) < 1e-9 and abs(f[:, 2].std() - 1) < 1e-9
    with pytest.raises(ValueError, match="equal 1-d shapes"):
        pool_features(p["scores"], p["params"][:3], p["flops"], 0.9, 10)


def test_greedy_search_takes_the_best_mean_and_learns_the_size_weight():
    # a prior that believes the predictor (z_score weight 2) but is unsure about size (weight 0 +- 3)
    w_mean = dict.fromkeys(FEATURES, 0.0) | {"z_score": 2.0}
    w_sd = dict.fromkeys(FEATURES, 0.0) | {"z_score": 0.5, "z_log_params": 3.0}
    prior = Prior(w_mean=tuple(w_mean[f] for f in FEATURES), w_sd=tuple(w_sd[f] for f in FEATURES), noise_sd=0.3)
    n = 12
    params = np.geomspace(1e4, 1e6, n)
    scores = np.linspace(0.85, 0.86, n)[::-1]  # the predictor prefers the smallest students
    acc = 0.80 + 0.01 * np.arange(n)  # but on this task the largest are best
    m = PoolModel(prior, scores, params, np.geomspace(1e6, 1e8, n), 0.9, 10)
    assert m.next_candidate() == 0  # before any trial: the predictor's favourite
    order = simulate_search(m, acc)
    assert order[0] == 0
    # after a few measured students the size weight is learnt and the largest student follows soon
    assert order.index(n - 1) <= 3, order


# --------------------------------------------------------------------------------------------- the Tune searcher


def searcher(n=30, budget=8, **kw):
    from dass_ray.search.searcher import PosteriorSearcher

    rng = np.random.default_rng(1)
    scores = rng.uniform(0.8, 0.9, n)
    params = rng.integers(10_000, 500_000, n).astype(float)
    flops = params * 50
    model = PoolModel(load_prior(), scores, params, flops, 0.9, 10, rng.normal(size=(n, 6)))
    return PosteriorSearcher([f'{{"i": {i}}}' for i in range(n)], model, budget, **kw), flops


def test_trials_in_flight_never_get_the_same_candidate_and_a_trial_id_keeps_its_config():
    s, _ = searcher(budget=6)
    configs = [s.suggest(f"t{k}") for k in range(6)]
    assert len({c["index"] for c in configs}) == 6
    assert s.suggest("t2") == configs[2]
    assert s.suggest("t6") == "FINISHED"  # the budget of KD trials
    for c in configs:
        assert c["predicted_lo"] < c["predicted"] < c["predicted_hi"]


def test_budget_mask_excludes_every_over_budget_candidate():
    s0, flops = searcher(budget=30)
    allowed = flops <= np.percentile(flops, 25)
    s, _ = searcher(budget=30, allowed=allowed)
    picked = []
    while True:
        c = s.suggest(f"t{len(picked)}")
        if c == "FINISHED":
            break
        picked.append(c["index"])
        s.on_trial_complete(f"t{len(picked) - 1}", {"best_acc": 0.85})
    assert sorted(picked) == sorted(np.flatnonzero(allowed).tolist())


def test_a_resumed_search_rebuilds_the_same_posterior_and_decisions():
    a, _ = searcher()
    acc = {}
    for k in range(4):
        c = a.suggest(f"t{k}")
        acc[c["index"]] = 0.80 + 0.01 * (c["index"] % 7)
        a.on_trial_complete(f"t{k}", {"best_acc": acc[c["index"]]})
    b, _ = searcher(done=dict(acc))  # a new process: only the recorded trials
    assert np.allclose(a.model.mean(), b.model.mean()) and np.allclose(a.model.sd(), b.model.sd())
    assert a.suggest("t4")["index"] == b.suggest("r0")["index"]


def test_failed_trial_is_not_evidence_and_not_proposed_again():
    s, _ = searcher(budget=5)
    c = s.suggest("t0")
    s.on_trial_complete("t0", None, error=True)
    assert not s.model.obs
    assert all(s.suggest(f"t{k}")["index"] != c["index"] for k in range(1, 5))


def test_stop_probability_ends_the_search_with_a_reason():
    # a confident prior: every student within a fraction of a point of the teacher; the first measured student
    # is 3 points above it, so no untried one is likely to beat it by 0.5 points
    s, _ = searcher(budget=20, stop_probability=0.05)
    s.model.prior = intercept_only(sd=0.05, noise=0.05)
    s.model.m0 = s.model.phi @ np.asarray(s.model.prior.w_mean)
    c = s.suggest("t0")
    s.on_trial_complete("t0", {"best_acc": 0.93})
    assert s.last_probability is not None and s.last_probability < 0.05
    assert s.suggest("t1") == "FINISHED"
    assert "stopped early" in s.stop_reason and "0.05" in s.stop_reason
    # without the rule it would go on
    s2, _ = searcher(budget=20)
    s2.suggest("t0")
    s2.on_trial_complete("t0", {"best_acc": 0.93})
    assert s2.suggest("t1") != "FINISHED"


def test_probability_of_improvement_is_one_before_any_trial_and_falls_with_evidence():
    m = PoolModel(intercept_only(sd=2.0, noise=1.0), **pool(n=10))
    assert m.prob_improvement() == 1.0
    m.observe(0, 0.90)
    p1 = m.prob_improvement()
    assert 0.3 < p1 < 1.0
    m.observe(1, 0.96)  # a student far above the rest of what was seen
    assert m.prob_improvement() < p1
