"""Parameter remapping teacher -> student: pure functions over state dicts (docs/method.md, section 2).

Student block b of stage s takes teacher block b of stage s and keeps a subset of the output and input
channels of every conv (BN weight, bias and running statistics sliced alike); the stem is sliced; the
classifier is copied, sliced on its input side if the widths differ. A scheme only decides *which* channels
are kept (`channel_index(n_teacher, n_student)`); registering one is a 3-line function.

Every key and shape is asserted: against the teacher's expected state dict on the way in, and against the
student's on the way out.
"""

from __future__ import annotations

from typing import Callable

import torch

from dass_ray.core.nets import build, expected_shapes
from dass_ray.core.space import ArchConfig, SpaceConfig

IndexFn = Callable[[int, int], torch.Tensor]
_SCHEMES: dict[str, IndexFn | None] = {}


def register_scheme(name: str):
    def deco(fn):
        _SCHEMES[name] = fn
        return fn

    return deco


@register_scheme("first_k")
def first_k(n: int, k: int) -> torch.Tensor:
    """The first k channels (the default: makes a student a masked sub-network of the teacher)."""
    return torch.arange(k)


@register_scheme("last_k")
def last_k(n: int, k: int) -> torch.Tensor:
    return torch.arange(n - k, n)


@register_scheme("uniform")
def uniform_stride(n: int, k: int) -> torch.Tensor:
    """k channels spread evenly over n (first and last included)."""
    if k == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.round(torch.linspace(0, n - 1, k)).long()


_SCHEMES["random"] = None  # random init: no teacher weights are used


def schemes() -> list[str]:
    return sorted(_SCHEMES)


def check_state_dict(sd: dict[str, torch.Tensor], arch: ArchConfig, space: SpaceConfig, what: str) -> None:
    """Raise ValueError unless `sd` has exactly the keys and shapes of `build(arch, space)`."""
    exp = expected_shapes(arch, space)
    missing = sorted(set(exp) - set(sd))
    extra = sorted(set(sd) - set(exp))
    if missing or extra:
        raise ValueError(f"{what}: state dict keys differ; missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in exp.items():
        if tuple(sd[k].shape) != shape:
            raise ValueError(f"{what}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")


def remap(
    teacher_sd: dict[str, torch.Tensor],
    teacher_arch: ArchConfig,
    student_arch: ArchConfig,
    space: SpaceConfig,
    scheme: str = "first_k",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Return the student's state dict built from the teacher's (new tensors; the teacher's are untouched).

    Args:
        teacher_sd: state dict of `build(teacher_arch, space)`.
        student_arch: a member of `space` with depths <= the teacher's in every stage.
        scheme: one of `schemes()`; "random" ignores the teacher and returns a seeded random init.
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"unknown remapping scheme {scheme!r}; known: {schemes()}")
    space.validate(student_arch)
    check_state_dict(teacher_sd, teacher_arch, space, "teacher")
    for s, (ts, ss) in enumerate(zip(teacher_arch.widths, student_arch.widths)):
        if len(ss) > len(ts):
            raise ValueError(f"stage {s}: student depth {len(ss)} exceeds the teacher's {len(ts)}")
    if _SCHEMES[scheme] is None:
        return {k: v.clone() for k, v in build(student_arch, space, seed=seed).state_dict().items()}
    pick = _SCHEMES[scheme]

    out: dict[str, torch.Tensor] = {}

    def idx(n: int, k: int) -> torch.Tensor:
        if k > n:
            raise ValueError(f"student width {k} exceeds teacher width {n}")
        return pick(n, k)

    def take_conv(t_key: str, s_key: str, o_idx: torch.Tensor, i_idx: torch.Tensor) -> None:
        out[s_key] = teacher_sd[t_key].index_select(0, o_idx).index_select(1, i_idx).clone()

    def take_bn(t_prefix: str, s_prefix: str, o_idx: torch.Tensor) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            out[f"{s_prefix}.{k}"] = teacher_sd[f"{t_prefix}.{k}"].index_select(0, o_idx).clone()
        out[f"{s_prefix}.num_batches_tracked"] = teacher_sd[f"{t_prefix}.num_batches_tracked"].clone()

    t_stem, s_stem = teacher_arch.widths[0][0], student_arch.widths[0][0]
    o = idx(t_stem, s_stem)
    take_conv("stem.conv.weight", "stem.conv.weight", o, torch.arange(space.in_channels))
    take_bn("stem.bn", "stem.bn", o)
    prev_t, prev_s = t_stem, s_stem
    for s, stage in enumerate(student_arch.widths):
        for b, w in enumerate(stage):
            tw = teacher_arch.widths[s][b]
            p = f"stages.{s}.{b}"
            o, i = idx(tw, w), idx(prev_t, prev_s)
            take_conv(f"{p}.conv1.weight", f"{p}.conv1.weight", o, i)
            take_bn(f"{p}.bn1", f"{p}.bn1", o)
            take_conv(f"{p}.conv2.weight", f"{p}.conv2.weight", o, o)
            take_bn(f"{p}.bn2", f"{p}.bn2", o)
            prev_s = w
            prev_t = tw
        # the teacher block that feeds the next stage is its last one, whatever the student's depth
        prev_t = teacher_arch.widths[s][-1]
    i = idx(prev_t, prev_s)
    out["fc.weight"] = teacher_sd["fc.weight"].index_select(1, i).clone()
    out["fc.bias"] = teacher_sd["fc.bias"].clone()
    check_state_dict(out, student_arch, space, "student")
    return out


def remapped_student(teacher_sd, teacher_arch, student_arch, space, scheme: str = "first_k", seed: int = 0):
    """Convenience: a built student module loaded with the remapped weights."""
    net = build(student_arch, space)
    net.load_state_dict(remap(teacher_sd, teacher_arch, student_arch, space, scheme, seed))
    return net
