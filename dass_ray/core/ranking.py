"""How well a score ranks students, with the uncertainty a reader needs (plain numpy; no Ray, no torch).

With 30-50 students per task a single Spearman correlation moves by ~0.1-0.15 between resamples, so every figure
comes with a bootstrap interval: over students within a task, and over tasks (then students) for a mean across
tasks. Methods are resampled *paired* (the same draws for every method), so the interval of a difference between
two methods is meaningful. The label-noise ceiling says how far any predictor can go with labels this noisy.
"""

from __future__ import annotations

import numpy as np

from dass_ray.core.meta import _rank, kendall, spearman

CI = (2.5, 97.5)


def ranking_metrics(scores: np.ndarray, acc: np.ndarray) -> dict:
    """Spearman, Kendall tau-b, top-1 / top-5 regret (accuracy points lost vs the best student of the pool)."""
    order = np.argsort(-np.asarray(scores, float), kind="mergesort")
    best = acc.max()
    return {"spearman": spearman(scores, acc), "kendall": kendall(scores, acc),
            "top1_regret": float(100 * (best - acc[order[0]])), "top5_regret": float(100 * (best - acc[order[:5]].max()))}


def _interval(values: np.ndarray) -> list[float] | None:
    v = values[np.isfinite(values)]
    return [float(x) for x in np.percentile(v, CI)] if v.size else None


def bootstrap_task(scores: dict[str, np.ndarray], acc: np.ndarray, n_boot: int = 1000, seed: int = 0
                   ) -> dict[str, list[float] | None]:
    """95% interval of each method's Spearman on one task, resampling students (paired across methods)."""
    rng = np.random.default_rng(seed)
    n = len(acc)
    draws = {m: np.empty(n_boot) for m in scores}
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        for m, s in scores.items():
            draws[m][b] = spearman(s[idx], acc[idx])
    return {m: _interval(d) for m, d in draws.items()}


def bootstrap_mean(tasks: list[tuple[dict[str, np.ndarray], np.ndarray]], reference: str | None = None,
                   n_boot: int = 1000, seed: int = 0) -> dict:
    """Intervals of the mean Spearman over tasks, resampling tasks and then students within each (paired across
    methods). With `reference`, also the interval of (method - reference) for every other method: a difference
    whose interval excludes 0 is one the data support."""
    rng = np.random.default_rng(seed)
    methods = list(tasks[0][0])
    means = {m: np.empty(n_boot) for m in methods}
    for b in range(n_boot):
        pick = rng.integers(0, len(tasks), len(tasks))
        acc_b = {m: [] for m in methods}
        for i in pick:
            scores, acc = tasks[i]
            idx = rng.integers(0, len(acc), len(acc))
            for m in methods:
                acc_b[m].append(spearman(scores[m][idx], acc[idx]))
        for m in methods:
            means[m][b] = np.nanmean(acc_b[m])
    out = {"mean": {m: _interval(v) for m, v in means.items()}}
    if reference is not None:
        out["diff_vs_" + reference] = {m: _interval(means[m] - means[reference]) for m in methods if m != reference}
    return out


def label_ceiling(seeds: np.ndarray | None, label_seeds: int, n_boot: int = 1000, seed: int = 0) -> dict | None:
    """The label-noise ceiling from two KD seeds of the same students ([N, 2]).

    `seed_spearman` r: the agreement of two single-seed labels. The reliability of the label used is r for a
    single seed and 2r / (1 + r) for the mean of two (Spearman-Brown). `ceiling` = sqrt(reliability): the Spearman
    a perfect predictor of the noise-free accuracy is expected to reach against these labels."""
    if seeds is None or len(seeds) < 3:
        return None
    r = spearman(seeds[:, 0], seeds[:, 1])
    rng = np.random.default_rng(seed)
    rs = np.array([spearman(seeds[i, 0], seeds[i, 1]) for i in (rng.integers(0, len(seeds), len(seeds))
                                                               for _ in range(n_boot))])

    def rel(x):
        x = np.clip(x, 0.0, 1.0)
        return x if label_seeds == 1 else 2 * x / (1 + x)

    return {"students": int(len(seeds)), "seed_spearman": float(r), "seed_spearman_ci": _interval(rs),
            "label_seeds": int(label_seeds), "reliability": float(rel(r)), "ceiling": float(np.sqrt(rel(r)))}


def trials_needed(order, acc, tol=0.005) -> int:
    """KD trials, in `order`, until one student within `tol` of the pool's best accuracy is measured."""
    best = acc.max()
    for k, i in enumerate(order, 1):
        if acc[i] >= best - tol:
            return k
    return len(order)


# Teacher strength (how far its accuracy is from chance towards 1) from which `size_blend` mixes in parameter count.
# Fit on the meta-training tasks (0.3 of {0, 0.3, 0.4, 0.5, 0.6}: mean Spearman 0.441 against 0.308 for the
# predictor alone; scripts/fit_order.py), then checked on the meta-validation tasks (docs/method-history.md,
# "The search's order").
SIZE_BLEND_STRENGTH = 0.3


def teacher_strength(teacher_acc: float, num_classes: int) -> float:
    """0 for a teacher at chance (1 / classes), 1 for a perfect one; below chance counts as 0."""
    chance = 1.0 / max(int(num_classes), 2)
    return float(max(0.0, (teacher_acc - chance) / (1.0 - chance)))


# A teacher less than a quarter of the way from chance to perfect is "near chance": its soft labels carry little
# beyond the hard labels, and on meta-training tasks with such teachers no ranking we have (the predictor's,
# parameter count, FLOPs) was reliably above zero (scripts/fit_order.py, key "weak"). Labelling and the search
# warn about one.
NEAR_CHANCE_STRENGTH = 0.25


def near_chance(teacher_acc: float, num_classes: int) -> bool:
    return teacher_strength(teacher_acc, num_classes) < NEAR_CHANCE_STRENGTH


def size_blend(scores, params, teacher_acc: float, num_classes: int,
               strength: float = SIZE_BLEND_STRENGTH) -> np.ndarray:
    """An order key (higher first) over one pool of students: the predictor's rank alone under a weak teacher; the
    mean of the predictor's rank and the parameter-count rank when the teacher is at least `strength` of the way
    from chance to perfect. On meta-training tasks the predictor ranks weak-teacher tasks well and well-taught ones
    worse than model size does; the blend keeps the first and borrows size for the second."""
    scores = np.asarray(scores, float)
    params = np.asarray(params, float)
    if scores.shape != params.shape:
        raise ValueError(f"size_blend: {scores.shape[0]} scores but {params.shape[0]} parameter counts")
    r = _rank(scores)
    if teacher_strength(teacher_acc, num_classes) < strength:
        return r
    return (r + _rank(params)) / 2.0


# The order in which a search distils its candidates: "posterior" (the default: each next candidate from the
# posterior given every measured student, dass_ray.core.posterior; it needs the candidates' FLOPs and encodings, so
# the search computes it, not `order_key`), "dass_size" (size_blend, fixed in advance) or "dass" (the predictor's
# scores alone).
ORDERS = ("posterior", "dass_size", "dass")
DEFAULT_ORDER = "posterior"


def order_key(order: str, scores, params, teacher_acc: float, num_classes: int) -> np.ndarray:
    """The key a search sorts its candidates by (higher first) under `order` (ORDERS; "" means DEFAULT_ORDER)."""
    order = order or DEFAULT_ORDER
    if order == "dass":
        return np.asarray(scores, float)
    if order == "dass_size":
        return size_blend(scores, params, teacher_acc, num_classes)
    if order == "posterior":
        raise ValueError("order 'posterior' is computed by dass_ray.core.posterior.PoolModel, not by order_key")
    raise ValueError(f"unknown order {order!r}; known: {', '.join(ORDERS)}")
