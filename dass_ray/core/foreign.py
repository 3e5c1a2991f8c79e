"""Foreign teachers: any classifier as the teacher (plain PyTorch; onnx, onnxruntime, timm, torchvision imported only
when a teacher needs them; no Ray).

`--teacher` takes, besides a checkpoint of the project's own teacher family (`dass_ray.core.kd.load_teacher`):

- a TorchScript file (anything `torch.jit.save` wrote: a zip archive holding ``*/code/`` or ``*/constants.pkl``),
  recognised by its content whatever its extension;
- an ONNX file (recognised by its content: it parses as an ONNX model with a graph), run with onnxruntime's CPU
  provider;
- ``timm:<name>`` or ``torchvision:<name>`` with ``--teacher-weights FILE``: a state dict whose head has the
  dataset's classes (the network is built with random weights, never downloaded, then loaded from the file).

A `ForeignTeacher` takes our images -- uint8 ``[N, H, W, C]`` (0..255) or the project's normalised float tensors
``[N, 3, S, S]`` (`dass_ray.core.data.to_tensor`) -- resizes them to the teacher's own input size, normalises them
with the teacher's own mean/std and answers logits ``[N, classes]``. Its input size and normalisation: timm's
``pretrained_cfg`` where the model has one; an ONNX model's fixed input shape; else ``--teacher-image-size``
(default: the dataset's native size, at most `MAX_AUTO_SIZE`) and ``--teacher-mean`` / ``--teacher-std`` (default:
ImageNet's for timm / torchvision, the project's `MEAN` / `STD` for TorchScript and ONNX). `load_foreign` runs one
dummy batch and checks the output width, so a bad teacher fails with one line naming the option (`ForeignError`).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dass_ray.core.images import MEAN, STD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_AUTO_SIZE = 224  # the largest input size chosen without --teacher-image-size
KINDS = ("torchscript", "onnx", "timm", "torchvision")
NAMED = ("timm:", "torchvision:")


class ForeignError(ValueError):
    """A foreign teacher that cannot be used; `option` names the command-line option at fault."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option

    def line(self) -> str:
        return f"{self.option}: {self}"


@dataclass(frozen=True)
class TeacherOptions:
    """How to run a foreign teacher (0 / "": decide from the model, else the defaults above)."""

    weights: str = ""  # --teacher-weights: the state dict of a timm: / torchvision: teacher
    image_size: int = 0  # --teacher-image-size
    mean: str = ""  # --teacher-mean: one number, or three comma-separated
    std: str = ""  # --teacher-std


def _one_line(e: BaseException, limit: int = 240) -> str:
    """The most telling line of an exception's text (TorchScript and onnxruntime errors span many lines)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    pick = lines[-1]
    for ln in reversed(lines):  # TorchScript: the last line is often a bare "RuntimeError: ..."; keep it
        if "Error" in ln or "error" in ln:
            pick = ln
            break
    return " ".join(pick.split())[:limit]


def sniff(path: str | Path) -> str | None:
    """"torchscript", "onnx" or None (not a foreign teacher file; maybe a dass_ray checkpoint), by content."""
    p = Path(path)
    if not p.is_file():
        return None
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return None
        if any("/code/" in n or n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            return "torchscript"
        return None  # torch.save's own zip (a state dict or a dass_ray checkpoint)
    with open(p, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a pickle (torch.save's legacy format)
        return None
    try:
        import onnx
    except ImportError:  # pragma: no cover - onnx is a dependency
        return None
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf answers arbitrary bytes with several exception types
        return None
    return "onnx" if (m.ir_version > 0 and len(m.graph.node) > 0 and len(m.graph.input) > 0) else None


def is_foreign_spec(spec: str) -> bool:
    """Is `--teacher`'s value a foreign teacher (a model name, or a TorchScript / ONNX file)?"""
    return spec.startswith(NAMED) or sniff(spec) is not None


def _floats(option: str, s: str, default: tuple[float, ...]) -> tuple[float, float, float]:
    if not s:
        return tuple(float(v) for v in default)  # type: ignore[return-value]
    try:
        v = tuple(float(x) for x in s.replace(" ", "").split(",") if x)
    except ValueError:
        raise ForeignError(option, f"expected one number or three comma-separated numbers, got {s!r}") from None
    if len(v) == 1:
        v = v * 3
    if len(v) != 3 or not all(np.isfinite(v)):
        raise ForeignError(option, f"expected one number or three comma-separated numbers, got {s!r}")
    if option.endswith("std") and not all(x > 0 for x in v):
        raise ForeignError(option, f"must be positive, got {s!r}")
    return v  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# The teacher
# ----------------------------------------------------------------------------------------------------------------


class ForeignTeacher(nn.Module):
    """A foreign classifier behind the project's images: `logits(x)` (also `forward`) for uint8 [N, H, W, C] or the
    project's normalised [N, 3, S, S] -> float32 logits [N, classes] on the CPU. Pickles as its file's bytes plus
    options (so it travels to Ray actors); `digest()` identifies both."""

    def __init__(self, recipe: dict):
        super().__init__()
        # where the wrapper lives (an ONNX teacher has no parameters of its own): `compute_soft_labels` and friends
        # read a module's device from its first parameter
        self._anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.recipe = dict(recipe)
        self.kind: str = recipe["kind"]
        self.name: str = recipe["name"]
        self.size: tuple[int, int] = tuple(recipe["size"])  # type: ignore[assignment]
        self.channels: int = int(recipe.get("channels", 3))
        self.mean = tuple(recipe["mean"])
        self.std = tuple(recipe["std"])
        self.num_classes = int(recipe.get("num_classes", 0))
        self.net: nn.Module | None = None
        self._session = None
        if self.kind == "onnx":
            self._session = _onnx_session(recipe["payload"])
            self._input_name = self._session.get_inputs()[0].name
        else:
            self.net = _build_net(recipe)

    def __reduce__(self):
        return (ForeignTeacher, (self.recipe,))

    @property
    def image_size(self) -> int:
        return int(self.size[0])

    def describe(self) -> str:
        h, w = self.size
        return (f"{self.kind} teacher {self.name} ({h}x{w} px, mean {tuple(round(m, 3) for m in self.mean)}, "
                f"std {tuple(round(s, 3) for s in self.std)})")

    def digest(self) -> str:
        """sha256 over the model's bytes (file and weights) and how it is run (size, channels, normalisation)."""
        h = hashlib.sha256()
        h.update(json.dumps({k: self.recipe[k] for k in ("kind", "name", "size", "channels", "mean", "std")},
                            sort_keys=True).encode())
        for k in ("payload", "weights"):
            b = self.recipe.get(k) or b""
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        return h.hexdigest()[:16]

    def prepare_input(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Our images -> the teacher's input: float32 [N, channels, H, W] at its size, its normalisation."""
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if x.dtype == torch.uint8:
            if x.dim() == 3:
                x = x[..., None]
            if x.dim() != 4 or x.shape[-1] not in (1, 3):
                raise ValueError(f"expected uint8 images [N, H, W, 1|3], got shape {tuple(x.shape)}")
            x = x.permute(0, 3, 1, 2).float().div(255.0)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
        else:
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"expected normalised images [N, 3, S, S], got shape {tuple(x.shape)}")
            m = torch.tensor(MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            s = torch.tensor(STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
            x = (x.float() * s + m).clamp(0.0, 1.0)
        h, w = self.size
        if tuple(x.shape[-2:]) != (h, w):
            down = h < x.shape[-2] or w < x.shape[-1]
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=down).clamp(0.0, 1.0)
        m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x = (x - m) / s
        if self.channels == 1:
            x = x.mean(1, keepdim=True)
        return x.contiguous()

    @torch.no_grad()
    def logits(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        xt = self.prepare_input(x)
        if self._session is not None:
            out = self._session.run(None, {self._input_name: xt.cpu().numpy()})[0]
            return torch.from_numpy(np.asarray(out, dtype=np.float32))
        dev = self._anchor.device
        out = self.net(xt.to(dev))
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, dict):
            out = out.get("logits", next(iter(out.values())))
        return out.float().cpu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor | np.ndarray, y: torch.Tensor, batch_size: int = 256) -> float:
        """Top-1 accuracy on (x, y) at the teacher's own size."""
        self.eval()
        n = int(y.shape[0])
        correct = 0
        for i in range(0, n, batch_size):
            correct += int((self.logits(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size].cpu()).sum())
        return correct / max(1, n)

    def train(self, mode: bool = True):  # always in eval mode: a teacher's BN statistics never move
        return super().train(False)


def _onnx_session(payload: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = max(1, torch.get_num_threads())
    return ort.InferenceSession(payload, sess_options=so, providers=["CPUExecutionProvider"])


def _jit_load(payload: bytes) -> nn.Module:
    with warnings.catch_warnings():  # torch 2.14 calls TorchScript deprecated; a user's teacher may well be one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(payload), map_location="cpu")


def _build_net(recipe: dict) -> nn.Module:
    kind = recipe["kind"]
    if kind == "torchscript":
        net = _jit_load(recipe["payload"])
    else:
        net = _named_model(kind, recipe["name"], int(recipe["num_classes"]))
        net.load_state_dict(_state_dict(io.BytesIO(recipe["weights"])), strict=True)
    return net.eval()


def _named_model(kind: str, name: str, num_classes: int) -> nn.Module:
    if kind == "timm":
        try:
            import timm
        except ImportError:
            raise ForeignError("--teacher", f"timm:{name} needs the timm package (pip install timm)") from None
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except RuntimeError as e:  # timm: "Unknown model (...)"
            raise ForeignError("--teacher", f"timm has no model {name!r} ({_one_line(e)})") from None
    import torchvision

    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except (ValueError, KeyError) as e:
        raise ForeignError("--teacher", f"torchvision has no model {name!r} (see "
                           f"torchvision.models.list_models(); {_one_line(e)})") from None


def _state_dict(f) -> dict:
    blob = torch.load(f, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError("not a state dict (a mapping of parameter names to tensors)")
    if blob and all(k.startswith("module.") for k in blob):  # saved from DataParallel / DDP
        blob = {k[len("module."):]: v for k, v in blob.items()}
    return blob


# ----------------------------------------------------------------------------------------------------------------
# Loading and checking
# ----------------------------------------------------------------------------------------------------------------


def _onnx_input_shape(payload: bytes) -> tuple[int | None, int | None, int | None]:
    """(channels, height, width) of an ONNX model's first input where fixed (None where symbolic)."""
    import onnx

    m = onnx.load_from_string(payload)
    init = {t.name for t in m.graph.initializer}
    inp = next((i for i in m.graph.input if i.name not in init), m.graph.input[0])
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inp.type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ForeignError("--teacher", f"the ONNX model's input {inp.name!r} has {len(dims)} dimensions; a "
                           f"classifier of images [N, C, H, W] has 4")
    return dims[1], dims[2], dims[3]


def load_foreign(spec: str, opts: TeacherOptions, num_classes: int, native_hw: tuple[int, int],
                 probe: torch.Tensor | np.ndarray | None = None) -> ForeignTeacher:
    """Load, configure and check the foreign teacher `spec` for a `num_classes`-class dataset whose images are
    `native_hw` (H, W). Runs one dummy batch (`probe`: a few of the dataset's uint8 images, else zeros) and checks
    the output is [batch, num_classes]. Raises `ForeignError` (its `line()` names the option)."""
    if opts.image_size and not 8 <= opts.image_size <= 1024:
        raise ForeignError("--teacher-image-size", f"must be in [8, 1024], got {opts.image_size}")
    channels, size, name = 3, None, spec
    weights = b""
    cfg_mean = cfg_std = None
    if spec.startswith(NAMED):
        kind, _, name = spec.partition(":")
        if not name:
            raise ForeignError("--teacher", f"{spec!r}: give a model name, e.g. {kind}:resnet18")
        if not opts.weights:
            raise ForeignError("--teacher-weights", f"{spec} needs a weights file (a state dict whose head has the "
                               f"dataset's {num_classes} classes); nothing is downloaded")
        wp = Path(opts.weights)
        if not wp.is_file():
            raise ForeignError("--teacher-weights", f"{wp}: not found")
        weights = wp.read_bytes()
        try:
            _state_dict(io.BytesIO(weights))
        except Exception as e:  # noqa: BLE001 - torch.load answers foreign files with many types
            raise ForeignError("--teacher-weights", f"{wp}: not a readable state dict ({_one_line(e)})") from None
        payload = b""
        net = _named_model(kind, name, num_classes)
        pcfg = getattr(net, "pretrained_cfg", None) or {}
        if pcfg.get("input_size"):
            channels, size = int(pcfg["input_size"][0]), (int(pcfg["input_size"][1]), int(pcfg["input_size"][2]))
        if pcfg.get("mean") and pcfg.get("std"):
            cfg_mean, cfg_std = tuple(pcfg["mean"]), tuple(pcfg["std"])
        try:
            net.load_state_dict(_state_dict(io.BytesIO(weights)), strict=True)
        except RuntimeError as e:
            raise ForeignError("--teacher-weights", f"{wp}: the weights do not fit {spec} with a {num_classes}-class "
                               f"head ({_weights_mismatch(e)})") from None
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    else:
        p = Path(spec)
        if not p.is_file():
            raise ForeignError("--teacher", f"{p}: not found")
        kind = sniff(p)
        if kind is None:
            raise ForeignError("--teacher", f"{p}: neither a TorchScript nor an ONNX file")
        if opts.weights:
            raise ForeignError("--teacher-weights", f"only for timm:<name> / torchvision:<name> teachers; a {kind} "
                               f"file carries its own weights")
        payload = p.read_bytes()
        name = p.name
        if kind == "torchscript":
            try:
                _jit_load(payload)
            except Exception as e:  # noqa: BLE001
                raise ForeignError("--teacher", f"{p}: a TorchScript file that does not load ({_one_line(e)})") from None
        else:
            try:
                _onnx_session(payload)
            except Exception as e:  # noqa: BLE001
                raise ForeignError("--teacher", f"{p}: an ONNX file onnxruntime cannot run ({_one_line(e)})") from None
            c, h, w = _onnx_input_shape(payload)
            if c in (1, 3):
                channels = c
            elif c is not None:
                raise ForeignError("--teacher", f"{p}: the ONNX model takes {c}-channel images; 1 or 3 are supported")
            if h and w:
                size = (h, w)
        default_mean, default_std = MEAN, STD
    if opts.image_size:
        size = (opts.image_size, opts.image_size)
    elif size is None:
        side = min(MAX_AUTO_SIZE, max(native_hw))
        size = (side, side)
    mean = _floats("--teacher-mean", opts.mean, cfg_mean or default_mean)
    std = _floats("--teacher-std", opts.std, cfg_std or default_std)
    recipe = {"kind": kind, "name": name, "size": list(size), "channels": channels, "mean": list(mean),
              "std": list(std), "num_classes": num_classes, "payload": payload, "weights": weights}
    try:
        t = ForeignTeacher(recipe)
    except ForeignError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ForeignError("--teacher", f"{spec}: does not load ({_one_line(e)})") from None
    x = probe if probe is not None else torch.zeros((2, *native_hw, 3), dtype=torch.uint8)
    try:
        out = t.logits(x)
    except Exception as e:  # noqa: BLE001 - the model rejects the input: its size, channels or dtype
        raise ForeignError("--teacher-image-size", f"the teacher rejects {size[0]}x{size[1]} inputs "
                           f"({_one_line(e)}); give the size it was trained at") from None
    if out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ForeignError("--teacher", f"{name}: outputs of shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
                           f"a classifier answers [batch, classes]")
    if out.shape[1] != num_classes:
        raise ForeignError("--teacher", f"its head has {out.shape[1]} classes but the dataset has {num_classes}")
    if not torch.isfinite(out).all():
        raise ForeignError("--teacher", f"{name}: non-finite outputs on the dataset's images")
    return t


def _weights_mismatch(e: RuntimeError) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if ln.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return " ".join((detail[0] if detail else lines[0] if lines else type(e).__name__).split())[:240]


@dataclass
class ForeignTask:
    """A foreign teacher with a search's own images: uint8 [N, H, W, 3] at their native size, in the order of the
    search's `TensorData` (index i of `x_train` is sample i of its soft labels)."""

    teacher: ForeignTeacher
    x_train: np.ndarray
    x_val: np.ndarray
    y_val: torch.Tensor

    def fingerprint(self) -> str:
        """sha256 over the training images (what the soft labels are computed on)."""
        h = hashlib.sha256()
        h.update(str(self.x_train.shape).encode())
        h.update(np.ascontiguousarray(self.x_train).tobytes())
        return h.hexdigest()[:16]

    def soft_label_key(self, views: int) -> str:
        """The soft labels' content digest: the teacher's, the images', the views."""
        return hashlib.sha256(f"{self.teacher.digest()}|{self.fingerprint()}|{views}".encode()).hexdigest()[:20]

    def val_accuracy(self) -> float:
        """The teacher's accuracy on the validation split, at its own input size."""
        return self.teacher.accuracy(self.x_val, self.y_val)
