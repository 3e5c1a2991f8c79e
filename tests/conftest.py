import numpy as np
import pytest
import torch

from dass_ray.nets import build
from dass_ray.space import get_space


def randomize_bn(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial statistics and affine params (a fresh net's are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return net


@pytest.fixture(scope="session")
def cpu_space():
    return get_space("cpu")


@pytest.fixture(scope="session")
def cpu_teacher(cpu_space):
    return randomize_bn(build(cpu_space.teacher(), cpu_space, seed=0)).eval()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
