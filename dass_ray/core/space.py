"""The student search space around a ResNet-42 teacher (docs/method.md, section 1).

An architecture is a value: `ArchConfig` is frozen, validated against a `SpaceConfig`, hashable, round-trips
through JSON, and `sample`/`mutate` return new values from an RNG that the caller passes in.

A student has, per stage, a depth in 1..blocks_per_stage and, per present block, an output width in channels
taken from the stage's width grid (multipliers 0.5, 0.5625, ..., 1.0 of the teacher's stage width). The stem
has the width of the first block of stage 1. With `keep_last_width` the last present block of the last stage
keeps the teacher's final width, so the teacher's classifier and the functional encoder fit every student.

FLOPs here count a multiply-add as two operations, over convolutions and the classifier (BN, ReLU, pooling
and shortcut additions are not counted). Parameters are trainable parameters (BN running stats excluded).
Both are exact analytic counts: tests check them against the built network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

WIDTH_MULTIPLIERS: tuple[float, ...] = tuple(0.5 + k / 16 for k in range(9))


@dataclass(frozen=True)
class SpaceConfig:
    """Everything that defines the space and the teacher family. One object, two named presets."""

    name: str = "cpu"
    base_widths: tuple[int, ...] = (16, 32, 64, 128)
    width_mult: int = 1
    blocks_per_stage: tuple[int, ...] = (5, 5, 5, 5)
    strides: tuple[int, ...] = (1, 2, 2, 2)
    multipliers: tuple[float, ...] = WIDTH_MULTIPLIERS
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    keep_last_width: bool = True

    def __post_init__(self) -> None:
        n = len(self.base_widths)
        if not (len(self.blocks_per_stage) == len(self.strides) == n and n > 0):
            raise ValueError("base_widths, blocks_per_stage and strides must have the same length > 0")
        if any(b < 1 for b in self.blocks_per_stage):
            raise ValueError(f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}")
        if not self.multipliers or any(not 0 < m <= 1 for m in self.multipliers):
            raise ValueError(f"multipliers must lie in (0, 1], got {self.multipliers}")
        if self.image_size % self.downsample != 0:
            raise ValueError(f"image_size {self.image_size} must be divisible by {self.downsample}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")

    # ---- derived quantities -------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.base_widths)

    @property
    def downsample(self) -> int:
        return int(np.prod(self.strides))

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(b * self.width_mult for b in self.base_widths)

    @property
    def feature_channels(self) -> int:
        """Channels of the last stage's activation map (the functional embedding)."""
        return self.stage_widths[-1]

    @property
    def feature_size(self) -> int:
        return self.image_size // self.downsample

    def width_choices(self, stage: int) -> tuple[int, ...]:
        """Allowed output widths (channels) of a block of `stage`, ascending, the teacher's width last."""
        full = self.stage_widths[stage]
        return tuple(sorted({max(1, int(round(m * full))) for m in self.multipliers}))

    @property
    def encoding_size(self) -> int:
        depth_part = sum(self.blocks_per_stage)  # one-hot over 1..B per stage
        width_part = sum(b * len(self.width_choices(s)) for s, b in enumerate(self.blocks_per_stage))
        return depth_part + width_part

    def encoding_layout(self) -> dict:
        """Describes the encoding vector; stored in checkpoints so a mismatch is caught on load."""
        return {
            "version": 1,
            "depth_onehot": [list(range(1, b + 1)) for b in self.blocks_per_stage],
            "width_onehot": [list(self.width_choices(s)) for s in range(self.num_stages)],
            "blocks_per_stage": list(self.blocks_per_stage),
            "size": self.encoding_size,
        }

    def with_classes(self, num_classes: int) -> "SpaceConfig":
        return dataclasses.replace(self, num_classes=num_classes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpaceConfig":
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    # ---- members ------------------------------------------------------------------------------------------
    def teacher(self) -> "ArchConfig":
        """The largest member of the space: every block present at full width."""
        return ArchConfig(tuple((w,) * b for w, b in zip(self.stage_widths, self.blocks_per_stage)))

    def validate(self, arch: "ArchConfig") -> "ArchConfig":
        """Raise ValueError naming the offending stage/block if `arch` is not a member; else return it."""
        if len(arch.widths) != self.num_stages:
            raise ValueError(f"arch has {len(arch.widths)} stages, space {self.name!r} has {self.num_stages}")
        for s, stage in enumerate(arch.widths):
            if not 1 <= len(stage) <= self.blocks_per_stage[s]:
                raise ValueError(f"stage {s}: depth {len(stage)} not in 1..{self.blocks_per_stage[s]}")
            choices = self.width_choices(s)
            for b, w in enumerate(stage):
                if w not in choices:
                    raise ValueError(f"stage {s} block {b}: width {w} not in {choices}")
        if self.keep_last_width and arch.widths[-1][-1] != self.stage_widths[-1]:
            raise ValueError(
                f"last block must keep the teacher's final width {self.stage_widths[-1]}, got {arch.widths[-1][-1]}"
            )
        return arch

    def contains(self, arch: "ArchConfig") -> bool:
        try:
            self.validate(arch)
            return True
        except ValueError:
            return False

    def sample(
        self,
        rng: np.random.Generator,
        *,
        max_flops: float | None = None,
        max_params: float | None = None,
        max_tries: int = 10_000,
    ) -> "ArchConfig":
        """One uniformly drawn member (depths then widths), rejection-sampled under the budget."""
        for _ in range(max_tries):
            stages = []
            for s in range(self.num_stages):
                depth = int(rng.integers(1, self.blocks_per_stage[s] + 1))
                choices = self.width_choices(s)
                stages.append(tuple(int(choices[i]) for i in rng.integers(0, len(choices), size=depth)))
            if self.keep_last_width:
                stages[-1] = stages[-1][:-1] + (self.stage_widths[-1],)
            arch = ArchConfig(tuple(stages))
            if self.within_budget(arch, max_flops=max_flops, max_params=max_params):
                return arch
        raise ValueError(
            f"no architecture within budget (max_flops={max_flops}, max_params={max_params}) after {max_tries} "
            f"draws; the smallest member has {self.flops(self.smallest()):.4g} FLOPs and "
            f"{self.params(self.smallest())} params"
        )

    def sample_many(
        self,
        rng: np.random.Generator,
        n: int,
        *,
        max_flops: float | None = None,
        max_params: float | None = None,
        unique: bool = True,
    ) -> list["ArchConfig"]:
        """`n` members (distinct when `unique`), in draw order."""
        self.check_budget(max_flops=max_flops, max_params=max_params)
        out: list[ArchConfig] = []
        seen: set[ArchConfig] = set()
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + 1000:
                raise ValueError(f"could only draw {len(out)} distinct architectures of {n} within the budget")
            a = self.sample(rng, max_flops=max_flops, max_params=max_params)
            if unique and a in seen:
                continue
            seen.add(a)
            out.append(a)
        return out

    def mutate(self, arch: "ArchConfig", rng: np.random.Generator, n_changes: int = 1) -> "ArchConfig":
        """A new member differing from `arch` in `n_changes` random edits (a depth or one block width)."""
        stages = [list(s) for s in self.validate(arch).widths]
        for _ in range(n_changes):
            s = int(rng.integers(self.num_stages))
            choices = self.width_choices(s)
            if rng.random() < 0.3:
                depth = int(rng.integers(1, self.blocks_per_stage[s] + 1))
                while len(stages[s]) < depth:
                    stages[s].append(int(choices[rng.integers(len(choices))]))
                del stages[s][depth:]
            else:
                b = int(rng.integers(len(stages[s])))
                stages[s][b] = int(choices[rng.integers(len(choices))])
            if self.keep_last_width:
                stages[-1][-1] = self.stage_widths[-1]
        return self.validate(ArchConfig(tuple(tuple(s) for s in stages)))

    def smallest(self) -> "ArchConfig":
        stages = [(self.width_choices(s)[0],) for s in range(self.num_stages)]
        if self.keep_last_width:
            stages[-1] = (self.stage_widths[-1],)
        return ArchConfig(tuple(stages))

    def within_budget(self, arch: "ArchConfig", *, max_flops=None, max_params=None) -> bool:
        if max_flops is not None and self.flops(arch) > max_flops:
            return False
        if max_params is not None and self.params(arch) > max_params:
            return False
        return True

    def check_budget(self, *, max_flops=None, max_params=None) -> None:
        """Raise ValueError if no member can meet the budget (the smallest member is the cheapest)."""
        if max_flops is not None and max_flops <= 0:
            raise ValueError(f"max_flops must be > 0, got {max_flops}")
        if max_params is not None and max_params <= 0:
            raise ValueError(f"max_params must be > 0, got {max_params}")
        small = self.smallest()
        if not self.within_budget(small, max_flops=max_flops, max_params=max_params):
            raise ValueError(
                f"impossible budget: the smallest student has {self.flops(small):,} FLOPs and "
                f"{self.params(small):,} params (asked max_flops={max_flops}, max_params={max_params})"
            )

    # ---- analytic costs -----------------------------------------------------------------------------------
    def layer_shapes(self, arch: "ArchConfig") -> list[tuple[str, int, int, int, int]]:
        """(name, c_in, c_out, kernel, out_hw) for every conv/linear of `arch`, in forward order."""
        hw = self.image_size
        stem_w = arch.widths[0][0]
        out = [("stem.conv", self.in_channels, stem_w, 3, hw)]
        c = stem_w
        for s, stage in enumerate(arch.widths):
            hw = hw // self.strides[s]
            for b, w in enumerate(stage):
                out.append((f"stages.{s}.{b}.conv1", c, w, 3, hw))
                out.append((f"stages.{s}.{b}.conv2", w, w, 3, hw))
                c = w
        out.append(("fc", c, self.num_classes, 1, 1))
        return out

    def flops(self, arch: "ArchConfig") -> int:
        """Forward FLOPs on one image (2 x multiply-adds of convs and the classifier)."""
        return int(sum(2 * ci * co * k * k * hw * hw for _, ci, co, k, hw in self.layer_shapes(arch)))

    def params(self, arch: "ArchConfig") -> int:
        """Trainable parameters: conv weights (no bias), BN weight+bias per conv, classifier weight+bias."""
        total = 0
        for name, ci, co, k, _ in self.layer_shapes(arch):
            total += ci * co * k * k + (co if name == "fc" else 2 * co)
        return int(total)

    # ---- encoding -----------------------------------------------------------------------------------------
    def encode(self, arch: "ArchConfig") -> np.ndarray:
        """Fixed-length float32 vector: one-hot depth per stage, then one-hot width per block slot."""
        self.validate(arch)
        vec = np.zeros(self.encoding_size, dtype=np.float32)
        pos = 0
        for s, b in enumerate(self.blocks_per_stage):
            vec[pos + len(arch.widths[s]) - 1] = 1.0
            pos += b
        for s, nb in enumerate(self.blocks_per_stage):
            choices = self.width_choices(s)
            for b in range(nb):
                if b < len(arch.widths[s]):
                    vec[pos + choices.index(arch.widths[s][b])] = 1.0
                pos += len(choices)
        return vec

    def encode_many(self, archs: Sequence["ArchConfig"]) -> np.ndarray:
        return np.stack([self.encode(a) for a in archs]) if archs else np.zeros((0, self.encoding_size), np.float32)

    def decode(self, vec: Iterable[float]) -> "ArchConfig":
        v = np.asarray(list(vec), dtype=np.float32)
        if v.shape != (self.encoding_size,):
            raise ValueError(f"encoding has size {v.shape}, expected ({self.encoding_size},)")
        pos, depths = 0, []
        for b in self.blocks_per_stage:
            depths.append(int(np.argmax(v[pos:pos + b])) + 1)
            pos += b
        stages = []
        for s, nb in enumerate(self.blocks_per_stage):
            choices = self.width_choices(s)
            ws = []
            for b in range(nb):
                if b < depths[s]:
                    ws.append(choices[int(np.argmax(v[pos:pos + len(choices)]))])
                pos += len(choices)
            stages.append(tuple(ws))
        return self.validate(ArchConfig(tuple(stages)))


@dataclass(frozen=True)
class ArchConfig:
    """A network of the family: `widths[s][b]` is the output width (channels) of block b of stage s.

    The depth of stage s is `len(widths[s])`. Validation against a space is `SpaceConfig.validate`.
    """

    widths: tuple[tuple[int, ...], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        w = tuple(tuple(int(x) for x in stage) for stage in self.widths)
        if any(len(stage) == 0 for stage in w):
            raise ValueError(f"every stage needs at least one block, got {w}")
        if any(x <= 0 for stage in w for x in stage):
            raise ValueError(f"widths must be positive, got {w}")
        object.__setattr__(self, "widths", w)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.widths)

    def to_dict(self) -> dict:
        return {"widths": [list(s) for s in self.widths]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        if not isinstance(d, dict) or "widths" not in d:
            raise ValueError(f"architecture must be a dict with 'widths', got {d!r}")
        return cls(tuple(tuple(s) for s in d["widths"]))

    @classmethod
    def from_json(cls, s: str) -> "ArchConfig":
        return cls.from_dict(json.loads(s))

    def digest(self) -> str:
        """Stable short id (sha256 of the canonical JSON), the same on every machine."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


PRESETS: dict[str, SpaceConfig] = {
    # Our CPU scale: base widths x1 at 32x32.
    "cpu": SpaceConfig(name="cpu", width_mult=1, image_size=32),
    # The authors' scale: base widths x2 at 64x64.
    "paper": SpaceConfig(name="paper", width_mult=2, image_size=64),
}


def get_space(name: str, num_classes: int | None = None) -> SpaceConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown space preset {name!r}; known: {sorted(PRESETS)}")
    sp = PRESETS[name]
    return sp.with_classes(num_classes) if num_classes is not None else sp
