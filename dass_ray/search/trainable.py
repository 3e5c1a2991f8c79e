"""One KD trial as a Tune function trainable, and the callback that records finished trials."""
from __future__ import annotations

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


class _TrialRecorder(Callback):
    """A Tune callback that appends every finished trial to trials.parquet at once (resume keeps them).

    Tune pickles its callbacks into the experiment state; the run (event log, open files) is left out of it, so
    an unpickled copy records nothing (this process's run resumes from trials.parquet instead)."""

    def __init__(self, run):
        self.run = run

    def __getstate__(self):
        return {"run": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.run is not None:
            self.run.record_trial(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.run is not None:
            self.run.record_trial(trial, error=True)


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
