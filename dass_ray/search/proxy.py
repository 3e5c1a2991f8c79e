"""The proxy teacher of a foreign teacher, trained with Ray Train: the search space's largest member (the family
whose weights are remapped into the candidates) distilled from the foreign teacher's cached soft labels on the
user's data (`dass_ray.core.kd.train_proxy`). DaSS ranks the candidates with it; the chosen students are then
distilled from the foreign teacher itself.

Resumable: every epoch is checkpointed, and running again with the same storage and digest continues from the last
checkpoint (Ray Train restores a run of the same name). Cached: the finished proxy is a teacher checkpoint
`<cache>/proxy-<digest>.pt` that a later search with the same teacher, data, space, recipe and seed loads instead.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch

from dass_ray.core.config import ScaleConfig
from dass_ray.core.kd import SoftLabels, TensorData, train_proxy
from dass_ray.core.space import SpaceConfig
from dass_ray.fileutil import resolve_storage
from dass_ray.search.rayutil import quick_train_polls, worker_device
from dass_ray.search.resources import scaling_config_kwargs


def proxy_digest(soft_key: str, data: TensorData, space: SpaceConfig, scale: ScaleConfig, seed: int) -> str:
    """Identifies a proxy: the foreign soft labels' digest, the data it trains on, the space, the recipe, the seed."""
    recipe = {"space": space.name, "classes": space.num_classes, "teacher": repr(scale.teacher),
              "alpha": scale.kd.alpha, "temperature": scale.kd.temperature, "clip": scale.kd.max_grad_norm}
    h = hashlib.sha256(f"{soft_key}|{data.fingerprint()}|{seed}|{json.dumps(recipe, sort_keys=True)}".encode())
    return h.hexdigest()[:20]


def _proxy_loop(config: dict) -> None:
    """Ray Train worker loop: train the proxy, checkpoint every epoch, resume from the run's last checkpoint."""
    import ray.train

    torch.set_num_threads(config["threads"])
    scale: ScaleConfig = config["scale"]
    resume = None
    ck = ray.train.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            resume = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    if resume is not None and resume.get("final"):  # the run had finished: hand its result back as it is
        with tempfile.TemporaryDirectory() as d:
            torch.save(resume, Path(d) / "state.pt")
            ray.train.report({"epoch": float(resume["result"].get("epochs", 0))},
                             checkpoint=ray.train.Checkpoint.from_directory(d))
        return

    class _Rep:
        def report(self, metrics, state):
            with tempfile.TemporaryDirectory() as d:
                torch.save(state(), Path(d) / "state.pt")
                ray.train.report({k: float(v) for k, v in metrics.items()},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))

    model, res = train_proxy(config["space"], config["data"], config["soft"], scale.teacher, scale.kd,
                             seed=config["seed"], reporter=_Rep(), resume=resume, device=worker_device())
    if not res.ok:
        raise RuntimeError(f"proxy teacher training failed: {res.reason}")
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "final": True, "result": res.summary(),
                    "resumed_from": int((resume or {}).get("epoch", 0))}, Path(d) / "state.pt")
        ray.train.report({"best_acc": res.best_acc, "final_acc": res.final_acc, "epoch": float(res.epochs)},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def train_proxy_on_ray(space: SpaceConfig, data: TensorData, soft: SoftLabels, scale: ScaleConfig, *,
                       storage: str | Path, name: str, seed: int = 0, threads: int = 1) -> tuple[dict, dict]:
    """Train the proxy with a one-worker `TorchTrainer` (resuming run `name` under `storage` if it exists);
    returns (state_dict, {"result": summary, "resumed_from": epoch})."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    quick_train_polls()
    trainer = TorchTrainer(
        _proxy_loop,
        train_loop_config={"scale": scale, "space": space, "data": data, "soft": soft, "seed": seed,
                           "threads": threads},
        scaling_config=ScalingConfig(num_workers=1, **scaling_config_kwargs("teacher_train", num_cpus=threads)),
        run_config=RunConfig(name=name, storage_path=resolve_storage(str(storage), Path(storage)),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"proxy teacher training failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        blob = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    return blob["model"], {"result": blob.get("result", {}), "resumed_from": blob.get("resumed_from", 0)}
