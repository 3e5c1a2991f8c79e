"""The search contract, in one place: what a search takes, the stages it reports, what it leaves behind.

Ray-free and torch-free (the client and the server import it). Everything that used to be copied by hand derives
from the tables here:

- `SearchRequest`: every per-search knob with its default and its validation. `REQUEST_FIELDS` is the one table
  from which `scripts/search.py`'s options (`add_request_arguments`), a job's argv (`SearchRequest.to_argv`) and
  the mapping to and from `SubmitSearchRequest` (`request_from_proto`, `request_to_proto`) are derived.
- `STAGES`: the stage names, used by the search's event log, the job table's `stage` and `timings_s` keys.
- `ARTIFACTS`: the files a successful search leaves in its output directory.
- `SearchResult`: the typed, versioned `result.json` that the search writes and the server and client read.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------------------------
# Stages, artifacts, files
# ---------------------------------------------------------------------------------------------------------------

# The search's stages, in order. "queued", "started" and "resumed" are the service's own (before the search
# runs, and when a lost search is launched again); "done", "failed", "cancelled" are terminal.
SEARCH_STAGES = ("validate", "teacher", "embed", "score", "kd", "export")
RETRAIN_STAGES = ("load", "retrain")  # a predictor retrain job's (`scripts/retrain.py --output`)
SERVICE_STAGES = ("queued", "started", "resumed")
TERMINAL_STAGES = ("done", "failed", "cancelled")
SEARCH_TERMINAL = ("done", "failed")  # what a search itself ends with ("cancelled" is the service's)
STAGES = SERVICE_STAGES + SEARCH_STAGES + RETRAIN_STAGES + TERMINAL_STAGES
# `timings_s` keys: the search stages that take time ("embed" overlaps "score": both are counted in "score").
TIMED_STAGES = ("teacher", "score", "kd", "export")

EVENTS_FILE = "events.jsonl"
RESULT_FILE = "result.json"
RETRAIN_FILE = "retrain.json"  # a retrain job's result: the new predictor version's manifest
# artifact kind (the proto's ArtifactKind without its prefix, lower case) -> file name
ARTIFACTS = {"torchscript": "student.torchscript.pt", "onnx": "student.onnx", "torch_export": "student.pt2",
             "weights": "student.pt", "report": "report.png", "candidates": "candidates.parquet",
             "trials": "trials.parquet"}
# The formats the student is exported in (`SearchResult.exports`; file names as in ARTIFACTS)
EXPORT_FORMATS = ("torchscript", "onnx", "torch_export")

# The remapping schemes (dass_ray.core.remap.schemes(); a test keeps the two equal) and scale names
# (dass_ray.core.config.SCALES), listed here so that validation needs no torch.
REMAP_SCHEMES = ("first_k", "last_k", "uniform", "random")
SCALE_SPACES = {"cpu": "cpu", "tiny": "cpu", "paper": "paper"}  # scale -> the search space it searches
SCALE_NAMES = tuple(SCALE_SPACES)
# The orders a search distils its candidates in, and the default (dass_ray.core.ranking.ORDERS / DEFAULT_ORDER; a
# test keeps them equal).
ORDERS = ("posterior", "dass_size", "dass")
DEFAULT_ORDER = "posterior"

_PACKAGE = Path(__file__).resolve().parent
DEFAULT_TEACHER = str(_PACKAGE / "assets" / "teachers" / "mnist5k_cpu.pt")
DEFAULT_PREDICTOR = str(_PACKAGE / "assets" / "predictor" / "cpu.pt")


class RequestError(ValueError):
    """A request no search can run with; `field` names the request field (as in the proto)."""

    def __init__(self, field_name: str, message: str, *, over_cap: bool = False):
        super().__init__(message)
        self.field = field_name
        self.over_cap = over_cap  # valid in itself, but over the server's limit (RESOURCE_EXHAUSTED)


# ---------------------------------------------------------------------------------------------------------------
# The request
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One per-search knob. `lo`/`hi`: inclusive bounds any search enforces (a typo such as 2^31-1 candidates is
    refused even from the command line); a server may cap lower (`Caps`). `zero`: what 0 / "" means, when it
    means "let the search decide" (the proto has no "unset" for scalars)."""

    name: str
    type: type
    default: Any
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    proto: str | None = None  # path in SubmitSearchRequest; None: not settable through the service
    zero: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


REQUEST_FIELDS: tuple[Field, ...] = (
    Field("dataset", str, "mnist5k", "Parquet file (image/label/label_name columns), ImageFolder directory, .npz "
          "(images, labels[, class_names]) or a bundled name"),
    Field("teacher", str, DEFAULT_TEACHER, "teacher: a checkpoint (scripts/train_teacher.py), any classifier as a "
          "TorchScript or ONNX file (recognised by content), timm:<name> / torchvision:<name> with "
          "--teacher-weights, or 'train' to train one on the dataset first (default: the shipped MNIST teacher); "
          "docs/teachers.md"),
    # a foreign teacher's (docs/teachers.md): its weights file, and its own input size and normalisation
    Field("teacher_weights", str, "", "state dict of a timm:<name> / torchvision:<name> teacher (its head has the "
          "dataset's classes)", zero="none"),
    Field("teacher_image_size", int, 0, "input side in pixels of a foreign teacher", lo=0, hi=1024,
          proto="teacher_image_size", zero="timm's pretrained_cfg, an ONNX file's fixed input, else the dataset's "
          "native size (at most 224)"),
    Field("teacher_mean", str, "", "per-channel mean a foreign teacher normalises with (one number or three, "
          "comma-separated, for images in 0..1)", proto="teacher_mean",
          zero="timm's pretrained_cfg, else ImageNet's for timm/torchvision, 0.5 for TorchScript/ONNX"),
    Field("teacher_std", str, "", "per-channel std of a foreign teacher's normalisation (as --teacher-mean)",
          proto="teacher_std", zero="as --teacher-mean"),
    Field("predictor", str, DEFAULT_PREDICTOR, "meta-trained predictor checkpoint, or 'latest': the newest version "
          "retrained on --history (scripts/retrain.py; the shipped one until there is one)", proto="predictor",
          zero="the shipped predictor"),
    Field("classes", tuple, (), "search only these classes of the dataset (comma-separated names or label "
          "numbers; the teacher's head must have that many classes)", proto="classes", zero="all classes"),
    Field("max_flops", int, 0, "budget: FLOPs of one forward pass on one image (a multiply-add counts 2)",
          lo=0, hi=10**15, proto="budget.max_flops", zero="no limit"),
    Field("max_params", int, 0, "budget: parameters (weights, biases, BN affine)", lo=0, hi=10**12,
          proto="budget.max_params", zero="no limit"),
    Field("candidates", int, 2000, "candidates sampled and scored by the predictor (N)", lo=1, hi=1_000_000,
          proto="candidates", zero="default"),
    Field("top_k", int, 5, "top-predicted candidates really distilled (K <= N)", lo=1, hi=10_000, proto="top_k",
          zero="default"),
    Field("kd_epochs", int, 0, "KD epochs per distilled candidate", lo=0, hi=1000, proto="kd_epochs",
          zero="the scale's"),
    Field("seed", int, 0, "seed of sampling, data split and KD", lo=0, hi=2**32 - 1, proto="seed"),
    Field("scale", str, "cpu", "training scale: cpu, or tiny (seconds, for tests)", choices=SCALE_NAMES,
          proto="scale", zero="default"),
    Field("remap", str, "", "how a student inherits the teacher's weights", choices=REMAP_SCHEMES, proto="remap",
          zero="the scale's (first_k)"),
    Field("order", str, "", "the order candidates are distilled in: posterior (each next one from the posterior "
          "given every student measured so far, the predictor's scores as the prior), dass_size (the predictor's "
          "ranking blended with parameter count when the teacher is well above chance, fixed in advance) or dass "
          "(the predictor's scores alone)", choices=ORDERS, proto="order", zero=DEFAULT_ORDER),
    Field("stop_probability", float, 0.0, "stop early once the posterior probability that any untried candidate "
          "beats the best measured one by more than 0.5 points falls below this", lo=0.0, hi=1.0,
          proto="stop_probability", zero="never stop early"),
    Field("image_size", int, 0, "side in pixels the chosen students are distilled, evaluated and exported at "
          "(a multiple of 8, >= 32); candidates are still ranked at the predictor's 32", lo=0, hi=1024,
          proto="image_size", zero="the dataset's native size, capped by --max-image-size"),
    Field("max_image_size", int, 64, "cap on the automatic --image-size (KD cost grows with its square)", lo=0,
          hi=1024, proto="max_image_size", zero="default"),
    Field("readapt", bool, False, "re-adapt the predictor on the teacher + measured students after each KD trial "
          "and re-rank the remaining candidates", proto="readapt"),
    Field("asha", bool, False, "ASHA early stopping of weak KD trials", proto="asha"),
    Field("max_concurrent", int, 0, "KD trials at once", lo=0, hi=4096, proto="max_concurrent",
          zero="the CPUs the cluster has or can autoscale to"),
    Field("encoders", int, 2, "encoder actors (E) embedding candidates", lo=1, hi=1024, proto="encoders",
          zero="default"),
    Field("predictors", int, 1, "predictor replicas (P); on a GPU when there is one", lo=1, hi=1024,
          proto="predictors", zero="default"),
    Field("batch_size", int, 256, "candidates per encoder call", lo=1, hi=65536, proto="batch_size", zero="default"),
)
FIELDS_BY_NAME = {f.name: f for f in REQUEST_FIELDS}


class _Request:
    """The methods of `SearchRequest` (whose fields, defaults and types are `REQUEST_FIELDS`)."""

    def validate(self) -> "SearchRequest":
        """Raise RequestError naming the field for a value no search runs with; returns self."""
        for f in REQUEST_FIELDS:
            v = getattr(self, f.name)
            if f.type is int:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise RequestError(f.name, f"{f.name} must be an integer, got {v!r}")
                if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):  # bounds written out
                    raise RequestError(f.name, f"{f.name} must be in [{int(f.lo)}, {int(f.hi)}]"
                                       + (f" (0: {f.zero})" if f.lo == 0 and f.zero else "") + f", got {v}")
            elif f.type is float:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                    raise RequestError(f.name, f"{f.name} must be a number, got {v!r}")
                if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
                    raise RequestError(f.name, f"{f.name} must be in [{f.lo:g}, {f.hi:g}]"
                                       + (f" (0: {f.zero})" if f.lo == 0 and f.zero else "") + f", got {v}")
            elif f.type is bool and not isinstance(v, bool):
                raise RequestError(f.name, f"{f.name} must be true or false, got {v!r}")
            elif f.type is str:
                if not isinstance(v, str):
                    raise RequestError(f.name, f"{f.name} must be a string, got {v!r}")
                if f.choices and v and v not in f.choices:
                    raise RequestError(f.name, f"unknown {f.name} {v!r}; known: {', '.join(f.choices)}")
            elif f.type is tuple:
                if not isinstance(v, tuple) or not all(isinstance(c, str) and c.strip() for c in v):
                    raise RequestError(f.name, f"{f.name} must be a list of non-empty names, got {v!r}")
                if len(set(v)) != len(v):
                    raise RequestError(f.name, f"{f.name} lists a class twice: {', '.join(v)}")
                if len(v) == 1:
                    raise RequestError(f.name, f"{f.name}: a search needs at least 2 classes, got {v[0]!r}")
        if not self.dataset:
            raise RequestError("dataset", "a dataset is required")
        if not self.teacher:
            raise RequestError("teacher", "a teacher is required (a checkpoint, or 'train')")
        if self.top_k > self.candidates:
            raise RequestError("top_k", f"top_k ({self.top_k}) must not exceed candidates ({self.candidates})")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchRequest":
        """From `to_dict` (unknown keys are an error: a request must not silently lose a knob)."""
        unknown = sorted(set(d) - set(FIELDS_BY_NAME))
        if unknown:
            raise RequestError(unknown[0], f"unknown search request field(s): {', '.join(unknown)}")
        d = dict(d)
        if "classes" in d:
            d["classes"] = tuple(d["classes"] or ())
        return cls(**d)

    def replace(self, **kw) -> "SearchRequest":
        return dataclasses.replace(self, **kw)

    def to_argv(self) -> list[str]:
        """`scripts/search.py` options for this request (only those that differ from the defaults)."""
        argv: list[str] = []
        for f in REQUEST_FIELDS:
            v = getattr(self, f.name)
            if v == f.default:
                continue
            if f.type is bool:
                argv.append(f.flag)
            elif f.type is tuple:
                argv += [f.flag, ",".join(v)]
            else:
                argv += [f.flag, str(v)]
        return argv


# One search, as `scripts/search.py` runs it: a frozen dataclass made from the table, so the field list, the
# defaults and the types exist once.
SearchRequest = dataclasses.make_dataclass(
    "SearchRequest", [(f.name, tuple[str, ...] if f.type is tuple else f.type, dataclasses.field(default=f.default))
                      for f in REQUEST_FIELDS], bases=(_Request,), frozen=True)
SearchRequest.__module__ = __name__  # pickles and reprs as dass_ray.contract.SearchRequest
SearchRequest.__doc__ = "One search, as `scripts/search.py` runs it (fields and defaults: `REQUEST_FIELDS`)."


def resolve_classes(wanted: tuple[str, ...], class_names: list[str] | tuple[str, ...]) -> list[int]:
    """Label numbers of the classes asked for (by name, or by label number when no class has that name), in the
    order asked; the search's class i is `wanted[i]`. RequestError names the first unknown class."""
    index = {str(n): i for i, n in enumerate(class_names)}
    out = []
    for c in wanted:
        if c in index:
            out.append(index[c])
        elif c.isdigit() and int(c) < len(class_names):
            out.append(int(c))
        else:
            shown = ", ".join(map(str, list(class_names)[:12])) + (" ..." if len(class_names) > 12 else "")
            raise RequestError("classes", f"the dataset has no class {c!r} (its classes: {shown}; or a label "
                               f"number 0..{len(class_names) - 1})")
    if len(set(out)) != len(out):
        raise RequestError("classes", f"{', '.join(wanted)} names a class twice")
    return out


def _parse_classes(s: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in s.split(",") if c.strip())


def _parse_number(s: str) -> int:
    """An integer, also written as 2e6 or 2_000_000 (budgets are large)."""
    try:
        return int(s.replace("_", ""))
    except ValueError:
        v = float(s)
        if v != int(v):
            raise ValueError(f"not a whole number: {s}") from None
        return int(v)


def add_request_arguments(ap, *, service: bool = False) -> None:
    """Add one option per request field to an argparse parser, defaults from the table. `service=True`: only
    the knobs a service client sets (those with a proto path), each defaulting to None (the server's default)."""
    for f in REQUEST_FIELDS:
        if service and f.proto is None:
            continue
        shown = f.zero if (f.zero and f.default in ("", 0, ())) else f.default
        default = None if service else f.default
        help_ = f.help if f.name in ("teacher", "predictor") else f"{f.help} (default: {shown})"
        if f.type is bool:
            ap.add_argument(f.flag, action="store_true", default=default, help=f.help)
        elif f.type is tuple:
            ap.add_argument(f.flag, type=_parse_classes, default=default, help=help_)
        else:
            kw = {"choices": f.choices} if f.choices else {}
            ap.add_argument(f.flag, type=_parse_number if f.type is int else f.type, default=default, help=help_,
                            **kw)


def knobs_from_args(ns) -> dict:
    """The service knobs given on a command line built with `add_request_arguments(service=True)`."""
    return {f.name: getattr(ns, f.name) for f in REQUEST_FIELDS
            if f.proto is not None and getattr(ns, f.name) not in (None, False)}


def request_from_args(ns) -> SearchRequest:
    """The request parsed by a parser built with `add_request_arguments`, validated."""
    return SearchRequest(**{f.name: getattr(ns, f.name) for f in REQUEST_FIELDS}).validate()


# ---- the proto -------------------------------------------------------------------------------------------------


def _get(msg, path: str):
    for part in path.split("."):
        msg = getattr(msg, part)
    return msg


def request_from_proto(msg, *, dataset: str, teacher: str, defaults: dict | None = None) -> SearchRequest:
    """A `SubmitSearchRequest`'s knobs as a request (0 / "" / unset: `defaults`, else the table's); `dataset` and
    `teacher` are the files the server resolved from the message's oneofs. Not validated."""
    defaults = defaults or {}
    kw: dict[str, Any] = {"dataset": dataset, "teacher": teacher}
    for f in REQUEST_FIELDS:
        if f.proto is None:
            continue
        if f.name == "seed":
            if msg.HasField("seed"):
                kw["seed"] = int(msg.seed)
            continue
        v = _get(msg, f.proto)
        if f.type is tuple:
            v = tuple(str(c) for c in v)
        elif f.type is int:
            v = int(v)
        elif f.type is float:
            v = float(v)
        if v in (0, "") and not isinstance(v, bool):
            v = defaults.get(f.name, f.default)
        kw[f.name] = v
    return SearchRequest(**kw)


def _set(msg, f: Field, v) -> None:
    parent, _, last = f.proto.rpartition(".")
    target = _get(msg, parent) if parent else msg
    if f.type is tuple:
        getattr(target, last).extend(v)
    else:
        setattr(target, last, v)


def request_to_proto(req: SearchRequest, msg) -> None:
    """Set `msg`'s knobs (a SubmitSearchRequest or SearchSpec) from `req`; defaults are left unset (0)."""
    for f in REQUEST_FIELDS:
        v = getattr(req, f.name)
        if f.proto is not None and (v != f.default or f.name == "seed"):
            _set(msg, f, v)


def set_proto_knobs(msg, **knobs) -> None:
    """Set the named knobs on a SubmitSearchRequest (`seed=None` leaves it unset). Unknown names: TypeError."""
    for name, v in knobs.items():
        f = FIELDS_BY_NAME.get(name)
        if f is None or f.proto is None:
            settable = ", ".join(f.name for f in REQUEST_FIELDS if f.proto)
            raise TypeError(f"unknown search knob {name!r}; the service takes: {settable}")
        if v is not None:
            _set(msg, f, tuple(v) if f.type is tuple else f.type(v))


def proto_fields() -> list[str]:
    """The proto paths the table maps (a test compares them with SubmitSearchRequest's descriptor)."""
    return [f.proto for f in REQUEST_FIELDS if f.proto]


# ---------------------------------------------------------------------------------------------------------------
# Server caps
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """What one server lets a single search ask for (`dass-ray serve --max-candidates ...`). Over a cap:
    RESOURCE_EXHAUSTED. Defaults fit a small cluster; an operator raises them."""

    max_candidates: int = 100_000
    max_top_k: int = 64
    max_kd_epochs: int = 50
    max_concurrent: int = 256
    max_encoders: int = 64
    max_predictors: int = 16
    max_batch_size: int = 4096

    def check(self, req: SearchRequest) -> None:
        for name in ("candidates", "top_k", "kd_epochs", "concurrent", "encoders", "predictors", "batch_size"):
            fname = "max_concurrent" if name == "concurrent" else name
            v, cap = getattr(req, fname), getattr(self, f"max_{name}")
            if v > cap:
                raise RequestError(fname, f"{fname} {v} is over this server's limit of {cap} "
                                   f"(its operator sets it with --max-{name.replace('_', '-')})", over_cap=True)


# ---------------------------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------------------------

RESULT_FORMAT = "dass_ray.result/2"


@dataclass(frozen=True)
class InputSpec:
    """What the exported student takes: `dtype` images [N, height, width, channels] at the dataset's native size
    ("uint8": values 0..255; floats in 0..255 work too). It resizes them to `model_size` x `model_size` and
    normalises with ``(x / 255 - mean) / std`` (the same for every channel) itself."""

    height: int
    width: int
    channels: int  # 1: grayscale, 3: RGB (the model replicates grayscale to 3 channels)
    model_size: int
    mean: float = 0.5
    std: float = 0.5
    dtype: str = "uint8"

    def __post_init__(self) -> None:
        for f in ("height", "width", "model_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"InputSpec.{f}: expected a positive integer, got {v!r}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"InputSpec.channels: expected 1 or 3, got {self.channels!r}")
        if not self.std > 0:
            raise ValueError(f"InputSpec.std: expected a positive number, got {self.std!r}")
        if self.dtype != "uint8":
            raise ValueError(f"InputSpec.dtype: expected 'uint8', got {self.dtype!r}")
        object.__setattr__(self, "mean", float(self.mean))
        object.__setattr__(self, "std", float(self.std))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        """Inverse of `to_dict`; keys it does not know (from a newer writer) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class StudentResult:
    arch: dict  # {"widths": [[...] per stage]} (dass_ray.core.space.ArchConfig.to_dict)
    arch_json: str
    measured_acc: float
    predicted_acc: float
    flops: int
    params: int
    index: int
    predicted_rank: int

    @property
    def depths(self) -> list[int]:
        return [len(s) for s in self.arch.get("widths", [])]


@dataclass(frozen=True)
class SearchResult:
    """`result.json`. `timings_s` keys are stage names (TIMED_STAGES)."""

    best: StudentResult
    teacher_acc: float
    teacher_flops: int
    teacher_params: int
    candidates: int
    top_k: int
    trials: list[dict]  # {index, predicted_acc, measured_acc (None: failed), status}
    request: dict  # SearchRequest.to_dict() as the search ran it
    input_spec: InputSpec
    class_names: list[str]
    timings_s: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # why the search ran fewer than top_k trials (--stop-probability), "" when it ran them all
    stop_reason: str = ""
    # the exported student: [{"format": one of EXPORT_FORMATS, "file": its name in the output directory}] (empty in
    # results written before ONNX and torch.export files were made: then only student.torchscript.pt exists)
    exports: list[dict] = field(default_factory=list)
    # the teacher: "family" (a dass_ray checkpoint), "trained" (--teacher train), or a foreign one ("torchscript",
    # "onnx", "timm", "torchvision"; docs/teachers.md). For a foreign teacher `teacher_acc` is its own validation
    # accuracy (at its own input size) and `proxy_teacher_acc` that of the family member distilled from it, which
    # ranked the candidates (teacher_flops / teacher_params are the proxy's); None for the others.
    teacher_kind: str = "family"
    proxy_teacher_acc: float | None = None
    format: str = RESULT_FORMAT

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["best"]["depths"] = self.best.depths
        return d

    def write(self, path: str | Path) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(p)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        if d.get("format") != RESULT_FORMAT:
            raise ValueError(f"result format {d.get('format')!r}; this version reads {RESULT_FORMAT!r}")
        best = dict(d["best"])
        best.pop("depths", None)
        kw = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        kw["best"] = StudentResult(**best)
        kw["input_spec"] = InputSpec.from_dict(d["input_spec"])
        return cls(**kw)

    @classmethod
    def read(cls, path: str | Path) -> "SearchResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------------------------------
# Predictor versions retrained on a search history (`scripts/retrain.py` writes them; searches with
# `--predictor latest`, the server's ListPredictors and the client read them)
# ---------------------------------------------------------------------------------------------------------------

LATEST = "LATEST"  # <history>/predictors/LATEST names the newest version at least as good as its parent


def versions_dir(history: str | Path) -> Path:
    """`<history>/predictors`: `vN.pt` (the predictor), `vN.json` (its manifest), `LATEST`."""
    return Path(history) / "predictors"


def latest_predictor(history: str | Path) -> Path | None:
    """The history's latest retrained predictor, or None when it has none."""
    f = versions_dir(history) / LATEST
    if not f.is_file():
        return None
    p = versions_dir(history) / f.read_text().strip()
    return p if p.is_file() else None


def predictor_versions(history: str | Path) -> list[tuple[dict, bool]]:
    """(manifest, is latest) of every finished version, newest first; a manifest that does not parse is skipped."""
    import re

    d, latest = versions_dir(history), latest_predictor(history)
    out = []
    for m in d.glob("v*.json"):
        if not re.fullmatch(r"v\d+\.json", m.name) or not m.with_suffix(".pt").is_file():
            continue
        try:
            meta = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        out.append((int(m.stem[1:]), meta, latest is not None and latest.name == m.with_suffix(".pt").name))
    return [(meta, is_latest) for _, meta, is_latest in sorted(out, key=lambda t: -t[0])]
