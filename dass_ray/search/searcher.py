"""The Tune searcher driven by the predictor's scores: it proposes candidates in predicted order."""
from __future__ import annotations

import pickle

import numpy as np
from ray.tune.search import Searcher



class DaSSSearcher(Searcher):
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

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
