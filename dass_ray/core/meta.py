"""Meta-learning for the predictor (docs/method.md, section 5): one-step MAML, second order, with a learned step
size per parameter (Meta-SGD), and the teacher as the support set ("teacher-guided adaptation").

`inner_update` is a pure function (torchmeta's `gradient_update_parameters` design): it returns a new
parameter dict `theta - alpha * grad` and never mutates the model. With `first_order=True` the gradient is
treated as a constant (no second-order term), but the step sizes still receive gradients.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from dass_ray.core.predictor import Predictor, PredictorBatch, PredictorConfig
from dass_ray.core.space import SpaceConfig


def inner_update(
    loss: torch.Tensor,
    params: dict[str, torch.Tensor],
    step_sizes: dict[str, torch.Tensor],
    first_order: bool = False,
) -> dict[str, torch.Tensor]:
    """One gradient step: returns {name: theta - alpha[name] * d loss / d theta}.

    Args:
        loss: scalar computed from `params`.
        params: name -> tensor (requires grad).
        step_sizes: name -> tensor of the same shape (or broadcastable), the per-parameter learning rates.
        first_order: drop the second-order term (no graph through the gradient).
    """
    names = list(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=not first_order, allow_unused=True)
    out = {}
    for n, g in zip(names, grads):
        if g is None:
            out[n] = params[n]
            continue
        if first_order:
            g = g.detach()
        out[n] = params[n] - step_sizes[n] * g
    return out


def teacher_support(teacher_map: torch.Tensor, teacher_code: torch.Tensor, teacher_acc: float) -> PredictorBatch:
    """The support set of teacher-guided adaptation: the teacher labelled with its own accuracy."""
    return PredictorBatch(
        student_maps=teacher_map,
        teacher_map=teacher_map,
        arch=teacher_code.reshape(1, -1),
        target=torch.tensor([float(teacher_acc)], dtype=torch.float32),
    )


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


def clipped_mse(pred: torch.Tensor, target: torch.Tensor, clip: float) -> torch.Tensor:
    """The MSE with each residual's gradient clipped to +-2*clip (twice the Huber loss with delta `clip`): equal to
    `mse` while |pred - target| <= clip."""
    return 2.0 * torch.nn.functional.huber_loss(pred, target, delta=clip, reduction="mean")


def pairwise_rank_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """Mean logistic loss over the ordered pairs (i, j) with target_i > target_j: softplus(-(pred_i - pred_j) / T),
    times T so that it is in accuracy units like the MSE (T: accuracy difference, e.g. 0.02 = 2 points, at which a
    pair counts as clearly ordered). 0 when no two targets differ."""
    d_t = target.reshape(-1, 1) - target.reshape(1, -1)
    d_p = pred.reshape(-1, 1) - pred.reshape(1, -1)
    pairs = d_t > 0
    if not bool(pairs.any()):
        return pred.sum() * 0.0
    return temperature * torch.nn.functional.softplus(-d_p[pairs] / temperature).mean()


# How a lone teacher adapts the predictor (`MetaSGD.adaptation`; chosen on meta-validation tasks, stored in the
# checkpoint's meta as "adaptation"):
#   gate: the meta-learned step, skipped for a teacher outside `teacher_acc_range` (output bias moved only);
#   step: the meta-learned step always;
#   clip: the step with the teacher's residual clipped to +-`inner_clip` (a trust region);
#   none: never a step: the output bias alone moves so the teacher is predicted at its accuracy (ranking unadapted).
ADAPTATIONS = ("gate", "step", "clip", "none")


class MetaSGD(nn.Module):
    """A predictor plus learned per-parameter inner step sizes (initialised at `inner_lr`).

    `adaptation` (see ADAPTATIONS) says how a lone teacher adapts it. With "gate" (the default, and what older
    checkpoints get), `teacher_acc_range` (set from the checkpoint: the accuracies of the meta-training teachers)
    gates the teacher-guided step: a teacher outside that range is a support example unlike any the step was
    meta-learned on, and one step on it can invert the ranking (Omniglot's 0.16 teacher did), so such a teacher is
    scored without adaptation. Supports of more than the teacher (re-adaptation on measured students) are never
    gated or clipped."""

    def __init__(self, predictor: Predictor, inner_lr: float = 0.005, inner_steps: int = 1):
        super().__init__()
        self.predictor = predictor
        self.inner_steps = inner_steps
        self.adaptation = "gate"
        self.teacher_acc_range: tuple[float, float] | None = None
        # The trust region of adaptation "clip": the teacher's residual (prediction - accuracy) enters the step
        # clipped to +-inner_clip (a Huber inner loss), so a teacher far from every meta-training one moves the
        # parameters no further than one at that distance.
        self.inner_clip: float = 0.1
        self.step_sizes = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full_like(p, inner_lr)) for n, p in predictor.named_parameters()}
        )

    def steps(self) -> dict[str, torch.Tensor]:
        return {n: self.step_sizes[_key(n)] for n, _ in self.predictor.named_parameters()}

    def gated(self, support: PredictorBatch) -> bool:
        """True when `support` is a lone teacher that gets no step: always with adaptation "none", and with "gate"
        when its accuracy lies outside `teacher_acc_range`."""
        if len(support) != 1 or support.target is None:
            return False
        if self.adaptation == "none":
            return True
        if self.adaptation != "gate" or self.teacher_acc_range is None:
            return False
        lo, hi = self.teacher_acc_range
        return not lo <= float(support.target[0]) <= hi

    def adapt(
        self,
        support: PredictorBatch,
        params: dict[str, torch.Tensor] | None = None,
        first_order: bool = False,
        loss_fn: Callable = mse,
        gate: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Adapted parameters after `inner_steps` steps on `support` (the teacher alone by default). When `gate`
        and the teacher gets no step (`gated`): the unadapted parameters with only the output bias moved so
        that the teacher's prediction equals its accuracy -- every score shifts by one constant, so the ranking is
        exactly the unadapted predictor's, and the values stay on the accuracy scale."""
        params = params if params is not None else self.predictor.named_params()
        if gate and self.gated(support):
            with torch.no_grad():
                shift = support.target[0] - self.predictor(support, params)[0]
            out = dict(params)
            out[self.predictor.output_bias_name] = params[self.predictor.output_bias_name] + shift
            return out
        steps = self.steps()
        if self.adaptation == "clip" and gate and len(support) == 1 and loss_fn is mse:
            loss_fn = partial(clipped_mse, clip=self.inner_clip)
        for _ in range(self.inner_steps):
            loss = loss_fn(self.predictor(support, params), support.target)
            params = inner_update(loss, params, steps, first_order=first_order)
        return params

    def task_loss(
        self, support: PredictorBatch, query: PredictorBatch, first_order: bool = False, adapt: bool = True,
        rank_weight: float = 0.0, rank_temperature: float = 0.02, shift: bool = False, scale: float = 1.0,
    ) -> torch.Tensor:
        """Query MSE after adapting on the support set (the meta-objective of one task), plus `rank_weight` times
        a pairwise ranking loss (`pairwise_rank_loss`): the MSE keeps the values on the accuracy scale, the
        ranking term spends the predictor's capacity on the order within the task, which is what a search uses.

        `shift`: train the adaptation that adaptation "none" uses -- no step, the scores shifted so that the
        teacher's equals its accuracy -- with the gradient through the teacher's prediction, i.e. the predictor
        learns each student's accuracy relative to its teacher's. `scale`: the MSE is divided by it (a per-task
        normaliser, e.g. the spread of the task's accuracies, so that a task whose students lie within a few points
        of each other weighs as much as one spread over tens of points)."""
        if shift and adapt:
            pred = self.predictor(query) - self.predictor(support)[0] + support.target[0]
        else:
            # meta-training learns the plain step: `adaptation` is how a trained predictor uses it
            params = self.adapt(support, first_order=first_order, gate=False) if adapt else None
            pred = self.predictor(query, params)
        loss = mse(pred, query.target) / scale
        if rank_weight:
            loss = loss + rank_weight * pairwise_rank_loss(pred, query.target, rank_temperature)
        return loss

    @torch.no_grad()
    def predict(self, support: PredictorBatch | None, query: PredictorBatch, batch_size: int = 4096,
                gate: bool = True) -> torch.Tensor:
        """Scores [N] for `query` after adapting on `support` (no adaptation when it is None)."""
        if support is None:
            params = None
        else:
            with torch.enable_grad():
                params = {k: v.detach() for k, v in self.adapt(support, first_order=True, gate=gate).items()}
        outs = [self.predictor(query.subset(slice(i, i + batch_size)), params)
                for i in range(0, len(query), batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0)


def _key(name: str) -> str:
    return name.replace(".", "__")


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    ra, rb = _rank(np.asarray(a, float)), _rank(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall tau-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    da = np.sign(a[:, None] - a[None, :])
    db = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    da, db = da[iu], db[iu]
    denom = np.sqrt((da != 0).sum() * (db != 0).sum())
    return float((da * db).sum() / denom) if denom > 0 else float("nan")


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), float)
    ranks[order] = np.arange(len(x), dtype=float)
    # average the ranks of ties
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


# ----------------------------------------------------------------------------------------------------------------
# Predictor checkpoints (the one loader: search, evaluation and meta-training all use it)
# ----------------------------------------------------------------------------------------------------------------

FORMAT = "dass_ray.predictor/1"


def make_model(space: SpaceConfig, use_functional: bool = True, inner_lr: float = 0.005, seed: int = 0) -> MetaSGD:
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
        torch.manual_seed(seed)
        cfg = PredictorConfig(space.feature_channels, space.encoding_size, use_functional=use_functional)
        return MetaSGD(Predictor(cfg), inner_lr=inner_lr)


def save_predictor(path: str | Path, model: MetaSGD, space: SpaceConfig, meta: dict | None = None) -> None:
    from dass_ray.core.kd import atomic_torch_save  # kd loads pyarrow: not in the light actor processes

    blob = {"format": FORMAT, "predictor_config": model.predictor.cfg.to_dict(), "space": space.to_dict(),
            "encoding_layout": space.encoding_layout(), "inner_steps": model.inner_steps,
            "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "meta": dict(meta or {})}
    atomic_torch_save(blob, path)


def load_predictor(path: str | Path, space: SpaceConfig | None = None) -> tuple[MetaSGD, dict]:
    """(model, blob). With `space`, checks that the checkpoint's encoding layout and feature shape match it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: predictor checkpoint not found")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{p}: not a readable predictor checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{p}: not a dass_ray predictor checkpoint (format {FORMAT!r} expected)")
    cfg = PredictorConfig.from_dict(blob["predictor_config"])
    if space is not None:
        want = json.loads(json.dumps(space.encoding_layout()))
        if json.loads(json.dumps(blob["encoding_layout"])) != want or cfg.feature_channels != space.feature_channels:
            raise ValueError(f"{p}: the predictor was trained for a different search space "
                             f"(encoding layout / feature channels differ from space {space.name!r})")
    model = MetaSGD(Predictor(cfg), inner_steps=int(blob.get("inner_steps", 1)))
    model.load_state_dict(blob["state_dict"])
    meta = blob.get("meta") or {}
    model.adaptation = meta.get("adaptation", "gate")
    if model.adaptation not in ADAPTATIONS:
        raise ValueError(f"{p}: meta.adaptation {model.adaptation!r} is not one of {', '.join(ADAPTATIONS)}")
    rng = meta.get("train_teacher_acc_range")
    if rng is not None:
        model.teacher_acc_range = (float(rng[0]), float(rng[1]))
    if meta.get("inner_clip") is not None:
        model.inner_clip = float(meta["inner_clip"])
    return model.eval(), blob
