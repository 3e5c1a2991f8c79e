"""A foreign teacher's soft labels, computed once per (dataset, teacher, views) by Ray actors over shards.

The teacher (a `dass_ray.core.foreign.ForeignTeacher`, or any picklable module taking the images given) travels to
`SoftLabelActor`s through the object store once; the training images too. The images are cut into contiguous
shards, each actor computes one shard at a time (every view of it), and the driver stitches the logits in sample
order: the same `SoftLabels` [V, N, C] as `dass_ray.core.kd.compute_soft_labels` in one process. A shard whose actor
dies is computed again, by a new actor; the others are not. The result is cached under a content digest (teacher,
images, views) in the cache directory, and every KD trial reads it.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch

from dass_ray.core.kd import SoftLabels
from dass_ray.search.resources import ray_options

MAX_SHARD_ATTEMPTS = 4
CACHE_ENV = "DASS_RAY_CACHE"
from dass_ray.search.rayutil import LOST_ERRORS as _LOST  # noqa: E402


def cache_dir(configured: str | None, output: str | Path) -> Path:
    """Where digests are cached: the configured directory, else $DASS_RAY_CACHE, else <output>/cache."""
    return Path(configured or os.environ.get(CACHE_ENV) or Path(output) / "cache")


def _view(xb: torch.Tensor, v: int) -> torch.Tensor:
    """View v of a batch: 0 the images, 1 their horizontal flip (uint8 [N, H, W, C] or float [N, C, H, W])."""
    if v == 0:
        return xb
    return xb.flip(2) if xb.dtype == torch.uint8 else xb.flip(3)


@torch.no_grad()
def shard_logits(teacher, x: np.ndarray, views: int, batch_size: int) -> np.ndarray:
    """The teacher's logits [views, len(x), C] of one shard (the teacher in eval mode, on the CPU)."""
    xt = torch.from_numpy(np.array(x))  # a writable copy of the (read-only, shared) slice
    outs = []
    for v in range(views):
        chunks = [teacher(_view(xt[i:i + batch_size], v)).float().cpu() for i in range(0, xt.shape[0], batch_size)]
        outs.append(torch.cat(chunks).numpy())
    return np.stack(outs)


@ray.remote(max_restarts=0, max_task_retries=0)
class SoftLabelActor:
    """Holds one copy of the teacher; computes shards of the training images on request."""

    def __init__(self, teacher, threads: int = 1, delay_s: float = 0.0):
        torch.set_num_threads(max(1, int(threads)))
        self.teacher = teacher.eval()
        self.delay_s = delay_s  # tests: a slower shard, so an actor can be killed while it computes one

    def shard(self, sid: int, x: np.ndarray, lo: int, hi: int, views: int, batch_size: int) -> tuple[int, np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return sid, shard_logits(self.teacher, x[lo:hi], views, batch_size)

    def pid(self) -> int:
        return os.getpid()


def _actor_options(num_actors: int) -> dict:
    """An actor's Ray options, shrunk so that `num_actors` fit a cluster with fewer CPUs (not an autoscaling one)."""
    opts = ray_options("encoder")
    res = ray.cluster_resources()
    total = float(res.get("CPU", 1))
    if num_actors * opts["num_cpus"] > total and not any(k.startswith("dass_autoscale") for k in res):
        opts = {**opts, "num_cpus": total / num_actors}
    return opts


def sharded_soft_labels(teacher, x: np.ndarray | torch.Tensor, views: int = 2, *, num_actors: int = 2,
                        shard_size: int | None = None, batch_size: int = 256, actors: list | None = None,
                        meta: dict | None = None, stats: dict | None = None,
                        on_shard: Callable[[int, int], None] | None = None, delay_s: float = 0.0) -> SoftLabels:
    """The teacher's soft labels [views, N, C] of the images `x` (uint8 [N, H, W, C] or normalised [N, C, H, W]),
    computed by `num_actors` `SoftLabelActor`s (or the warm `actors` given: the caller owns those) over contiguous
    shards of `shard_size` images, each shard exactly once unless its actor is lost (then once more, on a new
    actor). `stats` (when given) gets per-shard "dispatched" / "completed" counts and "actors_lost";
    `on_shard(shard, done)` is called after each finished shard."""
    xa = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    xa = np.ascontiguousarray(xa)
    n = int(xa.shape[0])
    k = len(actors) if actors else max(1, int(num_actors))
    size = int(shard_size or max(64, math.ceil(n / (4 * k))))
    bounds = [(lo, min(n, lo + size)) for lo in range(0, n, size)]
    stats = stats if stats is not None else {}
    stats.update(dispatched=[0] * len(bounds), completed=[0] * len(bounds), actors_lost=0, shards=len(bounds))
    x_ref = ray.put(xa)
    t_ref = ray.put(teacher)
    opts = _actor_options(k)

    def new_actor():
        return SoftLabelActor.options(**opts, scheduling_strategy="SPREAD").remote(
            t_ref, max(1, int(opts["num_cpus"])), delay_s)

    pool = list(actors) if actors else [new_actor() for _ in range(k)]
    made: list = [] if actors else list(pool)
    queue = deque(range(len(bounds)))
    busy: dict = {}  # ref -> (shard, actor slot)
    free = deque(range(len(pool)))
    out: dict[int, np.ndarray] = {}

    def dispatch():
        while queue and free:
            i, s = free.popleft(), queue.popleft()
            lo, hi = bounds[s]
            stats["dispatched"][s] += 1
            busy[pool[i].shard.remote(s, x_ref, lo, hi, views, batch_size)] = (s, i)

    dispatch()
    try:
        while busy:
            ready, _ = ray.wait(list(busy), num_returns=1)
            s, i = busy.pop(ready[0])
            try:
                sid, logits = ray.get(ready[0])
            except _LOST as e:
                stats["actors_lost"] += 1
                if stats["dispatched"][s] >= MAX_SHARD_ATTEMPTS:
                    raise RuntimeError(f"soft labels: shard {s} lost {stats['dispatched'][s]} times; last error: "
                                       f"{e}") from e
                queue.appendleft(s)  # only this shard is computed again
                pool[i] = new_actor()  # the actor is gone (max_restarts=0): a fresh one takes its slot
                made.append(pool[i])
                free.append(i)
                dispatch()
                continue
            assert sid == s and s not in out, f"shard {s} computed twice"
            out[s] = logits
            stats["completed"][s] += 1
            free.append(i)
            if on_shard is not None:
                on_shard(s, len(out))
            dispatch()
    finally:
        for a in made:  # the actors this call started (the caller's own `actors` stay alive)
            ray.kill(a)
    logits = np.concatenate([out[s] for s in range(len(bounds))], axis=1) if bounds else np.zeros((views, 0, 0))
    return SoftLabels(torch.from_numpy(logits.astype(np.float32)).contiguous(), dict(meta or {}))


def foreign_soft_labels(task, views: int, cache: str | Path, *, num_actors: int = 2, log=None,
                        **kw) -> tuple[SoftLabels, bool]:
    """A `ForeignTask`'s soft labels for `views` views, from the cache (`<cache>/soft-<digest>.parquet`) or computed
    by `sharded_soft_labels` and cached. Returns (soft labels, whether they came from the cache)."""
    key = task.soft_label_key(views)
    path = Path(cache) / f"soft-{key}.parquet"
    if path.is_file():
        try:
            return SoftLabels.load(path, expect={"digest": key}), True
        except ValueError as e:  # a torn or foreign file: computed again
            if log:
                log(f"cached soft labels unusable ({e}); computing them again")
    meta = {"digest": key, "teacher": task.teacher.digest(), "data": task.fingerprint(), "kind": task.teacher.kind}
    soft = sharded_soft_labels(task.teacher, task.x_train, views, num_actors=num_actors, meta=meta, **kw)
    soft.save(path)
    return soft, False
