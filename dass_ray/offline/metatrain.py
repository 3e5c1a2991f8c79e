"""Meta-training of the DaSS predictor (plain PyTorch; the Ray Train wrapper is `metatrain_ray`).

One episode = for every meta-training task: adapt on the teacher (one inner step, second order, learned
per-parameter step sizes), then the MSE of a query set of that task's students; the episode loss is the mean over
tasks. Query sets are drawn from an RNG seeded by (seed, episode, task index), so any split of the tasks over
workers sees exactly the same queries. Model selection: mean Spearman on meta-validation tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dass_ray.core.meta import MetaSGD, kendall, make_model, spearman, teacher_support
from dass_ray.offline.metadataset import MetaTask
from dass_ray.core.predictor import PredictorBatch
from dass_ray.core.ranking import SIZE_BLEND_STRENGTH, teacher_strength
from dass_ray.core.space import SpaceConfig

def query_indices(n: int, size: int, seed: int, episode: int, task_index: int) -> np.ndarray:
    rng = np.random.default_rng([seed, episode, task_index])
    return rng.permutation(n)[:min(size, n)]


def task_batches(t: MetaTask, idx=None) -> tuple[PredictorBatch, PredictorBatch]:
    support = teacher_support(t.teacher_map, t.teacher_code, t.teacher_acc)
    sl = slice(None) if idx is None else torch.as_tensor(idx)
    query = PredictorBatch(t.maps[sl], t.teacher_map, t.codes[sl], t.acc[sl])
    return support, query


TRAIN_ADAPTATIONS = ("step", "shift")  # what meta-training adapts with (MetaSGD.task_loss)
TASK_WEIGHTS = ("equal", "spread")  # how the tasks' query losses are weighed in an episode


def task_scale(t: MetaTask, task_weight: str, floor: float = 0.01) -> float:
    """The divisor of task `t`'s query MSE: 1 ("equal"), or ("spread") the variance of its students' accuracies
    plus `floor`^2 (a task whose students all measured the same accuracy weighs as one spread over `floor`)."""
    if task_weight == "equal":
        return 1.0
    if task_weight != "spread":
        raise ValueError(f"task_weight must be one of {TASK_WEIGHTS}, got {task_weight!r}")
    return float(t.acc.var(unbiased=False)) + floor ** 2


def episode_loss_sum(model: MetaSGD, tasks: list[MetaTask], task_ids: list[int], episode: int, seed: int,
                     query_size: int, adapt: bool = True, first_order: bool = False, rank_weight: float = 0.0,
                     rank_temperature: float = 0.02, train_adaptation: str = "step",
                     task_weight: str = "equal") -> torch.Tensor:
    """Sum of query losses over `task_ids` (indices into `tasks`); divide by the total task count for the mean."""
    if train_adaptation not in TRAIN_ADAPTATIONS:
        raise ValueError(f"train_adaptation must be one of {TRAIN_ADAPTATIONS}, got {train_adaptation!r}")
    total = torch.zeros(())
    for i in task_ids:
        t = tasks[i]
        s, q = task_batches(t, query_indices(len(t.acc), query_size, seed, episode, i))
        total = total + model.task_loss(s, q, first_order=first_order, adapt=adapt, rank_weight=rank_weight,
                                        rank_temperature=rank_temperature, shift=train_adaptation == "shift",
                                        scale=task_scale(t, task_weight))
    return total


def episode_loss(model: MetaSGD, tasks: list[MetaTask], task_ids: list[int], episode: int,
                 cfg: "MetaTrainConfig") -> torch.Tensor:
    """`episode_loss_sum` with the configuration's objective."""
    return episode_loss_sum(model, tasks, task_ids, episode, cfg.seed, cfg.query_size, cfg.adapt, cfg.first_order,
                            cfg.rank_weight, cfg.rank_temperature, cfg.train_adaptation, cfg.task_weight)


@torch.no_grad()
def predict_task(model: MetaSGD, t: MetaTask, adapt: bool = True, gate: bool = True) -> np.ndarray:
    s, q = task_batches(t)
    return model.predict(s if adapt else None, q, gate=gate).numpy()


def evaluate(model: MetaSGD, tasks: list[MetaTask], adapt: bool = True) -> dict:
    per = {}
    for t in tasks:
        p = predict_task(model, t, adapt)
        y = t.acc.numpy()
        per[t.task_id] = {"spearman": spearman(p, y), "kendall": kendall(p, y),
                          "mse": float(np.mean((p - y) ** 2))}
    # a task whose students all measured the same accuracy (e.g. a teacher at chance: every student at chance too)
    # has no ranking to judge: its Spearman is nan and it is left out of the mean, which counts the tasks judged
    judged = [v["spearman"] for v in per.values() if np.isfinite(v["spearman"])]
    mean = float(np.mean(judged)) if judged else float("nan")
    return {"tasks": per, "mean_spearman": mean, "tasks_judged": len(judged)}


@dataclass
class MetaTrainConfig:
    episodes: int = 300
    lr: float = 5e-4
    inner_lr: float = 0.005
    query_size: int = 50
    eval_every: int = 10
    seed: int = 0
    use_functional: bool = True
    adapt: bool = True  # False: no inner step (ablation / arch-only baseline trained plainly)
    first_order: bool = False
    weight_decay: float = 0.0  # decoupled (AdamW) on the predictor's weights; never on the learned step sizes
    rank_weight: float = 0.0  # weight of the pairwise ranking term of the query loss (core.meta.pairwise_rank_loss)
    rank_temperature: float = 0.02  # its temperature, in accuracy units
    # how the trained predictor adapts to a teacher (core.meta.ADAPTATIONS): the model is selected on the
    # validation tasks as the search will use it; training learns the plain step (train_adaptation "step")
    adaptation: str = "step"
    inner_clip: float = 0.1
    # the meta-objective: "step" learns the teacher-guided step; "shift" learns accuracies relative to the
    # teacher's (what adaptation "none" uses; the step sizes then stay untrained)
    train_adaptation: str = "step"
    task_weight: str = "equal"  # "spread": each task's MSE divided by the variance of its accuracies (task_scale)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


TEACHER_SETS = ("all", "weak", "strong")


def by_teacher(tasks: list, which: str = "all") -> list:
    """The tasks whose teacher is weak (strength below the search's size-blend threshold,
    `core.ranking.SIZE_BLEND_STRENGTH`: where the search orders by the predictor alone), strong, or all."""
    if which not in TEACHER_SETS:
        raise ValueError(f"teachers must be one of {TEACHER_SETS}, got {which!r}")
    if which == "all":
        return list(tasks)
    return [t for t in tasks
            if (teacher_strength(t.teacher_acc, t.num_classes) < SIZE_BLEND_STRENGTH) == (which == "weak")]


def new_model(space: SpaceConfig, cfg: MetaTrainConfig, train: list[MetaTask]) -> MetaSGD:
    """A freshly initialised predictor that adapts as `cfg` says (the gate's range: the training teachers')."""
    model = make_model(space, cfg.use_functional, cfg.inner_lr, cfg.seed)
    model.adaptation, model.inner_clip = cfg.adaptation, cfg.inner_clip
    if train:
        model.teacher_acc_range = (min(t.teacher_acc for t in train), max(t.teacher_acc for t in train))
    return model


def make_optimizer(model: MetaSGD, cfg: MetaTrainConfig) -> torch.optim.Optimizer:
    """Adam on weights and step sizes (docs/method.md, section 5); with `weight_decay` > 0, AdamW-style decay on
    the weights."""
    if not cfg.weight_decay:
        return torch.optim.Adam(model.parameters(), lr=cfg.lr)
    return torch.optim.AdamW([{"params": list(model.predictor.parameters()), "weight_decay": cfg.weight_decay},
                              {"params": list(model.step_sizes.parameters()), "weight_decay": 0.0}], lr=cfg.lr)


def train_local(space: SpaceConfig, train: list[MetaTask], val: list[MetaTask], cfg: MetaTrainConfig,
                log=None) -> tuple[MetaSGD, dict]:
    """Single-process meta-training (reference for the Ray Train path; used for baselines). Returns the model at
    its best validation episode and {best_val_spearman, best_episode, last: the final episode's state}."""
    model = new_model(space, cfg, train)
    opt = make_optimizer(model, cfg)
    best = (-float("inf"), None, -1)
    ids = list(range(len(train)))
    for ep in range(cfg.episodes):
        loss = episode_loss(model, train, ids, ep, cfg) / len(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (ep + 1) % cfg.eval_every == 0 or ep + 1 == cfg.episodes:
            ev = evaluate(model, val, cfg.adapt)["mean_spearman"] if val else -float(loss)
            if ev > best[0]:
                best = (ev, {k: v.detach().clone() for k, v in model.state_dict().items()}, ep + 1)
            if log:
                log(f"episode {ep + 1}: loss {float(loss):.5f} val spearman {ev:.3f}")
    last = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best[1] is not None:
        model.load_state_dict(best[1])
    return model, {"best_val_spearman": best[0], "best_episode": best[2], "last": last}
