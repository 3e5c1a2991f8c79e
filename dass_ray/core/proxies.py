"""Zero-cost proxies computed on remapped students (baselines for evaluation; plain PyTorch).

- `synflow`: sum over parameters of |theta * dR/dtheta| where R is the output sum of the network with absolute
  weights on an all-ones input (Tanaka et al., 2020), in float64, BN in eval mode.
- `naswot`: log-determinant of the Hamming-kernel of binary ReLU activation codes over a batch of real images
  (Mellor et al., 2021).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from dass_ray.core.nets import BasicBlock, ConvBN


def synflow(model: nn.Module, image_size: int, in_channels: int = 3) -> float:
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.abs_()
    for p in m.parameters():
        p.grad = None
    x = torch.ones(1, in_channels, image_size, image_size, dtype=torch.float64)
    m(x).sum().backward()
    return float(sum((p.detach() * p.grad).abs().sum() for p in m.parameters() if p.grad is not None))


def naswot(model: nn.Module, x: torch.Tensor) -> float:
    m = model.eval()
    codes = []

    def hook(_mod, _inp, out):
        codes.append((out.detach() > 0).reshape(out.shape[0], -1).float())

    handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, (ConvBN, BasicBlock))]
    handles += [blk.bn1.register_forward_hook(hook) for blk in m.modules() if isinstance(blk, BasicBlock)]
    try:
        with torch.no_grad():
            m(x)
    finally:
        for h in handles:
            h.remove()
    c = torch.cat(codes, dim=1).double()
    k = c @ c.t() + (1 - c) @ (1 - c).t()
    sign, logdet = torch.linalg.slogdet(k)
    return float(logdet) if sign > 0 else float("-inf")


def score_all(models, x: torch.Tensor, image_size: int) -> dict[str, np.ndarray]:
    syn, nw = [], []
    for m in models:
        syn.append(np.log(synflow(m, image_size) + 1e-30))
        nw.append(naswot(m, x))
    return {"synflow": np.array(syn), "naswot": np.array(nw)}
