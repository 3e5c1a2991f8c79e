"""The DaSS accuracy predictor (docs/method.md, section 4), with a functional forward for meta-learning.

Three encoders, concatenated, then `Linear -> Tanh -> Linear(1)`:
  student functional encoder: conv3x3 s2 (C4->128), ReLU, conv3x3 s2 (128->256), ReLU, global avg pool;
  teacher functional encoder: the same shape with its own weights, on the teacher's map;
  architecture encoder: one Linear (encoding -> 64).

`forward(batch, params=None)` runs with the module's own parameters or with an explicit dict (the adapted
parameters of an inner step), via `torch.func.functional_call`, so MAML never mutates the module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class PredictorConfig:
    feature_channels: int = 128  # C4 of the space
    encoding_size: int = 0  # SpaceConfig.encoding_size
    enc_channels: tuple[int, int] = (128, 256)
    arch_hidden: int = 64
    hidden: int = 64
    use_functional: bool = True  # False: the architecture-only baseline (no functional embeddings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PredictorConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class PredictorBatch:
    """Inputs (and optional targets) for N queries of one task.

    student_maps: [N, C4, h, w] functional embeddings of the students.
    teacher_map: [1, C4, h, w] the teacher's embedding (shared by the N queries).
    arch: [N, D] architecture encodings.
    target: [N] accuracies as fractions in [0, 1], or None.
    """

    student_maps: torch.Tensor
    teacher_map: torch.Tensor
    arch: torch.Tensor
    target: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.arch.shape[0]

    def subset(self, idx) -> "PredictorBatch":
        t = None if self.target is None else self.target[idx]
        return PredictorBatch(self.student_maps[idx], self.teacher_map, self.arch[idx], t)

    def to(self, device) -> "PredictorBatch":
        t = None if self.target is None else self.target.to(device)
        return PredictorBatch(self.student_maps.to(device), self.teacher_map.to(device), self.arch.to(device), t)


def _encoder(c_in: int, c1: int, c2: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c1, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


class Predictor(nn.Module):
    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        if cfg.encoding_size <= 0:
            raise ValueError("PredictorConfig.encoding_size must be the space's encoding size (> 0)")
        self.cfg = cfg
        c1, c2 = cfg.enc_channels
        width = cfg.arch_hidden
        if cfg.use_functional:
            self.student_enc = _encoder(cfg.feature_channels, c1, c2)
            self.teacher_enc = _encoder(cfg.feature_channels, c1, c2)
            width += 2 * c2
        self.arch_enc = nn.Linear(cfg.encoding_size, cfg.arch_hidden)
        self.head = nn.Sequential(nn.Linear(width, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 1))

    def _forward(self, student_maps, teacher_map, arch) -> torch.Tensor:
        parts = [self.arch_enc(arch)]
        if self.cfg.use_functional:
            s = self.student_enc(student_maps)
            t = self.teacher_enc(teacher_map).expand(s.shape[0], -1)  # encoded once, shared by all queries
            parts = [s, t] + parts
        return self.head(torch.cat(parts, dim=1)).squeeze(1)

    def forward(self, batch: PredictorBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Predicted accuracies [N] (fractions). `params`: a full name -> tensor dict replacing the module's."""
        if params is None:
            return self._forward(batch.student_maps, batch.teacher_map, batch.arch)
        # re-enters forward(batch) with the module's parameters swapped for `params` (nothing is mutated)
        return functional_call(self, params, (batch,), strict=True)

    output_bias_name = "head.2.bias"  # the final Linear(hidden, 1)'s bias: adding c to it adds c to every output

    def named_params(self) -> dict[str, torch.Tensor]:
        return dict(self.named_parameters())


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
