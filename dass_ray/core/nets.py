"""Teacher/student ResNets of the ResNet-42 family (docs/method.md, section 1), plain PyTorch.

Stem: 3x3 conv (stride 1) + BN + ReLU, no max-pool. Each block is a BasicBlock (two 3x3 convs + BN) whose
shortcut carries no parameters: on stride 2 the identity is max-pooled (2x2), extra output channels are
zero-padded and missing ones truncated. Global average pool, linear classifier.

State-dict keys (the remapping code relies on them): `stem.conv.weight`, `stem.bn.*`,
`stages.{s}.{b}.conv1.weight`, `stages.{s}.{b}.bn1.*`, `stages.{s}.{b}.conv2.weight`, `stages.{s}.{b}.bn2.*`,
`fc.weight`, `fc.bias`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dass_ray.core.space import ArchConfig, SpaceConfig


def match_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    """Parameter-free channel adapter: zero-pad or truncate dim 1 to `c` channels."""
    cx = x.shape[1]
    if cx == c:
        return x
    if cx > c:
        return x[:, :c]
    return F.pad(x, (0, 0, 0, 0, 0, c - cx))


class ConvBN(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.stride = stride
        self.c_out = c_out
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, self.stride, self.stride)
        return match_channels(x, self.c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


class ResNet(nn.Module):
    """A member of the family. `forward` gives logits [N, classes]; `features` the last stage's map."""

    def __init__(self, arch: ArchConfig, space: SpaceConfig):
        super().__init__()
        space.validate(arch)
        self.arch, self.space = arch, space
        stem_w = arch.widths[0][0]
        self.stem = ConvBN(space.in_channels, stem_w)
        c = stem_w
        stages = []
        for s, stage in enumerate(arch.widths):
            blocks = []
            for b, w in enumerate(stage):
                blocks.append(BasicBlock(c, w, space.strides[s] if b == 0 else 1))
                c = w
            stages.append(nn.ModuleList(blocks))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(c, space.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for stage in self.stages:  # zero-init the last BN of each block: blocks start as identities
            for blk in stage:
                nn.init.zeros_(blk.bn2.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last stage's activation map [N, C4, H/8, W/8] (post-ReLU)."""
        h = F.relu(self.stem(x))
        for stage in self.stages:
            for blk in stage:
                h = blk(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.fc(f.mean(dim=(2, 3))), f


def build(arch: ArchConfig, space: SpaceConfig, seed: int | None = None) -> ResNet:
    """Build a network; with `seed`, its random init is reproducible and does not touch the global RNG."""
    if seed is None:
        return ResNet(arch, space)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResNet(arch, space)


def expected_shapes(arch: ArchConfig, space: SpaceConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of `build(arch, space)`, computed without building it."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    for name, ci, co, k, _ in space.layer_shapes(arch):
        if name == "fc":
            shapes["fc.weight"] = (co, ci)
            shapes["fc.bias"] = (co,)
        elif name == "stem.conv":
            shapes["stem.conv.weight"] = (co, ci, k, k)
            bn("stem.bn", co)
        else:
            blk, conv = name.rsplit(".", 1)
            shapes[f"{blk}.{conv}.weight"] = (co, ci, k, k)
            bn(f"{blk}.bn{conv[-1]}", co)
    return shapes


def count_flops(model: ResNet, image_size: int | None = None) -> int:
    """Measured FLOPs (2 x multiply-adds of convs and linears) of one forward pass, via hooks."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1]
        total += 2 * out.shape[1] * out.shape[2] * out.shape[3] * (m.in_channels // m.groups) * k

    def lin_hook(m: nn.Linear, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features

    hs = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hs += [m.register_forward_hook(lin_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    s = image_size or model.space.image_size
    was = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, model.space.in_channels, s, s))
    model.train(was)
    for h in hs:
        h.remove()
    return total
