"""The predictor as a prior, measured students as evidence: a Gaussian-process posterior over a pool's accuracies.

Plain numpy/torch (no Ray). A search scores a pool of candidates with the meta-learned predictor before any KD;
`PoolModel` turns those scores (and the candidates' sizes) into a prior over every candidate's post-KD accuracy and
updates it exactly with each measured student:

    y_i = phi_i . w + g(code_i) + e_i        (accuracy points relative to the teacher)
    w ~ N(mu, diag(s^2))                      a per-task blend of the predictor and size, learned across tasks
    g ~ GP(0, a^2 exp(-|c_i - c_j|^2 / 2 l^2)) a residual shared by students of similar architecture
    e_i ~ N(0, sigma^2)                       KD seed noise

`phi_i` (`pool_features`): an intercept, the predictor's prediction relative to the teacher, and the pool-standardised
predictor score, log parameter count and log FLOPs, the last two also scaled by the teacher's strength (how far it
is from chance). The hyperparameters `Prior` (mu, s, a, l, sigma) are fit by maximising the marginal likelihood of
the meta-training tasks' measured pools (`fit_prior`; Bayesian linear regression with a meta-learned prior, as in
ABLR, Perrone et al. 2018, plus a residual kernel as in few-shot BO with deep kernels). Before any trial the
posterior mean is that learned blend; every finished trial moves the weights of *this* task, so a task on which
size predicts better than the predictor (or the reverse) is recognised from its first few measured students.

Several trials in flight: `choose` draws a Thompson sample of the whole pool given the finished trials and takes
its best untried, not-pending candidate, so concurrent proposals differ and still follow the posterior.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("intercept", "pred_minus_teacher", "z_score", "z_log_params", "z_log_flops",
            "strength_z_log_params", "strength_z_log_flops")
ACQUISITIONS = ("mean", "thompson")
Z90 = 1.6448536269514722  # the two-sided 90% interval of a normal: mean +- Z90 * sd


# The prior shipped with the predictor (scripts/fit_posterior.py fits it on the meta-training tasks' pools).
DEFAULT_PRIOR = Path(__file__).resolve().parents[1] / "assets" / "predictor" / "posterior_prior.json"


def load_prior(path: str | Path | None = None) -> Prior:
    p = Path(path) if path else DEFAULT_PRIOR
    try:
        return Prior.from_json(p.read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a posterior prior ({type(e).__name__}: {e}); scripts/fit_posterior.py writes "
                         "one") from None


def _z(x: np.ndarray) -> np.ndarray:
    sd = x.std()
    return (x - x.mean()) / sd if sd > 1e-12 else np.zeros_like(x)


def teacher_strength(teacher_acc: float, num_classes: int) -> float:
    chance = 1.0 / max(int(num_classes), 2)
    return float(max(0.0, (teacher_acc - chance) / (1.0 - chance)))


def pool_features(scores, params, flops, teacher_acc: float, num_classes: int) -> np.ndarray:
    """[N, len(FEATURES)] features of one pool (the candidates a search may distil), standardised over the pool."""
    scores, params, flops = (np.asarray(v, float) for v in (scores, params, flops))
    if not (scores.shape == params.shape == flops.shape) or scores.ndim != 1:
        raise ValueError(f"pool_features: scores {scores.shape}, params {params.shape}, flops {flops.shape} "
                         "must be equal 1-d shapes")
    st = teacher_strength(teacher_acc, num_classes)
    zp, zf = _z(np.log(np.maximum(params, 1))), _z(np.log(np.maximum(flops, 1)))
    return np.stack([np.ones_like(scores), 100 * (scores - teacher_acc), _z(scores), zp, zf, st * zp, st * zf], 1)


def code_features(codes) -> np.ndarray:
    """Architecture encodings scaled to unit mean square distance within the pool (the residual kernel's input)."""
    c = np.asarray(codes, float)
    c = c - c.mean(0)
    scale = math.sqrt(max(float((c ** 2).sum(1).mean()) * 2, 1e-12))  # E|ci - cj|^2 = 2 E|ci - mean|^2
    return c / scale


@dataclass(frozen=True)
class Prior:
    """Hyperparameters of `PoolModel`, in accuracy points. `w_mean`, `w_sd`: the weights' prior over FEATURES."""

    w_mean: tuple[float, ...]
    w_sd: tuple[float, ...]
    rbf_sd: float = 0.0
    rbf_len: float = 1.0
    noise_sd: float = 1.0
    features: tuple[str, ...] = FEATURES
    fit: dict = dataclasses.field(default_factory=dict, compare=False)  # how it was fit (tasks, objective)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Prior":
        d = json.loads(text)
        feats = tuple(d.get("features", FEATURES))
        if feats != FEATURES:
            raise ValueError(f"prior was fit on features {feats}, this code computes {FEATURES}")
        return cls(w_mean=tuple(d["w_mean"]), w_sd=tuple(d["w_sd"]), rbf_sd=float(d["rbf_sd"]),
                   rbf_len=float(d["rbf_len"]), noise_sd=float(d["noise_sd"]), features=feats, fit=d.get("fit", {}))


def _prior_cov(prior: Prior, phi: np.ndarray, codes: np.ndarray | None, idx_a, idx_b) -> np.ndarray:
    sw2 = np.asarray(prior.w_sd, float) ** 2
    k = (phi[idx_a] * sw2) @ phi[idx_b].T
    if prior.rbf_sd > 0 and codes is not None:
        d2 = ((codes[idx_a][:, None, :] - codes[idx_b][None, :, :]) ** 2).sum(-1)
        k = k + prior.rbf_sd ** 2 * np.exp(-0.5 * d2 / prior.rbf_len ** 2)
    return k


class PoolModel:
    """The posterior over one pool's post-KD accuracies (fractions in the API, points inside).

    `observe(i, acc)` adds a measured student; `mean()`, `sd()` are the posterior of every candidate's *measured*
    accuracy (KD noise included, so the 90% interval `interval()` is one a user can check against a new trial)."""

    def __init__(self, prior: Prior, scores, params, flops, teacher_acc: float, num_classes: int, codes=None):
        self.prior = prior
        self.teacher_acc = float(teacher_acc)
        self.phi = pool_features(scores, params, flops, teacher_acc, num_classes)
        self.codes = code_features(codes) if (codes is not None and prior.rbf_sd > 0) else None
        self.n = len(self.phi)
        self.m0 = self.phi @ np.asarray(prior.w_mean, float)  # prior mean, points relative to the teacher
        self.obs: dict[int, float] = {}
        self._cache = None

    # evidence ------------------------------------------------------------------------------------------------

    def observe(self, index: int, acc: float) -> None:
        if not 0 <= int(index) < self.n:
            raise IndexError(f"candidate {index} is not in this pool of {self.n}")
        self.obs[int(index)] = float(acc)
        self._cache = None

    def _post(self):
        if self._cache is None:
            idx = np.array(sorted(self.obs), dtype=int)
            if len(idx) == 0:
                self._cache = (idx, None, None)
            else:
                y = 100 * (np.array([self.obs[i] for i in idx]) - self.teacher_acc) - self.m0[idx]
                k = _prior_cov(self.prior, self.phi, self.codes, idx, idx) + self.prior.noise_sd ** 2 * np.eye(len(idx))
                chol = np.linalg.cholesky(k + 1e-9 * np.eye(len(idx)))
                alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, y))
                self._cache = (idx, chol, alpha)
        return self._cache

    def _latent(self, rows: np.ndarray):
        """Posterior mean and covariance of the noise-free accuracies (points) of `rows`."""
        idx, chol, alpha = self._post()
        mean = self.m0[rows].copy()
        cov = _prior_cov(self.prior, self.phi, self.codes, rows, rows)
        if chol is not None:
            kx = _prior_cov(self.prior, self.phi, self.codes, rows, idx)
            mean += kx @ alpha
            v = np.linalg.solve(chol, kx.T)
            cov -= v.T @ v
        return mean, cov

    def _latent_diag(self, rows: np.ndarray):
        idx, chol, alpha = self._post()
        mean = self.m0[rows].copy()
        sw2 = np.asarray(self.prior.w_sd, float) ** 2
        var = (self.phi[rows] ** 2 * sw2).sum(1) + (self.prior.rbf_sd ** 2 if self.codes is not None else 0.0)
        if chol is not None:
            kx = _prior_cov(self.prior, self.phi, self.codes, rows, idx)
            mean += kx @ alpha
            v = np.linalg.solve(chol, kx.T)
            var = var - (v ** 2).sum(0)
        return mean, np.maximum(var, 1e-12)

    # predictions ---------------------------------------------------------------------------------------------

    def mean(self) -> np.ndarray:
        m, _ = self._latent_diag(np.arange(self.n))
        return self.teacher_acc + m / 100

    def sd(self) -> np.ndarray:
        _, v = self._latent_diag(np.arange(self.n))
        return np.sqrt(v + self.prior.noise_sd ** 2) / 100

    def predicted(self, z: float = Z90) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """What a user reads: the posterior mean and its 90% interval, as accuracies (clipped to [0, 1]; the
        search's decisions use the unclipped `mean`)."""
        lo, hi = self.interval(z)
        return np.clip(self.mean(), 0.0, 1.0), lo, hi

    def interval(self, z: float = Z90) -> tuple[np.ndarray, np.ndarray]:
        m, s = self.mean(), self.sd()
        return np.clip(m - z * s, 0.0, 1.0), np.clip(m + z * s, 0.0, 1.0)  # an accuracy is in [0, 1]

    # decisions -----------------------------------------------------------------------------------------------

    def next_candidate(self, acquisition: str = "mean", rng: np.random.Generator | None = None, exclude=(),
                       allowed: np.ndarray | None = None) -> int | None:
        """The candidate to distil next, or None when none is left. `exclude`: trials in flight (and any index
        not to propose). "mean": the highest posterior mean (with trials in flight this is the kriging believer:
        believing a pending trial at its posterior mean leaves every mean unchanged, so the next-best is taken);
        "thompson": `choose`."""
        if acquisition == "thompson":
            return self.choose(rng if rng is not None else np.random.default_rng(0), exclude, allowed)
        if acquisition != "mean":
            raise ValueError(f"unknown acquisition {acquisition!r}; known: {', '.join(ACQUISITIONS)}")
        ok = np.ones(self.n, bool) if allowed is None else np.asarray(allowed, bool).copy()
        ok[list(self.obs)] = False
        ok[[int(i) for i in exclude]] = False
        if not ok.any():
            return None
        m = np.where(ok, self.mean(), -np.inf)
        return int(np.argmax(m))  # ties: the lowest index

    def choose(self, rng: np.random.Generator, exclude=(), allowed: np.ndarray | None = None,
               shortlist: int = 256) -> int | None:
        """Thompson sampling: the best untried candidate of one joint draw from the posterior. `exclude`: pending
        and measured indices; `allowed`: a boolean mask (e.g. the budget). The draw is over the `shortlist`
        candidates of highest upper bound (a candidate below all of them is not going to win a draw)."""
        ok = np.ones(self.n, bool) if allowed is None else np.asarray(allowed, bool).copy()
        ok[list(self.obs)] = False
        ok[[int(i) for i in exclude]] = False
        rows = np.flatnonzero(ok)
        if len(rows) == 0:
            return None
        m, v = self._latent_diag(rows)
        if len(rows) > shortlist:
            rows = rows[np.argsort(-(m + 2.5 * np.sqrt(v)), kind="mergesort")[:shortlist]]
        mean, cov = self._latent(rows)
        draw = _mvn(rng, mean, cov)
        return int(rows[int(np.argmax(draw))])

    def prob_improvement(self, margin: float = 0.005, allowed: np.ndarray | None = None, draws: int = 2000,
                         seed: int = 0, shortlist: int = 128, exclude=()) -> float:
        """The posterior probability that some untried (allowed) candidate's measured accuracy beats the best
        measured one by more than `margin` (a fraction: 0.005 = half a point). 1.0 before any measurement."""
        if not self.obs:
            return 1.0
        best = 100 * (max(self.obs.values()) - self.teacher_acc)
        ok = np.ones(self.n, bool) if allowed is None else np.asarray(allowed, bool).copy()
        ok[list(self.obs)] = False
        ok[[int(i) for i in exclude]] = False
        rows = np.flatnonzero(ok)
        if len(rows) == 0:
            return 0.0
        m, v = self._latent_diag(rows)
        if len(rows) > shortlist:
            rows = rows[np.argsort(-(m + 2.5 * np.sqrt(v)), kind="mergesort")[:shortlist]]
        mean, cov = self._latent(rows)
        cov = cov + self.prior.noise_sd ** 2 * np.eye(len(rows))
        rng = np.random.default_rng(seed)
        s = _mvn(rng, mean, cov, size=draws)
        return float((s.max(1) > best + 100 * margin).mean())


def simulate_search(model: PoolModel, acc: np.ndarray, acquisition: str = "mean", seed: int = 0,
                    stop_after_best: int | None = None, tol: float = 0.005) -> list[int]:
    """The order a sequential search with `model` distils a pool whose measured accuracies are `acc` (fractions):
    each trial observes its label before the next is chosen. `stop_after_best=k`: stop once a student within `tol`
    of the pool's best is measured and at least k trials ran (the rest follows in index order)."""
    rng = np.random.default_rng(seed)
    acc = np.asarray(acc, float)
    order: list[int] = []
    found = False
    while len(order) < len(acc):
        i = model.next_candidate(acquisition, rng, exclude=order)
        order.append(i)
        model.observe(i, float(acc[i]))
        found = found or acc[i] >= acc.max() - tol
        if stop_after_best is not None and found and len(order) >= stop_after_best:
            break
    return order + [j for j in range(len(acc)) if j not in set(order)]


def calibration_after(model: PoolModel, acc: np.ndarray, measured: int, z: float = Z90) -> dict:
    """How the posterior's predictions hold up on the students not yet measured, after the first `measured`
    students of a greedy-mean search are observed (`model` is updated in place): the coverage of its intervals
    (90% by default) and the mean absolute error, in points."""
    acc = np.asarray(acc, float)
    for _ in range(measured):
        i = model.next_candidate("mean")
        if i is None:
            break
        model.observe(i, float(acc[i]))
    rest = np.array([j for j in range(len(acc)) if j not in model.obs], dtype=int)
    if len(rest) == 0:
        return {"coverage": float("nan"), "mae_points": float("nan"), "students": 0}
    lo, hi = model.interval(z)
    y = acc[rest]
    return {"coverage": float(((y >= lo[rest]) & (y <= hi[rest])).mean()),
            "mae_points": float(100 * np.abs(model.mean()[rest] - y).mean()), "students": int(len(rest))}


def _mvn(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, size: int | None = None) -> np.ndarray:
    n = len(mean)
    cov = (cov + cov.T) / 2
    try:  # Cholesky with a little jitter: several times faster than an eigendecomposition
        a = np.linalg.cholesky(cov + 1e-8 * max(float(np.trace(cov)) / n, 1e-12) * np.eye(n))
    except np.linalg.LinAlgError:
        w, vecs = np.linalg.eigh(cov)
        a = vecs * np.sqrt(np.maximum(w, 0))
    z = rng.standard_normal((n,) if size is None else (size, n))
    return mean + z @ a.T


# ----------------------------------------------------------------------------------------------------------------
# Meta-learning the prior: maximum marginal likelihood over the meta-training tasks' measured pools
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PoolData:
    """One task's pool for fitting or benchmarking: predictor scores, sizes, labels (fractions)."""

    task_id: str
    scores: np.ndarray
    params: np.ndarray
    flops: np.ndarray
    acc: np.ndarray
    teacher_acc: float
    num_classes: int
    codes: np.ndarray | None = None

    def subset(self, mask: np.ndarray) -> "PoolData":
        c = None if self.codes is None else self.codes[mask]
        return PoolData(self.task_id, self.scores[mask], self.params[mask], self.flops[mask], self.acc[mask],
                        self.teacher_acc, self.num_classes, c)


def fit_prior(pools: list[PoolData], rbf: bool = True, steps: int = 300, seed: int = 0) -> Prior:
    """Maximise the summed log marginal likelihood of the pools' labels (each pool one task) over the prior's
    hyperparameters, with torch's L-BFGS. Deterministic for a given list of pools."""
    import torch

    torch.manual_seed(seed)
    d = len(FEATURES)
    data = []
    for p in pools:
        phi = torch.tensor(pool_features(p.scores, p.params, p.flops, p.teacher_acc, p.num_classes))
        y = torch.tensor(100 * (np.asarray(p.acc, float) - p.teacher_acc))
        d2 = None
        if rbf and p.codes is not None:
            c = torch.tensor(code_features(p.codes))
            d2 = ((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        data.append((phi, y, d2))
    mu = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    log_sw = torch.full((d,), math.log(1.0), dtype=torch.float64, requires_grad=True)
    log_a = torch.tensor(math.log(1.0), dtype=torch.float64, requires_grad=True)
    log_l = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
    log_n = torch.tensor(math.log(1.0), dtype=torch.float64, requires_grad=True)
    params = [mu, log_sw, log_n] + ([log_a, log_l] if rbf else [])
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def nll():
        opt.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        for phi, y, d2 in data:
            k = (phi * torch.exp(2 * log_sw)) @ phi.T + torch.exp(2 * log_n) * torch.eye(len(y), dtype=phi.dtype)
            if d2 is not None:
                k = k + torch.exp(2 * log_a) * torch.exp(-0.5 * d2 / torch.exp(2 * log_l))
            r = y - phi @ mu
            dist = torch.distributions.MultivariateNormal(torch.zeros_like(y), covariance_matrix=k)
            total = total - dist.log_prob(r)
        total = total / len(data)
        total.backward()
        return total

    loss = float(opt.step(nll).detach())
    sd = torch.exp(log_sw).detach().numpy()
    return Prior(w_mean=tuple(float(x) for x in mu.detach().numpy()), w_sd=tuple(float(x) for x in sd),
                 rbf_sd=float(torch.exp(log_a).detach()) if rbf else 0.0,
                 rbf_len=float(torch.exp(log_l).detach()) if rbf else 1.0, noise_sd=float(torch.exp(log_n).detach()),
                 fit={"tasks": [p.task_id for p in pools], "nll_per_task": float(loss), "rbf": rbf})
