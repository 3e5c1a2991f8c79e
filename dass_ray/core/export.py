"""The exported student: a TorchScript file that takes images as a user has them (plain PyTorch, no Ray).

A search trains its students on tensors made by `dass_ray.core.data`: images decoded to uint8 RGB at the dataset's
native size (grayscale replicated to 3 channels), then `to_tensor` (scale to [0, 1], bilinear resize to the space's
``image_size``, antialiased when downsizing, clamp, normalise with `MEAN` / `STD`). `Preprocessed` wraps a student
with exactly those steps, so the exported file maps uint8 images [N, H, W, C] at the native size to logits
[N, num_classes], and `InputSpec` says what H, W and C are.

`export_all` writes the student in three formats next to each other (`EXPORTS`): TorchScript (`torch.jit.load`;
any image size), ONNX (onnxruntime and other runtimes; images at the spec's size, any batch) and a `torch.export`
program (`torch.export.load(...).module()`; the spec's size, any batch). None of them holds a path of the machine
that wrote it: TorchScript's debug records (`*.debug_pkl`, source file names of dass_ray and torch) are dropped,
ONNX is written without doc strings, the program without its nodes' stack traces.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dass_ray.core.data import MEAN, STD
from dass_ray.contract import ARTIFACTS, EXPORT_FORMATS, InputSpec

__all__ = ["EXPORTS", "FixedSize", "InputSpec", "Preprocessed", "export_all", "export_onnx", "export_program",
           "export_student", "spec_for"]

# format (as in result.json's `exports`) -> file name in a search's output directory
EXPORTS = {fmt: ARTIFACTS[fmt] for fmt in EXPORT_FORMATS}
ONNX_OPSET = 17  # MatMul, Conv, Relu, ... only: any runtime of the last years reads it


def spec_for(data, model_size: int) -> InputSpec:
    """The `InputSpec` of a model trained at `model_size` on `data` (a `dass_ray.core.kd.TensorData` built by
    `TensorData.from_datasets`, which records the images' native (H, W, C))."""
    if data.native_shape is None:
        raise ValueError("TensorData has no native_shape (not built by TensorData.from_datasets)")
    if len(set(MEAN)) != 1 or len(set(STD)) != 1:  # InputSpec holds one value for all channels
        raise ValueError(f"per-channel normalisation {MEAN}/{STD} does not fit InputSpec")
    h, w, c = data.native_shape
    return InputSpec(height=h, width=w, channels=c, model_size=int(model_size), mean=MEAN[0], std=STD[0])


class Preprocessed(nn.Module):
    """`model` behind the data pipeline's preprocessing: uint8 (or float 0..255) [N, H, W, 1|3] -> logits.

    Images at another size than the spec's are resized the same way; the batch size is free. Attributes
    `height`, `width`, `channels`, `model_size` carry the spec into the TorchScript file."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        self.height, self.width, self.channels = spec.height, spec.width, spec.channels
        self.model_size = spec.model_size
        self.mean, self.inv_std = spec.mean, 1.0 / spec.std

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[N, H, W, 1|3] 0..255 -> float32 [N, 3, S, S], as `dass_ray.core.data.to_tensor` computes it."""
        if x.dim() != 4 or (x.shape[3] != 1 and x.shape[3] != 3):
            raise ValueError(f"expected images [N, H, W, C] with C 1 or 3 (values 0..255), got shape {x.shape}")
        if x.shape[3] == 1:  # as the loader: grayscale replicated to RGB
            x = x.expand(-1, -1, -1, 3)
        x = x.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
        h, w, s = x.shape[2], x.shape[3], self.model_size
        if h != s or w != s:
            x = F.interpolate(x, size=[s, s], mode="bilinear", align_corners=False, antialias=s < h or s < w)
            x = x.clamp(0.0, 1.0)
        return (x - self.mean) * self.inv_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) [N, H, W, C] -> logits [N, num_classes]."""
        return self.model(self.preprocess(x))


def export_student(model: nn.Module, spec: InputSpec, path: str | Path) -> None:
    """Write `model` (a `dass_ray.core.nets.ResNet`) behind `Preprocessed` as a TorchScript file for `torch.jit.load`,
    in eval mode. `model` itself is not changed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 calls torch.jit deprecated; still what loads
        scripted = torch.jit.script(Preprocessed(model, spec)).eval()  # without dass_ray in C++ and plain torch
        buf = io.BytesIO()
        torch.jit.save(scripted, buf)
    # Copy the archive record by record (torch's own writer keeps its layout and alignment), without the debug
    # records: `code/**/*.py.debug_pkl` hold the source ranges, with the absolute file names of dass_ray and torch
    # on this machine. The file loads the same without them; errors still point into its `code/`.
    buf.seek(0)
    reader = torch._C.PyTorchFileReader(buf)
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for name in reader.get_all_records():
        if name.endswith(".debug_pkl") or name == ".data/serialization_id":  # the writer makes a new id
            continue
        data = reader.get_record(name)
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()
    del writer
    _write_bytes(path, out.getvalue())


class FixedSize(nn.Module):
    """`Preprocessed` for uint8 images [N, H, W, C] of exactly the spec's size, any N: what ONNX and `torch.export`
    take. The resize is written as two matrix products, the same linear map as `Preprocessed`'s `F.interpolate`
    (bilinear, antialiased when downsizing), so that every runtime computes it alike."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model
        self.channels = spec.channels
        h, w, s = spec.height, spec.width, spec.model_size
        self.resize = h != s or w != s
        aa = s < h or s < w
        self.register_buffer("rows", _resize_matrix(h, s, aa), persistent=False)  # [S, H]
        self.register_buffer("cols_t", _resize_matrix(w, s, aa).T.contiguous(), persistent=False)  # [W, S]
        self.mean, self.inv_std = spec.mean, 1.0 / spec.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels == 1:
            x = x.expand(-1, -1, -1, 3)
        x = x.permute(0, 3, 1, 2).to(torch.float32).div(255.0)
        if self.resize:
            x = torch.matmul(torch.matmul(self.rows, x), self.cols_t).clamp(0.0, 1.0)
        return self.model((x - self.mean) * self.inv_std)


def _resize_matrix(n: int, s: int, antialias: bool) -> torch.Tensor:
    """[s, n]: `F.interpolate(..., mode="bilinear", align_corners=False)` from n to s pixels along one axis (the
    resize is separable: images are resized along H with this matrix and along W with the other). Probed by resizing
    the identity image along its rows only (not n images one pixel wide: torch resizes those differently)."""
    eye = torch.eye(n, dtype=torch.float32).reshape(1, 1, n, n)
    out = F.interpolate(eye, size=[s, n], mode="bilinear", align_corners=False, antialias=antialias)
    return out[0, 0].contiguous()


def _example(spec: InputSpec, n: int = 2) -> torch.Tensor:
    return torch.zeros(n, spec.height, spec.width, spec.channels, dtype=torch.uint8)


def export_onnx(model: nn.Module, spec: InputSpec, path: str | Path) -> None:
    """Write `model` behind `FixedSize` as ONNX (opset `ONNX_OPSET`): input "images", uint8 [batch, H, W, C] at the
    spec's size; output "logits", float32 [batch, num_classes]. Without doc strings (they would hold stack traces
    with this machine's paths). `model` itself is not changed."""
    import onnx  # imported here: only exporting needs it

    net = FixedSize(_eval_copy(model), spec).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated in favour of onnxscript's
        torch.onnx.export(net, (_example(spec),), buf, dynamo=False, opset_version=ONNX_OPSET, verbose=False,
                          input_names=["images"], output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = ""
    for node in proto.graph.node:
        node.doc_string = ""
    onnx.checker.check_model(proto)
    _write_bytes(path, proto.SerializeToString())


def export_program(model: nn.Module, spec: InputSpec, path: str | Path) -> None:
    """Write `model` behind `FixedSize` as a `torch.export` program (`torch.export.save`; load it with
    `torch.export.load(path).module()`): uint8 [N, H, W, C] at the spec's size, any N >= 1 -> logits. The nodes'
    stack traces (this machine's paths) are dropped. `model` itself is not changed."""
    net = FixedSize(_eval_copy(model), spec).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        ep = torch.export.export(net, (_example(spec),), dynamic_shapes=({0: batch},))
    for node in ep.graph.nodes:
        node.meta.pop("stack_trace", None)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    _write_bytes(path, buf.getvalue())


def export_all(model: nn.Module, spec: InputSpec, out_dir: str | Path) -> tuple[list[dict], dict[str, float]]:
    """Write every format of `EXPORTS` into `out_dir`. Returns result.json's `exports` ([{"format", "file"}]) and
    the seconds each format took."""
    out, exports, seconds = Path(out_dir), [], {}
    writers = {"torchscript": export_student, "onnx": export_onnx, "torch_export": export_program}
    for fmt in EXPORT_FORMATS:
        t0 = time.perf_counter()
        writers[fmt](model, spec, out / EXPORTS[fmt])
        seconds[fmt] = round(time.perf_counter() - t0, 3)
        exports.append({"format": fmt, "file": EXPORTS[fmt]})
    return exports, seconds


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _write_bytes(path: str | Path, data: bytes) -> None:
    """Write atomically: a reader (e.g. a download) never sees half a file."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)
