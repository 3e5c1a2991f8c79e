"""Small shared helpers for the Ray layers (starting/attaching, progress lines)."""

from __future__ import annotations

import os
import sys
import time

import ray

from dass_ray.fileutil import STORAGE_ENV, resolve_storage  # noqa: F401 - re-exported


def worker_device() -> str:
    """Where torch work in this Ray task/actor/worker runs: 'cuda' when Ray gave it a GPU, else 'cpu' (a CPU slot on
    a GPU node must not take the node's GPU)."""
    import torch

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


# Ray Train's controller polls its worker group every 2 s by default; a run ends only at the next poll after its
# last report. Our Train runs include teachers that train for seconds (small tasks, weak teachers on purpose), where
# that wait and the start-up polls were a fifth of the run (measured: 17.5 s -> 14 s for a one-epoch teacher at
# 0.25 s). Set before each `TorchTrainer` is built, in the process that drives it (Ray Train passes it on to its
# controller); a value already in the environment wins.
TRAIN_POLL_S = "0.5"


def quick_train_polls() -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Attach to `address` (a cluster) or start a local Ray instance; a no-op when already connected."""
    if ray.is_initialized():
        return
    kw = dict(ignore_reinit_error=True, log_to_driver=not quiet, configure_logging=True,
              logging_level="ERROR" if quiet else "INFO")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kw)


class Progress:
    """A progress line: a tqdm bar on a terminal, a plain line at most every `every_s` otherwise."""

    def __init__(self, total: int, desc: str, every_s: float = 10.0, stream=None):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.stream = stream or sys.stderr
        self.n = 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)

    def update(self, k: int = 1, note: str = "") -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
            if note:
                self.bar.set_postfix_str(note)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s or self.n >= self.total:
            self.last = now
            el = now - self.t0
            eta = el / self.n * (self.total - self.n) if self.n else float("nan")
            print(f"[{self.desc}] {self.n}/{self.total} elapsed {el:.0f}s eta {eta:.0f}s {note}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
