"""The exported student: a TorchScript file that takes images as a user has them (plain PyTorch, no Ray).

A search trains its students on tensors made by `dass_ray.core.data`: images decoded to uint8 RGB at the dataset's
native size (grayscale replicated to 3 channels), then `to_tensor` (scale to [0, 1], bilinear resize to the space's
``image_size``, antialiased when downsizing, clamp, normalise with `MEAN` / `STD`). `Preprocessed` wraps a student
with exactly those steps, so the exported file maps uint8 images [N, H, W, C] at the native size to logits
[N, num_classes], and `InputSpec` says what H, W and C are.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dass_ray.core.data import MEAN, STD
from dass_ray.service.contract import InputSpec

__all__ = ["InputSpec", "Preprocessed", "export_student", "spec_for"]


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
    scripted.save(str(path))
