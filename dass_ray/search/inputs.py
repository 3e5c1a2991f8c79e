"""Checking a search's inputs before any Ray work: `prepare(SearchConfig) -> Prepared` or `InputError` with a
one-line reason (exit code 2 in the CLI)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dass_ray.core.config import ScaleConfig, get_scale
from dass_ray.core.data import DatasetError, bundled_path
from dass_ray.core.foreign import ForeignError, ForeignTask, TeacherOptions, is_foreign_spec, load_foreign
from dass_ray.core.kd import TeacherCheckpoint, TensorData, kd_recipe, load_teacher
from dass_ray.core.meta import MetaSGD, load_predictor
from dass_ray.core.ranking import near_chance
from dass_ray.core.space import SpaceConfig, get_space
from dass_ray.core.tasks import dataset_task
from dass_ray.fileutil import resolve_storage
from dass_ray import contract as C
from dass_ray.contract import RequestError, SearchRequest

DEFAULT_TEACHER, DEFAULT_PREDICTOR = Path(C.DEFAULT_TEACHER), Path(C.DEFAULT_PREDICTOR)


class InputError(ValueError):
    """Bad user input, detected before any Ray work."""


@dataclass(frozen=True)
class SearchConfig(SearchRequest):
    """A `SearchRequest` (the contract's knobs) plus where and how this process runs it."""

    output: str = "runs/search"
    address: str | None = None  # Ray cluster address; None: start a local Ray
    resume: bool = False
    num_cpus: int | None = None  # CPUs of a local Ray instance (None: all)
    data_root: str | None = None
    # Where KD-trial checkpoints go (Tune's storage_path): a directory every node can reach (NFS/EFS mount) or a
    # URI (s3://, gs://, file://). None: $DASS_RAY_STORAGE, else <output>/tune (enough on one machine).
    storage: str | None = None
    history: str | None = None  # append the distilled students to this search history (dass_ray.search.history)
    job_id: str | None = None  # the service's job id, recorded with the history rows
    # where a foreign teacher's soft labels and proxy are cached by content digest (None: $DASS_RAY_CACHE, else
    # <output>/cache); docs/teachers.md
    cache: str | None = None



@dataclass
class Prepared:
    cfg: SearchConfig
    scale: ScaleConfig
    space: SpaceConfig
    data: TensorData  # at the space's size: what the teacher's soft labels, the ranking and the proxy see
    teacher: TeacherCheckpoint | None  # None: train one
    predictor: MetaSGD
    out: Path
    predictor_meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's training manifest
    kd_data: TensorData | None = None  # the same split at `image_size`: what students are distilled/exported at
    foreign: ForeignTask | None = None  # a foreign teacher (TorchScript, ONNX, timm, torchvision) and its images

    def __post_init__(self):
        if self.kd_data is None:
            self.kd_data = self.data

    @property
    def image_size(self) -> int:
        """Side in pixels of the students' distillation, evaluation and export."""
        return int(self.kd_data.x_train.shape[-1])

    @property
    def deploy_space(self) -> SpaceConfig:
        """The space at `image_size`: FLOPs budgets, the candidates' and the teacher's FLOPs are those of one forward
        pass at the size the student is exported at (the ranking itself runs at `space.image_size`)."""
        return dataclasses.replace(self.space, image_size=self.image_size)


def choose_image_size(native: tuple[int, int], requested: int, cap: int, space: SpaceConfig) -> int:
    """The side students are distilled at: `requested` when given (a multiple of the space's total downsampling,
    at least its ranking size), else the images' native side (the smaller of H, W) capped at `cap`, never below the
    space's size, rounded down to a multiple of the downsampling."""
    step, base = space.downsample, space.image_size
    if requested:
        if requested < base or requested % step:
            raise InputError(f"--image-size: must be a multiple of {step} and at least {base} (the predictor's "
                             f"size), got {requested}")
        return int(requested)
    cap = cap or C.FIELDS_BY_NAME["max_image_size"].default
    if cap < base:
        raise InputError(f"--max-image-size: must be at least {base} (the predictor's size), got {cap}")
    side = max(base, min(min(native), cap))
    return int(side - side % step)


def _dataset_path(s: str) -> str:
    p = Path(s)
    if not p.exists():
        try:
            return str(bundled_path(s))
        except Exception:
            raise InputError(f"--dataset: {s} does not exist (a Parquet/.npz file, an ImageFolder directory, "
                             f"or a bundled name: mnist5k, omniglot_small)") from None
    return s


def prepare(cfg: SearchConfig) -> Prepared:
    """Check every input; raise InputError with a one-line reason. No Ray work happens here."""
    try:
        cfg.validate()
    except RequestError as e:
        raise InputError(f"--{e.field.replace('_', '-')}: {e}") from None
    scale = get_scale(cfg.scale)
    if cfg.kd_epochs:
        scale = scale.replace(kd={"epochs": cfg.kd_epochs})
    if cfg.remap:  # the distilled students' initialisation; the predictor's embeddings keep the scale's scheme
        scale = scale.replace(kd={"remap": cfg.remap})
    ds_path = _dataset_path(cfg.dataset)
    teacher = None
    foreign_spec = cfg.teacher != "train" and is_foreign_spec(cfg.teacher)
    if cfg.teacher != "train" and not foreign_spec:
        _no_foreign_options(cfg)
        try:
            teacher = load_teacher(cfg.teacher)
        except ValueError as e:
            hint = ("; TorchScript and ONNX teachers are recognised by their content"
                    if Path(cfg.teacher).is_file() else "")
            raise InputError(f"--teacher: {e}{hint}") from None
    try:
        pick = (lambda names: C.resolve_classes(cfg.classes, names)) if cfg.classes else None
        space0 = get_space(scale.space)
        task, data, kd_data = dataset_task(
            ds_path, scale, cfg.seed, cfg.data_root, pick_classes=pick,
            image_size=lambda hw: choose_image_size(hw, cfg.image_size, cfg.max_image_size, space0))
    except InputError:
        raise
    except RequestError as e:
        raise InputError(f"--classes: {e}") from None
    except (DatasetError, ValueError) as e:
        raise InputError(f"--dataset: {e}") from None
    space = get_space(scale.space, data.num_classes)
    size = int(kd_data.x_train.shape[-1])  # the students' side (`Prepared.image_size`)
    foreign = _foreign(cfg, task, data) if foreign_spec else None
    if teacher is not None:
        if teacher.space.num_classes != data.num_classes:
            what = "--classes names" if cfg.classes else f"the dataset {ds_path} has"
            raise InputError(f"--teacher: its head has {teacher.space.num_classes} classes but {what} "
                             f"{data.num_classes}")
        if dataclasses.replace(teacher.space, num_classes=space.num_classes) != space:
            raise InputError(f"--teacher: it was trained in space {teacher.space.name!r} "
                             f"({teacher.space.image_size}px); this search uses {space.name!r}")
    try:
        dataclasses.replace(space, image_size=size).check_budget(  # FLOPs at the size it is exported at
            max_flops=cfg.max_flops or None, max_params=cfg.max_params or None)
    except ValueError as e:
        raise InputError(f"budget: {e}") from None
    pred_path = cfg.predictor
    if pred_path == "latest":  # the newest retrained version of this user's history (scripts/retrain.py)
        if not cfg.history:
            raise InputError("--predictor latest: needs --history (the history whose retrained predictor to use)")
        from dass_ray.search.history import latest_predictor

        pred_path = str(latest_predictor(cfg.history) or DEFAULT_PREDICTOR)
    try:
        predictor, blob = load_predictor(pred_path, space)
    except ValueError as e:
        raise InputError(f"--predictor: {e}") from None
    out = Path(cfg.output)
    try:
        cfg = dataclasses.replace(cfg, storage=resolve_storage(cfg.storage, out / "tune"))
    except ValueError as e:
        raise InputError(f"--storage: {e}") from None
    if out.exists() and any(out.iterdir()) and not cfg.resume:
        raise InputError(f"--output {out} is not empty; pass --resume to continue that search or use a new directory")
    if kd_recipe(scale.kd, size) != scale.kd:
        scale = scale.replace(kd=kd_recipe(scale.kd, size))
    return Prepared(cfg, scale, space, data, teacher, predictor, out, dict(blob.get("meta") or {}), kd_data,
                    foreign=foreign)


def _no_foreign_options(cfg: SearchConfig) -> None:
    """A foreign teacher's options given with a teacher that takes none."""
    for name in ("teacher_weights", "teacher_image_size", "teacher_mean", "teacher_std"):
        if getattr(cfg, name):
            raise InputError(f"--{name.replace('_', '-')}: only for a foreign teacher (a TorchScript or ONNX file, "
                             f"timm:<name> or torchvision:<name>; docs/teachers.md), not {cfg.teacher!r}")


def _foreign(cfg: SearchConfig, task, data: TensorData) -> ForeignTask:
    """Load and check the foreign teacher on the task's own images (uint8, native size): it runs them at its own
    input size and normalisation (`dass_ray.core.foreign`)."""
    from dass_ray.core.data import load_dataset
    from dass_ray.core.tasks import load_task_data

    try:
        tr, va = load_task_data(task, load_dataset(task.path))
    except (DatasetError, ValueError) as e:
        raise InputError(f"--dataset: {e}") from None
    opts = TeacherOptions(cfg.teacher_weights, cfg.teacher_image_size, cfg.teacher_mean, cfg.teacher_std)
    try:
        t = load_foreign(cfg.teacher, opts, data.num_classes, tuple(tr.image_size), probe=tr.images[:2])
    except ForeignError as e:
        raise InputError(e.line()) from None
    return ForeignTask(t, tr.images, va.images, data.y_val.clone())


def near_chance_teacher_warning(teacher_acc: float, num_classes: int) -> str | None:
    """A warning when the teacher is near chance (`dass_ray.core.ranking.near_chance`): on meta-training tasks with
    such teachers the predicted order was barely better than chance, so the top-k are not likely the best."""
    if not near_chance(teacher_acc, num_classes):
        return None
    return (f"teacher accuracy {teacher_acc:.3f} is near chance ({1.0 / num_classes:.3f} for {num_classes} classes): "
            f"under such teachers no student ranking was reliable on the meta-training tasks "
            f"(docs/method-history.md, 'More near-chance teachers'); distil more candidates (--top-k) or bring a "
            f"better-trained teacher")


def teacher_warnings(teacher_acc: float, num_classes: int, predictor_meta: dict,
                     foreign_acc: float | None = None) -> list[str]:
    """The search's warnings about its teacher. `teacher_acc`: the teacher that ranks (a foreign teacher's proxy);
    `foreign_acc`: a foreign teacher's own accuracy -- the students learn from it, so near chance is judged on the
    lower of the two."""
    low = teacher_acc if foreign_acc is None else min(teacher_acc, foreign_acc)
    return [w for w in (teacher_range_warning(teacher_acc, predictor_meta),
                        near_chance_teacher_warning(low, num_classes)) if w]


def teacher_range_warning(teacher_acc: float, predictor_meta: dict) -> str | None:
    """A warning when the teacher's accuracy lies outside the range of the predictor's meta-training teachers:
    the teacher-guided adaptation step is then skipped (`MetaSGD.gated`: one step on such a teacher inverted the
    ranking of the 16%-accuracy Omniglot teacher), and the ranking is the unadapted predictor's."""
    rng = predictor_meta.get("train_teacher_acc_range")
    if not rng or rng[0] <= teacher_acc <= rng[1]:
        return None
    mode = predictor_meta.get("adaptation", "gate")
    if mode == "none":
        return None  # this predictor never takes the step
    if mode in ("step", "clip"):
        return (f"teacher accuracy {teacher_acc:.3f} is outside the range of the predictor's meta-training teachers "
                f"({rng[0]:.2f}-{rng[1]:.2f}): its adaptation ({mode}) takes the teacher-guided step anyway; the "
                f"ranking may be less reliable than on teachers like the meta-training ones")
    return (f"teacher accuracy {teacher_acc:.3f} is outside the range of the predictor's meta-training teachers "
            f"({rng[0]:.2f}-{rng[1]:.2f}): ranking without the teacher-guided adaptation step; --readapt adapts on "
            f"the measured students instead")
