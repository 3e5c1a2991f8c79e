"""Candidate scoring on Ray: encoder actors -> predictor replicas, each candidate scored exactly once.

Kept apart from `dass_ray.search` on purpose: an actor process imports the module that defines its class, and
this one needs only Ray, torch, numpy and the model core -- not Ray Tune, pyarrow or pandas (about 1 s less
start-up per actor; docs/scaling.md B1).

Data path: the driver sends a batch's candidate configs (JSON, ~60 B each) to an encoder; the encoder's
embeddings (8 KB per candidate) go from its object store *straight to a predictor replica* as an `ObjectRef`
argument, never through the driver (B2); only the scores (4 B per candidate) come back to the driver.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np
import ray
import torch

from dass_ray.core.embed import Embedder
from dass_ray.core.meta import MetaSGD, teacher_support
from dass_ray.core.predictor import PredictorBatch
from dass_ray.search.rayutil import worker_device
from dass_ray.search.resources import ray_options
from dass_ray.core.space import ArchConfig, SpaceConfig

# A batch whose embeddings or scores are lost this many times (actor deaths, lost nodes) fails the call.
MAX_BATCH_ATTEMPTS = 6


@ray.remote(max_restarts=-1, max_task_retries=0)
class EncoderActor:
    """Holds the teacher (folded for the batched engine) once; embeds batches of candidate configs.

    The teacher comes with the calls (`load`, and every `embed`, as `[ObjectRef]`: a nested reference is fetched
    only when the actor has no teacher yet), not with the constructor: Ray cannot promise to restart an actor whose
    constructor arguments live in the object store, and says so in an error line for every search."""

    def __init__(self, space: dict, seed: int = 0, threads: int = 1):
        torch.set_num_threads(threads)
        self.space, self.seed = SpaceConfig.from_dict(space), seed
        self.engine: Embedder | None = None

    def load(self, teacher: list) -> None:
        """Fold the teacher `[ObjectRef of its state dict]` now, unless this actor (life) already did."""
        if self.engine is None:
            self.engine = Embedder(ray.get(teacher[0]), self.space, seed=self.seed)

    @ray.method(num_returns=3)
    def embed(self, batch_id: int, arch_jsons: list[str], teacher: list) -> tuple[int, np.ndarray, np.ndarray]:
        """(batch id, stage-4 maps [n, C, H, W] float32, architecture codes [n, D] float32)."""
        self.load(teacher)  # a restarted actor lost its teacher
        archs = [ArchConfig.from_json(a) for a in arch_jsons]
        maps = self.engine.embed(archs).numpy()
        return batch_id, maps, self.space.encode_many(archs).astype(np.float32)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


@ray.remote(max_restarts=-1, max_task_retries=2)
class PredictorActor:
    """Holds the adapted predictor; GPU when it was given one. Like the encoders, it gets what it holds with its
    calls (`[ObjectRef]` of {"cfg", "params", "teacher_map"}), fetched once per actor life."""

    def __init__(self, threads: int = 1):
        torch.set_num_threads(threads)
        self.device = worker_device()
        self.model = None

    def load(self, predictor: list) -> None:
        if self.model is None:
            from dass_ray.core.predictor import Predictor, PredictorConfig

            blob = ray.get(predictor[0])
            self.model = Predictor(PredictorConfig.from_dict(blob["cfg"])).to(self.device).eval()
            self.params = {k: torch.as_tensor(v).to(self.device) for k, v in blob["params"].items()}
            self.tmap = torch.as_tensor(blob["teacher_map"]).to(self.device)

    @torch.no_grad()
    def score(self, batch_id: int, maps: np.ndarray, codes: np.ndarray, predictor: list) -> tuple[int, np.ndarray]:
        self.load(predictor)
        b = PredictorBatch(torch.as_tensor(maps).to(self.device), self.tmap, torch.as_tensor(codes).to(self.device))
        return batch_id, self.model(b, self.params).float().cpu().numpy()

    def device_name(self) -> str:
        return self.device


def adapted_params(model: MetaSGD, support: PredictorBatch) -> dict[str, torch.Tensor]:
    with torch.enable_grad():
        return {k: v.detach().clone() for k, v in model.adapt(support, first_order=True).items()}


def _fit_options(encoders: int, predictors: int) -> tuple[dict, dict]:
    """Ray options of one encoder and one predictor replica, shrunk to fit a cluster smaller than the request.

    A laptop has fewer CPUs than the actors asked for: every actor then gets the same share, so all of them start.
    An autoscaling cluster advertises its worker types (`dass_autoscale_*`): nothing is shrunk there, the
    autoscaler adds nodes for the demand instead.
    """
    enc_opts = ray_options("encoder")
    pred_opts = ray_options("predictor")
    res = ray.cluster_resources()
    total = float(res.get("CPU", 1))
    autoscaling = any(k.startswith("dass_autoscale") for k in res)
    want = encoders * enc_opts["num_cpus"] + (0 if pred_opts.get("num_gpus") else predictors * pred_opts["num_cpus"])
    if want > total and not autoscaling:
        f = total / want
        enc_opts = {**enc_opts, "num_cpus": enc_opts["num_cpus"] * f}
        if not pred_opts.get("num_gpus"):
            pred_opts = {**pred_opts, "num_cpus": pred_opts["num_cpus"] * f}
    return enc_opts, pred_opts


from dass_ray.search.rayutil import LOST_ERRORS as _LOST  # noqa: E402


def score_candidates(teacher_sd: dict, space: SpaceConfig, archs: list[ArchConfig], model: MetaSGD,
                     teacher_acc: float, *, encoders: int = 2, predictors: int = 1, batch_size: int = 256,
                     probe_seed: int = 0, on_progress: Callable[[int], None] | None = None,
                     actors: list | None = None) -> np.ndarray:
    """Predicted post-KD accuracy of every candidate, in candidate order (each scored exactly once).

    Batches go to `encoders` actors (at most two in flight each; pass warm `actors` to reuse them, the caller
    then owns them). A batch whose embeddings are lost -- its encoder died, or the node holding them did before
    a predictor read them -- is re-queued on a restarted or new encoder. Embeddings flow on to `predictors`
    replicas holding the predictor adapted once on the teacher.
    """
    sd_ref = ray.put({k: v.detach().cpu() for k, v in teacher_sd.items()})
    enc_opts, pred_opts = _fit_options(encoders, predictors)

    def new_encoder():
        # SPREAD: one encoder per node first (each holds its own teacher copy and CPUs), so losing a node costs
        # one actor's batches; a restarted actor is placed on the nodes that are left.
        a = EncoderActor.options(**enc_opts, scheduling_strategy="SPREAD").remote(
            space.to_dict(), probe_seed, max(1, int(enc_opts["num_cpus"])))
        a.load.remote([sd_ref])  # folds the teacher while the predictor is adapted below
        return a

    # Encoders start first: their process start-up and teacher folding overlap the adaptation below.
    encs = actors if actors is not None else [new_encoder() for _ in range(encoders)]
    eng = Embedder(teacher_sd, space, seed=probe_seed)
    tmap = eng.teacher_embedding().clone()
    support = teacher_support(tmap, torch.from_numpy(space.encode(space.teacher()).astype(np.float32)), teacher_acc)
    params = {k: v.numpy() for k, v in adapted_params(model, support).items()}
    del eng
    pred_ref = ray.put({"cfg": model.predictor.cfg.to_dict(), "params": params, "teacher_map": tmap.numpy()})
    preds = [PredictorActor.options(**pred_opts).remote() for _ in range(predictors)]
    for p in preds:
        p.load.remote([pred_ref])

    batches = [archs[i:i + batch_size] for i in range(0, len(archs), batch_size)]
    payload = [[a.to_json() for a in b] for b in batches]
    queue = deque(range(len(batches)))
    attempts = [0] * len(batches)
    inflight: dict = {}  # waited-on ref -> (kind, batch id, encoder index or -1, the other refs of the call)
    load = {i: 0 for i in range(len(encs))}
    scores: dict[int, np.ndarray] = {}
    rr = 0

    def dispatch():
        for i in range(len(encs)):
            while queue and load[i] < 2:
                b = queue.popleft()
                bid, maps, codes = encs[i].embed.remote(b, payload[b], [sd_ref])
                inflight[bid] = ("embed", b, i, (maps, codes))
                load[i] += 1

    def lost(b: int, err: Exception):
        attempts[b] += 1
        if attempts[b] >= MAX_BATCH_ATTEMPTS:
            raise RuntimeError(f"batch {b} lost {attempts[b]} times; last error: {err}") from err
        queue.appendleft(b)  # re-queue the shard: it was not scored

    dispatch()
    try:
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, fetch_local=False)
            ref = ready[0]
            kind, b, i, rest = inflight.pop(ref)
            if kind == "embed":
                load[i] -= 1
                try:
                    ray.get(ref)  # the batch id: small; raises if the encoder died on this batch
                except _LOST as e:
                    lost(b, e)
                    try:
                        ray.get(encs[i].node.remote(), timeout=30)  # restarted?
                    except Exception:
                        encs[i] = new_encoder()  # permanently dead (e.g. ray.kill): replace it
                        load[i] = 0
                    dispatch()
                    continue
                maps, codes = rest
                sref = preds[rr % len(preds)].score.remote(b, maps, codes, [pred_ref])
                rr += 1
                inflight[sref] = ("score", b, -1, ())
                dispatch()
            else:
                try:
                    _, s = ray.get(ref)
                except _LOST as e:  # the embeddings died with their node, or the replica kept dying
                    lost(b, e)
                    dispatch()
                    continue
                assert b not in scores, f"batch {b} scored twice"
                scores[b] = s
                if on_progress:
                    on_progress(len(batches[b]))
    finally:
        for a in preds:
            ray.kill(a)
        if actors is None:
            for a in encs:
                ray.kill(a)
    return np.concatenate([scores[b] for b in range(len(batches))]) if batches else np.zeros(0)
