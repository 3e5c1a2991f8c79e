"""Every knob of one training scale in one place (docs/method.md, section 7): the scaled-down CPU recipe is
spelled out here once rather than spread over the scripts.

`SCALES["cpu"]` is what the shipped teacher, meta-dataset, predictor and `make run` use; `SCALES["tiny"]` is for
tests (seconds); `SCALES["paper"]` records the authors' recipe for reference. Nothing else in the package hard-codes
an epoch count, subset size or learning rate: scripts take a scale name and optionally override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KDConfig:
    """Student distillation: loss (1-a) T^2 softCE(s/T, t/T) + a CE(s, y); SGD Nesterov, cosine per step."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 3e-5
    alpha: float = 0.5  # weight of the hard-label CE term
    temperature: float = 6.0
    flip: bool = True  # random horizontal flips; the cache stores the teacher's logits for both views
    remap: str = "first_k"  # student initialisation (remap.schemes())
    eval_batch_size: int = 500
    max_grad_norm: float = 0.0  # 0: no clipping
    # Training-step speedups (benchmarks/bench_kd.py measures them; evaluation always runs in fp32, contiguous):
    channels_last: bool = False  # NHWC activations and weights
    bf16: bool = False  # bfloat16 autocast of forward and loss (CPUs with AVX512-BF16/AMX, GPUs)
    compile: bool = False  # torch.compile the training forward (needs a C++ compiler on CPU; slow first epoch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TeacherConfig:
    """Teacher training: SGD Nesterov, cosine per step, label smoothing."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    flip: bool = True
    eval_batch_size: int = 500

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScaleConfig:
    """One scale: search-space preset, task sizes, teacher and KD recipes, meta-learning schedule."""

    name: str
    space: str  # a space.PRESETS name
    classes_per_task: int
    train_per_class: int
    val_per_class: int
    teacher: TeacherConfig
    kd: KDConfig
    students_per_task: int = 40
    students_per_test_task: int = 50
    noise_ceiling_students: int = 20
    meta_episodes: int = 300
    meta_lr: float = 5e-4
    meta_inner_lr: float = 0.005
    meta_query_size: int = 50
    meta_eval_every: int = 10
    threads_per_run: int = 1  # torch threads per KD run (Ray runs one per CPU)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return d

    def replace(self, **kw) -> "ScaleConfig":
        """A copy with fields replaced; `kd=`/`teacher=` may be dicts of their fields to change."""
        for k in ("kd", "teacher"):
            if isinstance(kw.get(k), dict):
                kw[k] = dataclasses.replace(getattr(self, k), **kw[k])
        return dataclasses.replace(self, **kw)


SCALES: dict[str, ScaleConfig] = {
    # CPU scale: 32x32, 5-class tasks of 200 train / 100 val images per class. One student KD run ~10 s on one core.
    "cpu": ScaleConfig(
        name="cpu", space="cpu", classes_per_task=5, train_per_class=200, val_per_class=100,
        teacher=TeacherConfig(epochs=10), kd=KDConfig(epochs=3),
    ),
    # Tests: the same space, a handful of images, one epoch.
    "tiny": ScaleConfig(
        name="tiny", space="cpu", classes_per_task=3, train_per_class=20, val_per_class=10,
        teacher=TeacherConfig(epochs=1, batch_size=32), kd=KDConfig(epochs=1, batch_size=32),
        students_per_task=3, students_per_test_task=3, noise_ceiling_students=2,
        meta_episodes=4, meta_query_size=3, meta_eval_every=2,
    ),
    # The authors' recipe at 64x64 (reference; far beyond a 2-core budget).
    "paper": ScaleConfig(
        name="paper", space="paper", classes_per_task=40, train_per_class=450, val_per_class=50,
        teacher=TeacherConfig(epochs=100), kd=KDConfig(epochs=50), students_per_task=200,
        students_per_test_task=200, meta_episodes=1000,
    ),
}


def get_scale(name: str) -> ScaleConfig:
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; known: {sorted(SCALES)}")
    return SCALES[name]
