"""Teacher training, teacher soft labels computed once, and the KD trainer (plain PyTorch, no Ray).

Data live in memory as normalised float tensors (`TensorData`); the only augmentation is a random horizontal flip,
so the teacher has exactly two views of every training image and `SoftLabels` stores its logits for both, keyed
by sample index. A KD run then reads cached logits instead of running the teacher every step, and gives the same
loss as the teacher in the loop (tests check this).

`train_kd` and `train_teacher` are plain functions of a config that report once per epoch through a `Reporter`
(so Ray Tune / Train can wrap them) and can resume from the state they report. A diverging run (non-finite loss)
ends as a failed `TrainResult` carrying its reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn as nn
import torch.nn.functional as F

from dass_ray.core.config import KDConfig, TeacherConfig
from dass_ray.core.data import ImageDataset, to_tensor
from dass_ray.core.nets import build
from dass_ray.core.remap import remap
from dass_ray.core.space import ArchConfig, SpaceConfig

# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TensorData:
    """A task's train/val split as normalised tensors [N,3,S,S] and int64 labels. ``native_shape``: (H, W, C) of the
    images before `to_tensor` (the dataset's own size and channels, see `dass_ray.core.export.spec_for`)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    class_names: tuple[str, ...]
    native_shape: tuple[int, int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_datasets(cls, train: ImageDataset, val: ImageDataset, image_size: int) -> "TensorData":
        if tuple(train.class_names) != tuple(val.class_names):
            raise ValueError(f"train and val class names differ: {train.class_names} vs {val.class_names}")
        return cls(to_tensor(train.images, image_size), torch.from_numpy(train.labels.copy()),
                   to_tensor(val.images, image_size), torch.from_numpy(val.labels.copy()), tuple(train.class_names),
                   (*train.image_size, train.channels))

    def to(self, device: str | torch.device) -> "TensorData":
        """The same split with its four tensors on `device` (itself when they already are)."""
        return dataclasses.replace(self, x_train=self.x_train.to(device), y_train=self.y_train.to(device),
                                   x_val=self.x_val.to(device), y_val=self.y_val.to(device))

    def fingerprint(self) -> str:
        """sha256 over the training tensor and labels (identifies what soft labels were computed on)."""
        h = hashlib.sha256()
        h.update(self.x_train.cpu().numpy().tobytes())
        h.update(self.y_train.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' (or None): the first CUDA device when torch sees one, else the CPU; otherwise `device` itself, checked.

    Under Ray, a task or actor that was given no GPU sees none (Ray sets CUDA_VISIBLE_DEVICES), so 'auto' follows
    the resources it was placed with."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA device here "
                         f"(torch {torch.__version__}); use 'cpu' or 'auto'")
    return dev


def _flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Horizontally flip the rows of x where `flips` is True."""
    if not bool(flips.any()):
        return x
    return torch.where(flips.view(-1, 1, 1, 1), x.flip(3), x)


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            alpha: float = 0.5, temperature: float = 6.0) -> dict[str, torch.Tensor]:
    """`(1-a) T^2 softCE(s/T, t/T) + a CE(s, y)`; returns {'loss', 'task_loss', 'kd_loss'}."""
    t = temperature
    soft_t = F.softmax(teacher_logits.float() / t, dim=1)
    soft_ce = -(soft_t * F.log_softmax(student_logits / t, dim=1)).sum(1).mean()
    ce = F.cross_entropy(student_logits, labels)
    kd = (t * t) * soft_ce
    return {"loss": (1.0 - alpha) * kd + alpha * ce, "task_loss": ce, "kd_loss": kd}


# ----------------------------------------------------------------------------------------------------------------
# Soft labels, computed once
# ----------------------------------------------------------------------------------------------------------------

VIEWS = ("identity", "hflip")


@dataclass
class SoftLabels:
    """Teacher logits [V, N, C] for V fixed views (0: identity, 1: horizontal flip) of N training images."""

    logits: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def num_views(self) -> int:
        return int(self.logits.shape[0])

    def lookup(self, index: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        view = flips.long() if self.num_views > 1 else torch.zeros_like(index)
        if self.num_views == 1 and bool(flips.any()):
            raise ValueError("soft labels hold the identity view only; run KD with flip=False")
        return self.logits[view, index]

    def save(self, path: str | Path) -> None:
        """Parquet: one row per (sample index, view) with the logits as a fixed-size float32 list."""
        v, n, c = self.logits.shape
        idx = np.tile(np.arange(n, dtype=np.int64), v)
        view = np.repeat(np.arange(v, dtype=np.int8), n)
        flat = pa.array(self.logits.reshape(-1).numpy().astype(np.float32))
        table = pa.table({"index": idx, "view": view,
                          "logits": pa.FixedSizeListArray.from_arrays(flat, c)})
        meta = {b"dass_ray.soft_labels": json.dumps({**self.meta, "views": list(VIEWS[:v]), "num_classes": c,
                                                     "num_samples": n}).encode()}
        table = table.replace_schema_metadata(meta)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        pq.write_table(table, tmp)
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path, expect: dict | None = None) -> "SoftLabels":
        """Read `save`'s file; every key of `expect` must match the stored metadata (e.g. the teacher's digest)."""
        p = Path(path)
        try:
            table = pq.read_table(p)
        except Exception as e:  # pyarrow raises several types for unreadable files
            raise ValueError(f"{p}: cannot read soft labels ({e})") from None
        raw = (table.schema.metadata or {}).get(b"dass_ray.soft_labels")
        if raw is None or set(table.column_names) != {"index", "view", "logits"}:
            raise ValueError(f"{p}: not a soft-label file (columns {table.column_names})")
        meta = json.loads(raw)
        for k, v in (expect or {}).items():
            if meta.get(k) != v:
                raise ValueError(f"{p}: soft labels were computed for {k}={meta.get(k)!r}, expected {v!r}")
        n, c, v = meta["num_samples"], meta["num_classes"], len(meta["views"])
        idx = table["index"].to_numpy()
        view = table["view"].to_numpy()
        if len(idx) != n * v:
            raise ValueError(f"{p}: expected {n * v} rows ({n} samples x {v} views), found {len(idx)}")
        vals = np.asarray(table["logits"].combine_chunks().flatten().to_numpy(), dtype=np.float32).reshape(-1, c)
        out = np.full((v, n, c), np.nan, dtype=np.float32)
        out[view.astype(np.int64), idx] = vals
        if np.isnan(out).any():
            raise ValueError(f"{p}: some (sample, view) pairs are missing")
        meta.pop("views"), meta.pop("num_classes"), meta.pop("num_samples")
        return cls(torch.from_numpy(out), meta)


@torch.no_grad()
def compute_soft_labels(teacher: nn.Module, x: torch.Tensor, views: int = 2, batch_size: int = 500,
                        meta: dict | None = None, device: str | torch.device | None = "auto") -> SoftLabels:
    """Run the teacher (eval mode) once over every training image and view, on `device` (see `resolve_device`);
    the logits come back on the CPU. The teacher is left on the device it came on."""
    dev = resolve_device(device)
    home = next(teacher.parameters()).device
    teacher.eval().to(dev)
    outs = []
    try:
        for v in range(views):
            chunks = []
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size].to(dev)
                chunks.append(teacher(xb.flip(3) if v == 1 else xb).float().cpu())
            outs.append(torch.cat(chunks))
    finally:
        teacher.to(home)
    return SoftLabels(torch.stack(outs).contiguous(), dict(meta or {}))


# ----------------------------------------------------------------------------------------------------------------
# Reporting and results
# ----------------------------------------------------------------------------------------------------------------


class Reporter(Protocol):
    def report(self, metrics: dict, state: Callable[[], dict]) -> None:
        """Called after every epoch. `state()` returns a resumable training state (call it to checkpoint)."""


class ListReporter:
    """Keeps every reported metrics dict (and optionally the last state) in memory."""

    def __init__(self, keep_state: bool = False):
        self.metrics: list[dict] = []
        self.keep_state = keep_state
        self.last_state: dict | None = None

    def report(self, metrics: dict, state: Callable[[], dict]) -> None:
        self.metrics.append(dict(metrics))
        if self.keep_state:
            self.last_state = state()


@dataclass
class TrainResult:
    status: str  # "ok" | "failed"
    best_acc: float  # best validation accuracy over epochs, fraction in [0, 1]
    final_acc: float
    epochs: int  # epochs completed
    wall_s: float
    reason: str = ""
    history: list[dict] = field(default_factory=list)
    state_dict: dict | None = None  # final weights (on the CPU)
    best_state_dict: dict | None = None  # weights of the best validation epoch (on the CPU)
    device: str = "cpu"  # where it trained

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def summary(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("state_dict", "best_state_dict")}


@torch.inference_mode()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Accuracy of `model` on (x, y), batches moved to the model's device; one host sync at the end."""
    model.eval()
    dev = next(model.parameters()).device
    correct = torch.zeros((), dtype=torch.long, device=dev)
    for i in range(0, x.shape[0], batch_size):
        correct += (model(x[i:i + batch_size].to(dev)).argmax(1) == y[i:i + batch_size].to(dev)).sum()
    return int(correct) / max(1, x.shape[0])


def _to_cpu(obj):
    """Tensors anywhere inside dicts/lists/tuples moved to the CPU (portable checkpoints of a GPU run)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _cosine(total_steps: int):
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def _fit(model: nn.Module, data: TensorData, *, epochs: int, batch_size: int, lr: float, momentum: float,
         weight_decay: float, flip: bool, eval_batch_size: int, seed: int,
         loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict],
         reporter: Reporter | None, resume: dict | None, max_grad_norm: float = 0.0,
         device: str | torch.device | None = "auto", channels_last: bool = False, bf16: bool = False,
         compile: bool = False) -> TrainResult:
    """The shared SGD-Nesterov + per-step-cosine loop on `device` (`resolve_device`). loss_fn(logits, xb, yb, index,
    flips) -> loss dict, every argument on that device. The shuffling and flips are drawn on the CPU from the seed,
    so a run sees the same batches on any device; weights and states it hands out are on the CPU. `channels_last`
    / `bf16`: NHWC memory format / bfloat16 autocast for the training steps (evaluation stays fp32)."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model.to(dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=fmt)
    forward = torch.compile(model) if compile else model  # shares the parameters; evaluation uses `model`
    data = data.to(dev)
    on_cpu = dev.type == "cpu"
    n = data.x_train.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(epochs * steps_per_epoch))
    history: list[dict] = []
    best = 0.0
    best_sd = None
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        history, best, start = list(resume["history"]), float(resume["best_acc"]), int(resume["epoch"])
        best_sd = resume.get("best_model")

    def snapshot() -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def state(epoch: int) -> Callable[[], dict]:
        return lambda: {"model": snapshot(),
                        "optimizer": opt.state_dict() if on_cpu else _to_cpu(opt.state_dict()),
                        "scheduler": sched.state_dict(),
                        "history": list(history), "best_acc": best, "epoch": epoch, "best_model": best_sd}

    for epoch in range(start, epochs):
        model.train()
        g = torch.Generator().manual_seed(int(seed) * 1000003 + epoch)
        perm = torch.randperm(n, generator=g)
        flips_all = (torch.rand(n, generator=g) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
        sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in ("loss", "task_loss", "kd_loss")}
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size].to(dev)
            flips = flips_all[perm[i:i + batch_size]].to(dev)
            xb = _flip(data.x_train[idx], flips)
            if channels_last:
                xb = xb.contiguous(memory_format=fmt)
            yb = data.y_train[idx]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                losses = loss_fn(forward(xb), xb, yb, idx, flips)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                return TrainResult("failed", best, history[-1]["val_acc"] if history else 0.0, epoch,
                                   time.perf_counter() - t0,
                                   reason=f"non-finite loss ({float(loss.detach())}) at epoch {epoch}, step {i // batch_size}",
                                   history=history, device=str(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm > 0:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            sched.step()
            for k in sums:
                if k in losses:
                    sums[k] += losses[k].detach().double() * idx.numel()
        acc = evaluate(model, data.x_val, data.y_val, eval_batch_size)
        if acc > best or best_sd is None:
            best_sd = snapshot()
        best = max(best, acc)
        rec = {"epoch": epoch + 1, "val_acc": acc, "best_acc": best, **{k: float(v) / n for k, v in sums.items()},
               "lr": sched.get_last_lr()[0], "wall_s": time.perf_counter() - t0}
        history.append(rec)
        if reporter is not None:
            reporter.report(rec, state(epoch + 1))
    final = history[-1]["val_acc"] if history else 0.0
    return TrainResult("ok", best, final, epochs, time.perf_counter() - t0, history=history,
                       state_dict=snapshot(), best_state_dict=best_sd, device=str(dev))


# ----------------------------------------------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------------------------------------------


def train_teacher(space: SpaceConfig, data: TensorData, cfg: TeacherConfig, seed: int = 0,
                  reporter: Reporter | None = None, resume: dict | None = None,
                  device: str | torch.device | None = "auto") -> tuple[nn.Module, TrainResult]:
    """Train the space's teacher (its largest member) with label smoothing on `device` (`resolve_device`); returns
    (model on the CPU, result)."""
    if space.num_classes != data.num_classes:
        space = space.with_classes(data.num_classes)
    return train_model(build(space.teacher(), space, seed=seed), data, cfg, seed, reporter, resume, device)


def train_model(model: nn.Module, data: TensorData, cfg: TeacherConfig, seed: int = 0,
                reporter: Reporter | None = None, resume: dict | None = None,
                device: str | torch.device | None = "auto") -> tuple[nn.Module, TrainResult]:
    """Train any classifier `model` (logits over `data`'s classes) with the teacher recipe `cfg`: label-smoothed
    cross-entropy, the shared SGD loop. Returns (model on the CPU in eval mode, result)."""

    def loss_fn(logits, xb, yb, idx, flips):
        return {"loss": F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)}

    res = _fit(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
               weight_decay=cfg.weight_decay, flip=cfg.flip, eval_batch_size=cfg.eval_batch_size, seed=seed,
               loss_fn=loss_fn, reporter=reporter, resume=resume, device=device)
    return model.cpu().eval(), res


def train_proxy(space: SpaceConfig, data: TensorData, soft: SoftLabels, cfg: TeacherConfig, kd: KDConfig,
                seed: int = 0, reporter: Reporter | None = None, resume: dict | None = None,
                device: str | torch.device | None = "auto") -> tuple[nn.Module, TrainResult]:
    """A proxy teacher: the space's largest member (the remapping family's teacher), trained from scratch on `data`
    to match a foreign teacher's cached logits `soft` (KD loss at kd.alpha / kd.temperature, the teacher's schedule
    `cfg`). DaSS ranks students with the proxy (its weights are remapped into them); they are then distilled from the
    foreign teacher itself. Returns (model on the CPU in eval mode, result)."""
    if space.num_classes != data.num_classes:
        space = space.with_classes(data.num_classes)
    if soft.logits.shape[1:] != (data.x_train.shape[0], data.num_classes):
        raise ValueError(f"soft labels of shape {tuple(soft.logits.shape)} (views, images, classes) for "
                         f"{data.x_train.shape[0]} images of {data.num_classes} classes")
    model = build(space.teacher(), space, seed=seed)
    dev = resolve_device(device)
    logits = SoftLabels(soft.logits.to(dev), soft.meta)

    def loss_fn(out, xb, yb, idx, flips):
        return kd_loss(out, logits.lookup(idx, flips), yb, kd.alpha, kd.temperature)

    res = _fit(model, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
               weight_decay=cfg.weight_decay, flip=cfg.flip and soft.num_views > 1,
               eval_batch_size=cfg.eval_batch_size, seed=seed, loss_fn=loss_fn, reporter=reporter, resume=resume,
               max_grad_norm=kd.max_grad_norm, device=dev)
    return model.cpu().eval(), res


@dataclass
class TeacherCheckpoint:
    state_dict: dict
    space: SpaceConfig
    arch: ArchConfig
    val_acc: float
    class_names: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def model(self) -> nn.Module:
        m = build(self.arch, self.space)
        m.load_state_dict(self.state_dict)
        return m.eval()

    def digest(self) -> str:
        """Identifies the weights (sha256 over tensors in key order)."""
        h = hashlib.sha256()
        for k in sorted(self.state_dict):
            h.update(k.encode())
            h.update(self.state_dict[k].detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def atomic_torch_save(blob: dict, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a reader never sees a half-written checkpoint."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(blob, buf)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(p)


def round_half(state_dict: dict) -> dict:
    """Floating tensors rounded to float16 and back (what a `half=True` checkpoint stores)."""
    return {k: (v.detach().cpu().half().float() if v.is_floating_point() else v.detach().cpu().clone())
            for k, v in state_dict.items()}


def save_teacher(path: str | Path, model: nn.Module, space: SpaceConfig, val_acc: float,
                 class_names, meta: dict | None = None, arch: ArchConfig | None = None, half: bool = False) -> None:
    """Write a teacher checkpoint. `half=True` stores floating weights as float16 (half the bytes); callers that
    need bit-identical behaviour after loading should use `round_half(state_dict)` themselves first."""
    arch = arch or space.teacher()
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    blob = {"format": "dass_ray.teacher/1", "space": space.to_dict(), "arch": arch.to_dict(),
            "state_dict": sd,
            "val_acc": float(val_acc), "class_names": list(class_names), "meta": dict(meta or {})}
    atomic_torch_save(blob, path)


def load_teacher(path: str | Path) -> TeacherCheckpoint:
    """Load a checkpoint written by `save_teacher`; a wrong or corrupt file gives a ValueError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: teacher checkpoint not found")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's unpickler answers a foreign or corrupt file with many exception types
        raise ValueError(f"{p}: not a readable teacher checkpoint (expected a file written by "
                         f"scripts/train_teacher.py)") from e
    if not isinstance(blob, dict) or blob.get("format") != "dass_ray.teacher/1":
        raise ValueError(f"{p}: not a dass_ray teacher checkpoint (missing format 'dass_ray.teacher/1')")
    try:
        space = SpaceConfig.from_dict(blob["space"])
        arch = space.validate(ArchConfig.from_dict(blob["arch"]))
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in blob["state_dict"].items()}
        ck = TeacherCheckpoint(sd, space, arch, float(blob["val_acc"]),
                               tuple(blob["class_names"]), blob.get("meta", {}))
        ck.model()  # checks keys and shapes
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError) as e:
        what = f"missing entry {e}" if isinstance(e, KeyError) else "weights that do not fit its architecture"
        raise ValueError(f"{p}: invalid teacher checkpoint ({what})") from e
    if len(ck.class_names) != space.num_classes:
        raise ValueError(f"{p}: {len(ck.class_names)} class names for a {space.num_classes}-class head")
    return ck


# ----------------------------------------------------------------------------------------------------------------
# KD
# ----------------------------------------------------------------------------------------------------------------


def init_student(arch: ArchConfig, space: SpaceConfig, teacher_sd: dict, teacher_arch: ArchConfig | None,
                 scheme: str = "first_k", seed: int = 0) -> nn.Module:
    student = build(arch, space, seed=seed)
    sd = remap(teacher_sd, teacher_arch or space.teacher(), arch, space, scheme=scheme, seed=seed)
    student.load_state_dict(sd)
    return student


KD_START_IMAGES = 1000  # the most training images `kd_start_loss` is taken over (the meta-dataset's tasks have <= 1000)


def kd_start_images(n: int, max_images: int = KD_START_IMAGES, seed: int = 0) -> torch.Tensor:
    """Indices (sorted) of the training images the starting KD loss is taken over: all of them up to `max_images`,
    else a seeded sample of that many."""
    if n <= max_images:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values


@torch.no_grad()
def kd_start_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor, cfg: KDConfig,
                  batch_size: int = 500) -> float:
    """The KD loss (`kd_loss` at cfg.alpha, cfg.temperature) of `student` as it is, BN in eval mode, against the
    teacher's logits [V, N, C] for V views (0: identity, 1: horizontal flip, as `SoftLabels`) of the N images `x`
    with labels `y`: for a student fresh from `init_student`, the loss distillation starts from. A proxy that
    `scripts/evaluate.py` reports as `kd_start`: under a weak teacher a lower starting loss went with a better student
    on the meta-training and meta-validation tasks, and not on the meta-test ones (artifacts/weak_signals)."""
    if teacher_logits.dim() != 3 or teacher_logits.shape[1] != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"kd_start_loss: teacher logits {tuple(teacher_logits.shape)} (views, images, classes) for "
                         f"{x.shape[0]} images and {y.shape[0]} labels")
    student.eval()
    dev = next(student.parameters()).device
    total, n = 0.0, 0
    for v in range(teacher_logits.shape[0]):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev)
            logits = student(xb.flip(3) if v == 1 else xb)
            loss = kd_loss(logits, teacher_logits[v, i:i + batch_size].to(dev), y[i:i + batch_size].to(dev),
                           cfg.alpha, cfg.temperature)["loss"]
            total += float(loss) * xb.shape[0]
            n += xb.shape[0]
    return total / max(1, n)


FAST_LAYOUT_FROM = 64  # image side from which KD steps run channels-last (benchmarks/bench_kd.py --image-size)


def kd_recipe(cfg: KDConfig, image_size: int) -> KDConfig:
    """The KD recipe at `image_size`: from `FAST_LAYOUT_FROM` pixels on, channels-last training steps (a layout
    change only: measured ~2x faster on CPU at 64 px, the same accuracy; below it, slower)."""
    if image_size >= FAST_LAYOUT_FROM and not cfg.channels_last:
        return dataclasses.replace(cfg, channels_last=True)
    return cfg


def train_kd(arch: ArchConfig, space: SpaceConfig, teacher_sd: dict, data: TensorData, cfg: KDConfig,
             seed: int = 0, soft: SoftLabels | None = None, teacher: nn.Module | None = None,
             teacher_arch: ArchConfig | None = None, reporter: Reporter | None = None,
             resume: dict | None = None, device: str | torch.device | None = "auto") -> TrainResult:
    """Distil the teacher into `arch` (initialised by remapping `teacher_sd`) on `device` (`resolve_device`).

    Teacher logits come from `soft` (cached, the fast path) or from `teacher` run in the loop (the naive path).
    """
    if soft is None and teacher is None:
        raise ValueError("train_kd needs cached soft labels or a teacher module")
    if space.num_classes != data.num_classes:
        raise ValueError(f"the space has a {space.num_classes}-class head; the data has {data.num_classes} classes")
    if soft is not None and soft.logits.shape[1] != data.x_train.shape[0]:
        raise ValueError(f"soft labels cover {soft.logits.shape[1]} samples; the training set has "
                         f"{data.x_train.shape[0]}")
    student = init_student(arch, space, teacher_sd, teacher_arch, cfg.remap, seed)
    dev = resolve_device(device)
    if soft is not None:
        soft = SoftLabels(soft.logits.to(dev), soft.meta)

    def loss_fn(logits, xb, yb, idx, flips):
        if soft is not None:
            t_logits = soft.lookup(idx, flips)
        else:
            with torch.no_grad():
                t_logits = teacher(xb)
        return kd_loss(logits, t_logits, yb, cfg.alpha, cfg.temperature)

    home = next(teacher.parameters()).device if teacher is not None else None
    if teacher is not None:
        teacher.eval().to(dev)
    try:
        return _fit(student, data, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                    weight_decay=cfg.weight_decay, flip=cfg.flip, eval_batch_size=cfg.eval_batch_size, seed=seed,
                    loss_fn=loss_fn, reporter=reporter, resume=resume, max_grad_norm=cfg.max_grad_norm, device=dev,
                    channels_last=cfg.channels_last, bf16=cfg.bf16, compile=cfg.compile)
    finally:
        if teacher is not None:
            teacher.to(home)
