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


VERBOSE_ENV = "DASS_RAY_VERBOSE"  # "1": Tune's own console output too (`scripts/search.py --verbose` sets it)


def tune_verbosity() -> int:
    """`RunConfig(verbose=...)` for a Tune run this process starts: 0, with no Tune console output at all, unless
    $DASS_RAY_VERBOSE is 1: then 1, Tune's own output (configuration banner, trial tables, TensorBoard hint).

    Ray 2.60's default output engine prints its configuration banner, "View detailed results here" and the
    "To visualize your results with TensorBoard" hint even at verbose=0; its legacy engine (RAY_AIR_NEW_OUTPUT=0,
    read when the run starts) prints nothing at 0, so a quiet run selects it (a value already set wins)."""
    if os.environ.get(VERBOSE_ENV) == "1":
        return 1
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    return 0


# What a command does without --address (issue 29): every entry point that runs Ray work says it in its --help.
ADDRESS_HELP = ("Ray cluster to run on: its GCS address (HOST:6379), or 'auto' for the one `ray start` started on "
                "this machine. Default: a private local Ray of this command's own (own temp dir, stopped at exit), "
                "never a Ray already running here; inside a Ray Job (`ray job submit`): the job's cluster")
NUM_CPUS_HELP = "CPUs of the private local Ray (default: all); ignored on a cluster or inside a Ray Job"
# Set by Ray's job supervisor in the environment of a job's entrypoint (with RAY_ADDRESS: the job's cluster), see
# ray/dashboard/modules/job/job_supervisor.py `_get_driver_env_vars` (Ray 2.60).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def in_ray_job() -> bool:
    """Whether this process is (or was started by) the entrypoint of a Ray Job."""
    return RAY_JOB_ENV in os.environ


# What a Ray call raises when the actor it ran on, or the node holding its result, is gone: the work is redone.
LOST_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


def init_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> str:
    """Connect this process to Ray, the same way in every entry point; a no-op when already connected.

    - `address` given: that cluster (`num_cpus` is the cluster's business: ignored, with a note).
    - no `address`, inside a Ray Job: the job's cluster (as `address="auto"`; Ray sets RAY_ADDRESS for the job).
    - otherwise: a new private local Ray (`address="local"`), in a temp dir of its own that is removed at exit --
      never a Ray already running on the machine (a bare `ray.init()` would join the one `ray start` or
      `dass-ray serve` started there, and `num_cpus` would then be an error).

    Answers which: "cluster", "job" or "local" ("" when already connected)."""
    if ray.is_initialized():
        return ""
    kw = dict(ignore_reinit_error=True, log_to_driver=not quiet, configure_logging=True,
              logging_level="ERROR" if quiet else "INFO")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    where = "cluster" if address else "job" if in_ray_job() else "local"
    if where != "local":
        address = address or os.environ.get("RAY_ADDRESS") or "auto"
        if num_cpus is not None:
            print(f"note: --num-cpus {num_cpus} ignored: running on the Ray cluster at {address}"
                  + (" (this Ray Job's)" if where == "job" else ""), file=sys.stderr, flush=True)
        ray.init(address=address, **kw)
        return where
    import atexit
    import tempfile

    tmp = tempfile.mkdtemp(prefix="dass-ray-", dir=os.environ.get("RAY_TMPDIR") or None)  # short: socket paths
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" and not os.environ.get("RAY_AUTH_TOKEN"):
        # Ray's default for a new local instance is token auth with a token it writes to ~/.ray/auth_token, after
        # which every `ray start --head` of the user needs one: a token of this process (and its workers) instead
        import secrets

        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    atexit.register(_end_private_ray, tmp)  # runs before Ray's own exit hook (atexit is last-in, first-out)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=tmp, **kw)
    return where


def _end_private_ray(tmp: str) -> None:
    import shutil

    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


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
