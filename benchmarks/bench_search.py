#!/usr/bin/env python
"""Search efficiency on pools of students with known KD labels, under a FLOPs budget: how many KD trials each
strategy needs before it has measured a student within 0.5 accuracy points of the best student the budget allows,
and how far below that best its best measured student is after 1, 3 and 5 trials (regret, accuracy points).

Budgets: `none` (the whole pool), `p50` and `p25` (students whose FLOPs are at or below the pool's 50th / 25th
percentile, `np.percentile`). Under a budget the pool *is* the in-budget students, as in a real search with
`--max-flops` (its candidates are sampled under the budget, then ranked): orders, features and the posterior are
computed on that pool, and the task's best is its best in-budget student.

Strategies (a "trial" looks up the pool's recorded KD accuracy):
  default     exactly what scripts/search.py does with default options: its `SearchConfig().order`, or when that
              is unset the contract's DEFAULT_ORDER (`posterior`, `dass_size` or `dass`); see "default_is". The
              search is simulated one trial at a time (with several KD trials in flight the real search proposes
              the next-best candidates of the same posterior before their results are in).
  optuna_tpe  Optuna's TPESampler (multivariate, --tpe-startup random start-up trials, default 5);
  optuna_gp   Optuna's GPSampler (--gp-startup start-up trials, default 3; its acquisition's local search runs
              from 4 starting points instead of 10, after its 2048 quasi-random candidates, for speed: a proposal
              is mapped to a pool member anyway). Both over the per-stage (depth, width multiplier) of the students,
              normalised to [0, 1] over the in-budget pool, through Optuna's ask/tell (no Ray); each proposal is
              mapped to the nearest not-yet-measured in-budget pool member, and the sampler is told that member's
              own coordinates and accuracy. --seeds seeds each (default 5): per task the mean over seeds, and a
              `spread`: the standard deviation over seeds of the (reliable-task) mean.
  random      mean over 200 random permutations of the pool.
  params      largest parameter count first.
  dass        the shipped predictor's order (after its own teacher-guided adaptation).
  dass_size   `dass_ray.core.ranking.size_blend`: the predictor's rank blended with parameter count.
  posterior   `dass_ray.core.posterior.PoolModel` with the prior of --prior (default: the shipped one; without
              that file, one fit with `fit_prior` on the train pools): at every step the untried candidate of
              highest posterior mean (the search's acquisition, "posterior_acquisition") is measured and observed
              (`posterior_order`).

Reliability: a task's labels are reliable when its seed-to-seed ceiling
(`dass_ray.core.ranking.label_ceiling(seed_pairs, label_seeds)["ceiling"]`) is at least 0.5. Tasks without seed
pairs (a single KD seed, nothing to check) count as reliable. Every `mean` and `ci` is over the reliable tasks
only; `"excluded"` names the others with their ceiling (their per-task numbers are still reported). `ci`: 95%
bootstrap interval of the mean, resampling tasks (1000 draws, seed 0, the same draws for every strategy).

    python benchmarks/bench_search.py --metadataset artifacts/metadataset --roles val
    python benchmarks/bench_search.py --metadataset artifacts/weak_holdout --roles test

Labels: the mean of two KD seeds where every student of a task has both (--label). Progress goes to stderr. Last
stdout line: one JSON object {"budgets": {"none" | "p50" | "p25": {"trials": {strategy: {task: n, ..., "mean": m,
"ci": [lo, hi]}}, "regret_at": {"1" | "3" | "5": {strategy: {task: r, ..., "mean": m, "ci": [lo, hi]}}}}},
"excluded": {task: ceiling}, "default_is": ..., "pool_sizes": {task: n}, "tolerance_pts": 0.5, ...} with
"trials_to_within_0_5pt" = budgets.none.trials (the earlier output).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dass_ray.core.posterior import PoolData, PoolModel, Prior, fit_prior
from dass_ray.core.ranking import DEFAULT_ORDER, label_ceiling, size_blend, trials_needed

BUDGETS = ("none", "p50", "p25")
BUDGET_PERCENTILE = {"none": None, "p50": 50.0, "p25": 25.0}
STRATEGIES = ("default", "optuna_tpe", "optuna_gp", "random", "params", "dass", "dass_size", "posterior")
SEEDED = ("optuna_tpe", "optuna_gp")
REGRET_AT = (1, 3, 5)
TOL = 0.005  # half an accuracy point
MIN_RELIABLE_CEILING = 0.5
N_RANDOM = 200
N_BOOT = 1000
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRIOR = REPO / "dass_ray" / "assets" / "predictor" / "posterior_prior.json"


@dataclass
class BenchTask:
    """One task as the benchmark sees it: its pool (scores, sizes, labels), the (depth, width multiplier) features
    the generic optimisers search over, and its seed-to-seed ceiling (None: no seed pairs)."""

    pool: PoolData
    feats: np.ndarray
    ceiling: float | None = None

    @property
    def task_id(self) -> str:
        return self.pool.task_id

    @property
    def reliable(self) -> bool:
        return self.ceiling is None or bool(self.ceiling >= MIN_RELIABLE_CEILING)


# ----------------------------------------------------------------------------------------------------------------
# Budgets, metrics
# ----------------------------------------------------------------------------------------------------------------


def budget_mask(flops, budget: str) -> np.ndarray:
    """The students a budget allows: FLOPs at or below the pool's percentile (all for "none")."""
    flops = np.asarray(flops, float)
    q = BUDGET_PERCENTILE[budget]
    return np.ones(len(flops), bool) if q is None else flops <= np.percentile(flops, q)


def regret_at(order, acc: np.ndarray, k: int) -> float:
    """Accuracy points between the pool's best and the best of the first k measured (all of a smaller pool)."""
    return float(100 * (acc.max() - acc[list(order[:k])].max()))


def order_metrics(order, acc: np.ndarray) -> dict:
    return {"trials": float(trials_needed(list(order), acc, TOL)),
            "regret": {k: regret_at(order, acc, k) for k in REGRET_AT}}


def _complete(order: list[int], n: int) -> list[int]:
    seen = set(order)
    return list(order) + [i for i in range(n) if i not in seen]


def _done(order: list[int], acc: np.ndarray) -> bool:
    """Enough trials for every metric: the tolerance reached and at least min(5, pool) measured."""
    return len(order) >= min(max(REGRET_AT), len(acc)) and acc[order].max() >= acc.max() - TOL


# ----------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------


def arch_features(archs, stage_widths) -> np.ndarray:
    """Per student: the depth of each stage, then its mean width over the stage's nominal width."""
    return np.array([[len(st) for st in a.widths] + [np.mean(st) / w for st, w in zip(a.widths, stage_widths)]
                     for a in archs], dtype=float)


def normalise(feats: np.ndarray) -> np.ndarray:
    feats = np.asarray(feats, float)
    lo, hi = feats.min(0), feats.max(0)
    return (feats - lo) / np.where(hi > lo, hi - lo, 1)


def make_sampler(kind: str, seed: int, tpe_startup: int = 5, gp_startup: int = 3):
    import optuna

    if kind == "optuna_tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup, multivariate=True)
    if kind == "optuna_gp":
        s = optuna.samplers.GPSampler(seed=seed, n_startup_trials=gp_startup)
        if hasattr(s, "_n_local_search"):  # see the module docstring: 4 local searches instead of 10, for speed
            s._n_local_search = 4
        return s
    raise ValueError(f"unknown sampler {kind!r}")


def optuna_order(feats: np.ndarray, acc: np.ndarray, kind: str, seed: int, tpe_startup: int = 5,
                 gp_startup: int = 3) -> list[int]:
    """A pool order from an Optuna sampler over the pool's normalised features: each proposal becomes the nearest
    unmeasured member, whose coordinates and accuracy the sampler is told (the proposal itself is recorded as a
    failed trial, which neither sampler learns from). Stops once the metrics are known; the rest in index order."""
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    norm = normalise(feats)
    names = [f"f{j}" for j in range(norm.shape[1])]
    dists = {n: FloatDistribution(0.0, 1.0) for n in names}
    study = optuna.create_study(direction="maximize",
                                sampler=make_sampler(kind, seed, tpe_startup, gp_startup))
    order: list[int] = []
    free = np.ones(len(acc), bool)
    while free.any() and not _done(order, acc):
        trial = study.ask(dists)
        x = np.array([trial.params[n] for n in names])
        d = ((norm - x) ** 2).sum(1)
        d[~free] = np.inf
        i = int(np.argmin(d))
        study.tell(trial, state=TrialState.FAIL)
        study.add_trial(create_trial(params={n: float(v) for n, v in zip(names, norm[i])}, distributions=dists,
                                     value=float(acc[i])))
        order.append(i)
        free[i] = False
    return _complete(order, len(acc))


def posterior_order(prior: Prior, pool: PoolData, acquisition: str = "mean", seed: int = 0) -> list[int]:
    """A simulated sequential search with the posterior over `pool` (the candidates: in-budget already): at each step
    the untried candidate of highest posterior mean ("mean") or of a Thompson draw ("thompson", `PoolModel.choose`)
    is measured (its label looked up) and observed. Stops when the pool is exhausted, or once a student within the
    tolerance of the best is measured and at least 5 trials ran; the rest follow in the final posterior mean's
    order. Returns the order as indices into `pool`."""
    acc = np.asarray(pool.acc, float)
    n = len(acc)
    model = PoolModel(prior, pool.scores, pool.params, pool.flops, pool.teacher_acc, pool.num_classes, pool.codes)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    while len(order) < n and not _done(order, acc):
        i = model.next_candidate(acquisition, rng, exclude=order)  # what the search's PosteriorSearcher asks
        order.append(int(i))
        model.observe(int(i), float(acc[i]))
    m = np.asarray(model.mean(), float)
    seen = set(order)
    return order + [int(i) for i in np.argsort(-m, kind="mergesort") if int(i) not in seen]


def random_metrics(acc: np.ndarray, rng: np.random.Generator, n_perm: int = N_RANDOM) -> dict:
    ms = [order_metrics(rng.permutation(len(acc)), acc) for _ in range(n_perm)]
    return {"trials": float(np.mean([m["trials"] for m in ms])),
            "regret": {k: float(np.mean([m["regret"][k] for m in ms])) for k in REGRET_AT}}


def task_results(bt: BenchTask, budget: str, strategies, prior: Prior | None, seeds: int, seed: int,
                 default_is: str, tpe_startup: int = 5, gp_startup: int = 3, acquisition: str = "mean"
                 ) -> tuple[dict, int]:
    """{strategy: {"trials": x, "regret": {k: r}, ["per_seed": [...]]}} on one task under one budget, and the
    in-budget pool size."""
    mask = budget_mask(bt.pool.flops, budget)
    pool = bt.pool.subset(mask)
    feats = bt.feats[mask]
    acc = np.asarray(pool.acc, float)
    res: dict = {}
    for s in strategies:
        if s == "default":
            continue
        if s == "params":
            res[s] = order_metrics(np.argsort(-np.asarray(pool.params, float), kind="mergesort"), acc)
        elif s == "dass":
            res[s] = order_metrics(np.argsort(-np.asarray(pool.scores, float), kind="mergesort"), acc)
        elif s == "dass_size":
            key = size_blend(pool.scores, pool.params, pool.teacher_acc, pool.num_classes)
            res[s] = order_metrics(np.argsort(-key, kind="mergesort"), acc)
        elif s == "random":
            res[s] = random_metrics(acc, np.random.default_rng(seed))
        elif s == "posterior":
            if prior is None:
                raise ValueError("the posterior strategy needs a prior")
            res[s] = order_metrics(posterior_order(prior, pool, acquisition, seed), acc)
        elif s in SEEDED:
            per = [order_metrics(optuna_order(feats, acc, s, seed + j, tpe_startup, gp_startup), acc)
                   for j in range(seeds)]
            res[s] = {"trials": float(np.mean([m["trials"] for m in per])),
                      "regret": {k: float(np.mean([m["regret"][k] for m in per])) for k in REGRET_AT},
                      "per_seed": per}
        else:
            raise ValueError(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    if "default" in strategies:
        if default_is not in res:
            raise ValueError(f"'default' is {default_is!r}, which is not among the strategies run")
        res["default"] = res[default_is]
    return res, int(mask.sum())


# ----------------------------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------------------------


def boot_ci(values: np.ndarray, draws: np.ndarray) -> list[float] | None:
    """95% interval of the mean of `values` over the task resamples `draws` [B, n]."""
    if len(values) == 0:
        return None
    means = np.asarray(values, float)[draws].mean(1)
    return [float(x) for x in np.percentile(means, (2.5, 97.5))]


def _r(x: float) -> float:
    return float(round(float(x), 4))


def summarise(per_task: dict[str, dict], tasks: list[BenchTask], strategies, seeds: int) -> dict:
    """{"trials": {strategy: {task: n, "mean", "ci"[, "spread"]}}, "regret_at": {"1"|"3"|"5": {strategy: ...}}}
    from per_task[task_id][strategy] (task_results' output) over `tasks`, means over the reliable ones."""
    rel = [t.task_id for t in tasks if t.reliable]
    draws = np.random.default_rng(0).integers(0, len(rel), (N_BOOT, len(rel))) if rel else None

    def block(get, get_seed) -> dict:
        out = {}
        for s in strategies:
            d = {tid: _r(get(per_task[tid][s])) for tid in per_task}
            vals = np.array([get(per_task[tid][s]) for tid in rel], float)
            d["mean"] = _r(vals.mean()) if rel else None
            d["ci"] = [_r(x) for x in boot_ci(vals, draws)] if rel else None
            if rel and "per_seed" in per_task[rel[0]][s]:
                seed_means = [np.mean([get_seed(per_task[tid][s]["per_seed"][j]) for tid in rel])
                              for j in range(seeds)]
                d["spread"] = _r(np.std(seed_means, ddof=1)) if seeds > 1 else 0.0
            out[s] = d
        return out

    return {"trials": block(lambda r: r["trials"], lambda m: m["trials"]),
            "regret_at": {str(k): block(lambda r, k=k: r["regret"][k], lambda m, k=k: m["regret"][k])
                          for k in REGRET_AT}}


def run_benchmark(tasks: list[BenchTask], prior: Prior | None, strategies=STRATEGIES, seeds: int = 5,
                  seed: int = 0, default_is: str = DEFAULT_ORDER, budgets=BUDGETS, tpe_startup: int = 5,
                  gp_startup: int = 3, log=None, acquisition: str = "mean") -> dict:
    """The benchmark's JSON (less the run's metadata) on `tasks`."""
    out: dict = {"budgets": {}, "budget_pool_sizes": {}}
    for b in budgets:
        per_task, sizes = {}, {}
        for t in tasks:
            t0 = time.time()
            per_task[t.task_id], sizes[t.task_id] = task_results(t, b, strategies, prior, seeds, seed, default_is,
                                                                 tpe_startup, gp_startup, acquisition)
            if log:
                log(f"[{b}] {t.task_id} (pool {sizes[t.task_id]}, {time.time() - t0:.1f}s) trials: "
                    + ", ".join(f"{s} {per_task[t.task_id][s]['trials']:.2f}" for s in strategies))
        out["budgets"][b] = summarise(per_task, tasks, strategies, seeds)
        out["budget_pool_sizes"][b] = sizes
    out["excluded"] = {t.task_id: _r(t.ceiling) if np.isfinite(t.ceiling) else None
                       for t in tasks if not t.reliable}
    out["ceilings"] = {t.task_id: (_r(t.ceiling) if t.ceiling is not None and np.isfinite(t.ceiling) else None)
                       for t in tasks}
    out["pool_sizes"] = {t.task_id: len(t.pool.acc) for t in tasks}
    out["tolerance_pts"] = 100 * TOL
    if "none" in out["budgets"]:
        out["trials_to_within_0_5pt"] = out["budgets"]["none"]["trials"]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------


def pool_data(model, t) -> PoolData:
    from dass_ray.offline.metatrain import predict_task

    return PoolData(task_id=t.task_id, scores=np.asarray(predict_task(model, t), float),
                    params=np.asarray(t.params, float), flops=np.asarray(t.flops, float),
                    acc=t.acc.numpy().astype(float), teacher_acc=float(t.teacher_acc),
                    num_classes=int(t.num_classes), codes=t.codes.numpy().astype(float))


def task_ceiling(t) -> float | None:
    c = label_ceiling(t.seed_pairs, t.label_seeds)
    return None if c is None else float(c["ceiling"])


def load_prior(path: str | None, model, metadataset: str, prior_metadataset: str | None, label: str,
               log) -> tuple[Prior, str]:
    """The prior of `path` (default: the shipped one); without that file, one fit on the `train` pools of
    `prior_metadataset` (default: --metadataset, or artifacts/metadataset when that has no train tasks)."""
    from dass_ray.offline.metadataset import load_meta_tasks

    p = Path(path) if path else DEFAULT_PRIOR
    if p.exists():
        return Prior.from_json(p.read_text()), str(p)
    root = prior_metadataset or metadataset
    train = load_meta_tasks(root, ("train",), label=label)
    if not train and prior_metadataset is None:
        root = str(REPO / "artifacts" / "metadataset")
        train = load_meta_tasks(root, ("train",), label=label)
    if not train:
        raise ValueError(f"no prior file {p} and no train tasks in {root} to fit one on")
    log(f"note: no prior file {p}; fitting one on the {len(train)} train pools of {root} (fit_prior)")
    t0 = time.time()
    prior = fit_prior([pool_data(model, t) for t in train])
    log(f"note: prior fit in {time.time() - t0:.1f}s: {json.dumps(json.loads(prior.to_json()))}")
    return prior, f"fit_prior on the train pools of {root}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--metadataset", default="artifacts/metadataset")
    ap.add_argument("--predictor", default="dass_ray/assets/predictor/cpu.pt")
    ap.add_argument("--roles", default="test")
    ap.add_argument("--scale", default="cpu")
    ap.add_argument("--seed", type=int, default=0, help="first seed of the optimisers; the random orders' seed")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per Optuna sampler (at least 1)")
    ap.add_argument("--label", default="mean", choices=["mean", "first"])
    ap.add_argument("--prior", default=None, help=f"posterior prior JSON (default {DEFAULT_PRIOR})")
    ap.add_argument("--prior-metadataset", default=None,
                    help="where to fit a prior when the prior file does not exist (its train tasks)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--budgets", default=",".join(BUDGETS))
    ap.add_argument("--tasks", default="", help="comma-separated task ids to keep (default: all of --roles)")
    ap.add_argument("--tpe-startup", type=int, default=5)
    ap.add_argument("--gp-startup", type=int, default=3)
    ap.add_argument("--markdown", default=None, help="also write the tables as Markdown to this file")
    args = ap.parse_args(argv)
    t_start = time.time()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    strategies = tuple(s for s in args.strategies.split(",") if s)
    budgets = tuple(b for b in args.budgets.split(",") if b)
    bad = [s for s in strategies if s not in STRATEGIES] + [b for b in budgets if b not in BUDGETS]
    if bad or args.seeds < 1:
        log(f"error: unknown strategies/budgets {bad} (known: {STRATEGIES}, {BUDGETS}) or --seeds < 1")
        return 2

    import torch

    torch.set_num_threads(1)
    from dass_ray.core.config import get_scale
    from dass_ray.core.meta import load_predictor
    from dass_ray.core.space import get_space
    from dass_ray.offline.metadataset import load_meta_tasks
    from dass_ray.search import SearchConfig

    space = get_space(get_scale(args.scale).space)
    defaults = SearchConfig()
    from dass_ray.contract import DEFAULT_ORDER as search_default_order  # what the search makes of an unset order

    default_is = defaults.order or search_default_order
    acquisition = "mean"  # what the search's PosteriorSearcher asks the posterior for
    if getattr(defaults, "readapt", False):
        log("note: the search's default re-adapts the predictor after each trial; this benchmark does not model "
            f"that, 'default' is its order {default_is}")
    if "default" in strategies and default_is not in strategies:
        strategies = strategies + (default_is,)
    try:
        tasks = load_meta_tasks(args.metadataset, tuple(args.roles.split(",")), label=args.label)
        if args.tasks:
            keep = set(args.tasks.split(","))
            tasks = [t for t in tasks if t.task_id in keep]
        if not tasks:
            raise ValueError(f"{args.metadataset}: no tasks of roles {args.roles}"
                             + (f" among {args.tasks}" if args.tasks else ""))
        model, _ = load_predictor(args.predictor, space)
        prior, prior_src = (load_prior(args.prior, model, args.metadataset, args.prior_metadataset, args.label, log)
                            if "posterior" in strategies else (None, None))
    except ValueError as e:
        log(f"error: {e}")
        return 2
    if Path(defaults.predictor).resolve() != Path(args.predictor).resolve():
        log(f"note: 'default' uses --predictor {args.predictor}, not the search's default predictor "
            f"{defaults.predictor}")
    bench = [BenchTask(pool_data(model, t), arch_features(t.archs, space.stage_widths), task_ceiling(t))
             for t in tasks]
    for bt in bench:
        if not bt.reliable:
            log(f"note: {bt.task_id} left out of the means: seed-to-seed ceiling {bt.ceiling:.3f} < "
                f"{MIN_RELIABLE_CEILING}")
    out = run_benchmark(bench, prior, strategies, args.seeds, args.seed, default_is, budgets, args.tpe_startup,
                        args.gp_startup, log, acquisition)
    out.update({"default_is": default_is, "metadataset": args.metadataset, "roles": args.roles,
                "predictor": args.predictor, "prior": prior_src, "posterior_acquisition": acquisition,
                "seeds": args.seeds, "seed": args.seed,
                "label_seeds": {t.task_id: t.label_seeds for t in tasks},
                "optuna": {"tpe_startup": args.tpe_startup, "gp_startup": args.gp_startup, "gp_local_search": 4},
                "elapsed_s": round(time.time() - t_start, 1)})
    if args.markdown:
        Path(args.markdown).write_text(markdown_tables(out))
    print(json.dumps(out))
    return 0


def markdown_tables(out: dict) -> str:
    """Per budget: mean trials to within 0.5 points and regret after 1/3/5 trials, with 95% intervals over tasks."""
    lines = [f"Tasks: {out['metadataset']} roles {out['roles']}; excluded (unreliable labels): "
             + (", ".join(out.get("excluded") or []) or "none") + f"; `default` is `{out['default_is']}`.", ""]
    for b, d in out["budgets"].items():
        lines += [f"Budget `{b}`:", "", "| strategy | trials to within 0.5 pt [95% CI] | regret@1 | regret@3 | regret@5 |",
                  "|---|---|---|---|---|"]
        for strat, v in d["trials"].items():
            ci = v.get("ci")
            cell = f"{v['mean']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
            if v.get("spread") is not None:
                cell += f" (seed spread {v['spread']:.2f})"
            reg = [d["regret_at"][k][strat] for k in ("1", "3", "5")]
            lines.append(f"| {strat} | {cell} | " + " | ".join(
                f"{r['mean']:.2f}" + (f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r.get("ci") else "") for r in reg)
                + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
