"""The Tune searcher driven by the predictor's scores: it proposes candidates in predicted order."""
from __future__ import annotations

import pickle

import numpy as np
from ray.tune.search import Searcher



class _StateFile(Searcher):
    """`save`/`restore` (Tune's searcher checkpoint) as a pickle of `get_state()`."""

    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


class DaSSSearcher(_StateFile):
    """Proposes candidates in predicted order, exactly `budget` of them.

    `ranked`: candidate indices, best first. Repeated `suggest` for the same trial id returns the same config and
    repeated `on_trial_complete` is ignored. With `rerank(measured) -> new order of the remaining indices`, the
    order of what is left is recomputed after each finished trial. `save`/`restore` persist the state.
    """

    def __init__(self, arch_jsons: list[str], predicted: np.ndarray, ranked: list[int], budget: int,
                 metric: str = "best_acc", mode: str = "max", rerank=None, done: dict | None = None):
        super().__init__(metric=metric, mode=mode)
        self.arch_jsons, self.predicted = list(arch_jsons), np.asarray(predicted, dtype=float)
        self.remaining = [int(i) for i in ranked]
        self.budget = int(budget)
        self.rerank = rerank
        self.assigned: dict[str, int] = {}
        self.completed: dict[str, tuple[int, float | None]] = {}
        self.prior = dict(done or {})  # candidate index -> measured accuracy (finished before a resume)
        self.remaining = [i for i in self.remaining if i not in self.prior]

    def suggest(self, trial_id: str):
        if trial_id in self.assigned:
            return self._config(self.assigned[trial_id])
        if len(self.assigned) + len(self.prior) >= self.budget or not self.remaining:
            return Searcher.FINISHED
        idx = self.remaining.pop(0)
        self.assigned[trial_id] = idx
        return self._config(idx)

    def _config(self, idx: int) -> dict:
        return {"index": idx, "arch_json": self.arch_jsons[idx], "predicted": float(self.predicted[idx])}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.completed or trial_id not in self.assigned:
            return
        acc = None if (error or not result or result.get(self.metric) is None) else float(result[self.metric])
        self.completed[trial_id] = (self.assigned[trial_id], acc)
        if self.rerank is not None and self.remaining:
            measured = dict(self.prior)
            measured.update({i: a for i, a in self.completed.values() if a is not None})
            self.remaining = list(self.rerank(measured, list(self.remaining)))

    def measured(self) -> dict[int, float | None]:
        out = dict(self.prior)
        out.update({i: a for i, a in self.completed.values()})
        return out

    def get_state(self) -> dict:
        return {"remaining": self.remaining, "assigned": self.assigned, "completed": self.completed,
                "prior": self.prior, "budget": self.budget}

    def set_state(self, state: dict) -> None:
        self.remaining, self.assigned = list(state["remaining"]), dict(state["assigned"])
        self.completed, self.prior, self.budget = dict(state["completed"]), dict(state["prior"]), state["budget"]



# --stop-probability asks for the chance of beating the best measured student by more than this (half a point)
STOP_MARGIN = 0.005


class PosteriorSearcher(_StateFile):
    """Proposes each next candidate from the posterior over the pool's post-KD accuracies given every finished
    trial (`dass_ray.core.posterior.PoolModel`: the predictor's scores as the prior, measured students as
    evidence), at most `budget` of them.

    Trials in flight are never proposed twice (they are excluded; with the "mean" acquisition this is the kriging
    believer). A failed trial is excluded and not used as evidence. `done` (candidate index -> measured accuracy,
    None for a failed one) are the trials finished before a resume: the posterior is rebuilt from them, so a
    resumed search makes the same decisions. `stop_probability` > 0: once the posterior probability that any
    untried allowed candidate beats the best measured one by more than `margin` falls below it, no new trial is
    proposed (`stop_reason` says why). `allowed`: a boolean mask (the budget); nothing outside it is proposed.
    `ranked`: follow this fixed order instead (the posterior then only supplies the intervals and the stop rule).
    """

    def __init__(self, arch_jsons: list[str], model, budget: int, *, ranked: list[int] | None = None,
                 acquisition: str = "mean", stop_probability: float = 0.0, margin: float = STOP_MARGIN, seed: int = 0,
                 done: dict | None = None, allowed=None, metric: str = "best_acc", mode: str = "max"):
        super().__init__(metric=metric, mode=mode)
        self.arch_jsons = list(arch_jsons)
        self.ranked = None if ranked is None else [int(i) for i in ranked]
        self.model = model
        self.budget = int(budget)
        self.acquisition, self.stop_probability, self.margin = acquisition, float(stop_probability), float(margin)
        self.allowed = None if allowed is None else np.asarray(allowed, bool)
        self.rng = np.random.default_rng(seed)
        self.prior = dict(done or {})
        for i, a in self.prior.items():
            if a is not None:
                self.model.observe(int(i), float(a))
        self.assigned: dict[str, int] = {}
        self.completed: dict[str, tuple[int, float | None]] = {}
        self.stop_reason = ""
        self.last_probability: float | None = None
        self._check_stop()

    def _tried(self) -> list[int]:
        return [int(i) for i in self.prior] + list(self.assigned.values())

    def suggest(self, trial_id: str):
        if trial_id in self.assigned:
            return self._config(self.assigned[trial_id])
        if len(self.assigned) + len(self.prior) >= self.budget or self.stop_reason:
            return Searcher.FINISHED
        if self.ranked is not None:
            tried = set(self._tried())
            ok = (lambda i: True) if self.allowed is None else (lambda i: bool(self.allowed[i]))
            idx = next((i for i in self.ranked if i not in tried and ok(i)), None)
        else:
            idx = self.model.next_candidate(self.acquisition, self.rng, exclude=self._tried(), allowed=self.allowed)
        if idx is None:
            return Searcher.FINISHED
        self.assigned[trial_id] = idx
        return self._config(idx)

    def _config(self, idx: int) -> dict:
        mean, lo, hi = self.model.predicted()
        return {"index": int(idx), "arch_json": self.arch_jsons[idx], "predicted": float(mean[idx]),
                "predicted_lo": float(lo[idx]), "predicted_hi": float(hi[idx])}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self.completed or trial_id not in self.assigned:
            return
        acc = None if (error or not result or result.get(self.metric) is None) else float(result[self.metric])
        idx = self.assigned[trial_id]
        self.completed[trial_id] = (idx, acc)
        if acc is not None:
            self.model.observe(idx, acc)
        self._check_stop()

    def _check_stop(self) -> None:
        if self.stop_probability <= 0 or not self.model.obs or self.stop_reason:
            return
        p = self.model.prob_improvement(self.margin, allowed=self.allowed, exclude=self._tried())
        self.last_probability = p
        if p < self.stop_probability:
            self.stop_reason = stop_message(p, self.stop_probability, self.margin, len(self.model.obs))

    def measured(self) -> dict[int, float | None]:
        out = dict(self.prior)
        out.update({i: a for i, a in self.completed.values()})
        return out

    def get_state(self) -> dict:
        return {"assigned": self.assigned, "completed": self.completed, "prior": self.prior, "budget": self.budget,
                "stop_reason": self.stop_reason, "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.assigned, self.completed = dict(state["assigned"]), dict(state["completed"])
        self.prior, self.budget, self.stop_reason = dict(state["prior"]), state["budget"], state["stop_reason"]
        self.rng.bit_generator.state = state["rng"]
        self.model.obs.clear()
        self.model._cache = None
        for i, a in list(self.prior.items()) + list(self.completed.values()):
            if a is not None:
                self.model.observe(int(i), float(a))



def stop_message(p: float, threshold: float, margin: float, measured: int) -> str:
    return (f"stopped early: after {measured} measured students the probability that an untried candidate beats "
            f"the best one by more than {100 * margin:g} points is {p:.3f} < --stop-probability {threshold:g}")
