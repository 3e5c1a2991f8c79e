"""One KD trial as a Tune function trainable, and the callback that records finished trials."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from ray.tune import Callback

from dass_ray.core.kd import train_kd
from dass_ray.core.space import ArchConfig
from dass_ray.search.rayutil import worker_device



def kd_trainable(config: dict, ctx: dict) -> None:
    """A Tune function trainable: one student's KD run, checkpointed every epoch, resumable."""
    import tempfile

    from ray import tune

    torch.set_num_threads(int(ctx.get("threads", 1)))
    arch = ArchConfig.from_json(config["arch_json"])
    resume = None
    ck = tune.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)

    class _Rep:
        def report(self, metrics, state):
            with tempfile.TemporaryDirectory() as d:
                torch.save(state(), Path(d) / "state.pt")
                tune.report({"val_acc": metrics["val_acc"], "best_acc": metrics["best_acc"],
                             "epoch": metrics["epoch"], "loss": metrics["loss"], "status": "running"},
                            checkpoint=tune.Checkpoint.from_directory(d))

    res = train_kd(arch, ctx["space"], ctx["teacher_sd"], ctx["data"], ctx["kd"], seed=ctx["seed"],
                   soft=ctx["soft"], reporter=_Rep(), resume=resume, device=worker_device())
    if not res.ok:
        tune.report({"val_acc": res.final_acc, "best_acc": None, "epoch": res.epochs, "status": "failed",
                     "reason": res.reason})


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s"


def kd_progress_line(done: int, total: int, running: int, best: tuple | None, elapsed_s: float,
                     eta_s: float | None, epoch_frac: float | None = None) -> str:
    """One KD progress line: '[kd] 2/5 students distilled, 2 running (48% done) | best 0.9790 (#123) |
    elapsed 1m05s | eta 1m40s'. `best`: (accuracy, index, finished?) or None; `eta_s` None: not known yet."""
    head = f"[kd] {done}/{total} students distilled, {running} running"
    if epoch_frac is not None:
        head += f" ({100 * epoch_frac:.0f}% done)"
    b = "best -" if best is None else f"best {best[0]:.4f} (#{best[1]}{'' if best[2] else ', still training'})"
    return f"{head} | {b} | elapsed {_dur(elapsed_s)} | eta {_dur(eta_s)}"


class _TrialRecorder(Callback):
    """A Tune callback that appends every finished trial to trials.parquet at once (resume keeps them), and prints
    a progress line (`kd_progress_line`, to stderr) when a trial ends and at least every `every_s` seconds in
    between: Tune calls `on_step_end` about every 0.1 s, also while no trial reports.

    Tune pickles its callbacks into the experiment state; the run (event log, open files) is left out of it, so
    an unpickled copy records and prints nothing (this process's run resumes from trials.parquet instead).
    `total` (KD trials of the search, the resumed ones included) and `epochs` (per trial) default to the run's."""

    def __init__(self, run, total: int | None = None, epochs: int | None = None, every_s: float = 10.0,
                 clock=time.monotonic, stream=None):
        self.run = run
        self.total = total if total is not None else run.cfg.top_k
        self.epochs = epochs if epochs is not None else run.p.scale.kd.epochs
        self.every_s, self.clock, self.stream = every_s, clock, stream
        self._t0 = self._last = self._frac0 = None

    def __getstate__(self):
        return {"run": None}

    def on_step_end(self, iteration, trials, **info):
        if self.run is not None:
            self.progress(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.run is not None:
            self.run.record_trial(trial)
            self.progress(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.run is not None:
            self.run.record_trial(trial, error=True)
            self.progress(trials, force=True)

    def progress(self, trials, force: bool = False) -> str | None:
        """Print (and return) a progress line if `force`, on the first call, or `every_s` after the last one."""
        now = self.clock()
        rows = self.run.trial_rows
        recorded = {int(r["index"]) for r in rows}
        best = max(((r["measured_acc"], int(r["index"]), True) for r in rows if r.get("measured_acc") is not None),
                   default=None)
        running, frac = 0, float(len(rows))
        for t in trials:
            if t.status != "RUNNING" or int(t.config["index"]) in recorded:
                continue
            running += 1
            res = t.last_result or {}
            frac += min(1.0, float(res.get("epoch") or 0) / max(1, self.epochs))
            if res.get("best_acc") is not None and (best is None or res["best_acc"] > best[0]):
                best = (float(res["best_acc"]), int(t.config["index"]), False)
        if self._t0 is None:
            self._t0, self._frac0 = now, frac
        elif not force and now - self._last < self.every_s:
            return None
        self._last = now
        elapsed = now - self._t0
        rate = (frac - self._frac0) / elapsed if elapsed > 0 else 0.0  # students per second, this process
        eta = (self.total - frac) / rate if rate > 0 else (0.0 if frac >= self.total else None)
        line = kd_progress_line(len(rows), self.total, running, best, elapsed, eta, frac / max(1, self.total))
        print(line, file=self.stream or sys.stderr, flush=True)
        return line


def _checkpoint_uri(ck) -> str:
    """Where a Tune checkpoint lives, as a path (local file system) or a URI that `ray.train.Checkpoint` opens."""
    if ck is None:
        return ""
    fs = ck.filesystem
    if fs is None or fs.type_name == "local":
        return ck.path
    scheme = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{ck.path}"


def _bundle(kind: str) -> dict:
    from dass_ray.search.resources import resource_bundle

    return resource_bundle(kind)
