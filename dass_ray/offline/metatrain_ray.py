"""Meta-training on Ray Train: the tasks of each episode spread over workers, gradients all-reduced.

Every worker holds the same model and Adam state; worker r computes the summed query loss of tasks r, r+W, ...;
gradients are summed over workers with an all-reduce and divided by the task count, so every worker takes the
same step as a single process would (up to float summation order). Rank 0 evaluates on meta-validation tasks,
keeps the best state by mean Spearman, and reports checkpoints; a rerun with the same name resumes from the last.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from dass_ray.fileutil import resolve_storage
from dass_ray.offline.metadataset import MetaTask
from dass_ray.offline.metatrain import MetaTrainConfig, episode_loss, evaluate, make_optimizer, new_model
from dass_ray.search.resources import scaling_config_kwargs
from dass_ray.core.space import SpaceConfig


def _loop(config: dict) -> None:
    import ray.train
    import torch.distributed as dist

    torch.set_num_threads(config.get("threads", 1))
    cfg: MetaTrainConfig = config["cfg"]
    space: SpaceConfig = config["space"]
    train: list[MetaTask] = config["train"]
    val: list[MetaTask] = config["val"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = new_model(space, cfg, train)
    if config.get("init") is not None:  # fine-tuning: start from a parent predictor (a checkpoint overrides it)
        model.load_state_dict(config["init"])
    opt = make_optimizer(model, cfg)
    start, best, best_state, best_ep = 0, -float("inf"), None, -1
    ck = ray.train.get_checkpoint()
    if ck is not None:
        with ck.as_directory() as d:
            blob = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(blob["model"])
        opt.load_state_dict(blob["optimizer"])
        start, best, best_state, best_ep = blob["episode"], blob["best"], blob["best_state"], blob["best_episode"]
    mine = list(range(rank, len(train), world))
    dist_on = world > 1 and dist.is_available() and dist.is_initialized()
    t0 = time.perf_counter()
    for ep in range(start, cfg.episodes):
        loss = episode_loss(model, train, mine, ep, cfg)
        opt.zero_grad()
        (loss / len(train)).backward() if mine else None
        params = list(model.parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if dist_on:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            off = 0
            for p in params:
                p.grad.copy_(flat[off:off + p.numel()].view_as(p))
                off += p.numel()
            lt = loss.detach().reshape(1).clone()
            dist.all_reduce(lt)
            total_loss = float(lt) / len(train)
        else:
            total_loss = float(loss.detach()) / len(train)
        opt.step()
        done = ep + 1
        if done % cfg.eval_every == 0 or done == cfg.episodes:
            metrics = {"episode": done, "episodes": cfg.episodes, "loss": total_loss,
                       "wall_s": time.perf_counter() - t0, "resumed_from": start}
            if rank == 0:
                ev = evaluate(model, val, cfg.adapt)["mean_spearman"] if val else -total_loss
                metrics["val_spearman"] = ev
                if ev > best:
                    best, best_ep = ev, done
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                metrics.update(best_val_spearman=best, best_episode=best_ep)
                with tempfile.TemporaryDirectory() as d:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "episode": done,
                                "best": best, "best_state": best_state, "best_episode": best_ep,
                                "final": done == cfg.episodes}, Path(d) / "state.pt")
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics)


def _progress_callback(fn: Callable[[dict], None]):
    """A Ray Train callback calling `fn(metrics of rank 0)` after each report (it runs in the Train controller,
    normally on the driver's node); a failing `fn` is logged, never fatal to the training."""
    import ray.train

    class _Progress(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            try:
                fn(dict(metrics[0]) if metrics else {})
            except Exception as e:  # noqa: BLE001 - progress is best effort
                logging.getLogger("dass_ray.metatrain").warning("progress callback failed: %r", e)

    return _Progress()


def meta_train(space: SpaceConfig, train: list[MetaTask], val: list[MetaTask], cfg: MetaTrainConfig, *,
               num_workers: int = 1, storage: str | Path, name: str = "meta-train", threads: int = 1,
               max_failures: int = 0, init: dict | None = None,
               progress: Callable[[dict], None] | None = None) -> dict:
    """Run meta-training with a `TorchTrainer`; returns {'last': state, 'best': state, 'metrics': ..., ...}.

    Rerunning with the same `storage`/`name` resumes from the last checkpoint (`resumed_from`: the episode it
    continued from, 0 for a fresh run). `init`: a parent predictor's state dict to fine-tune from. `progress`:
    called with rank 0's metrics after every evaluation (episode, episodes, loss, val_spearman...)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dass_ray.search.rayutil import quick_train_polls

    quick_train_polls()
    trainer = TorchTrainer(
        _loop,
        train_loop_config={"cfg": cfg, "space": space, "train": train, "val": val, "threads": threads,
                           "init": init},
        scaling_config=ScalingConfig(num_workers=num_workers,
                                     **scaling_config_kwargs("meta_train_worker", num_cpus=threads, use_gpu=False)),
        run_config=RunConfig(name=name, storage_path=resolve_storage(str(storage), Path(storage)),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=max_failures),
                             callbacks=[_progress_callback(progress)] if progress else None),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"meta-training failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        blob = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
    return {"last": blob["model"], "best": blob["best_state"] or blob["model"], "best_val_spearman": blob["best"],
            "best_episode": blob["best_episode"], "episodes": blob["episode"], "metrics": result.metrics,
            "resumed_from": int((result.metrics or {}).get("resumed_from", 0))}
