"""Functional embeddings (docs/method.md, section 3): the last-stage map of a network on one fixed Gaussian input.

This is the hot path of search (thousands of candidates per task), so besides the plain reference
(`embed_reference`: build each remapped student, run it) there is a batched engine, `Embedder`, for the
default first-k remapping. With first-k, a student's block is the teacher's block restricted to its first
channels, so its convs are *slices of the teacher's BN-folded weights*, and a student is the teacher with
its channels past each block's width zeroed and its missing blocks skipped (parameter-free shortcuts make a
skipped block an identity).

How the engine works (measured by `benchmarks/bench_scoring.py`, which credits only each candidate's own FLOPs):

* **Rows are architecture prefixes, not candidates.** The map after block slot k depends only on the widths
  of slots 0..k, and random candidates share short prefixes (the stem and the first blocks of the first stage
  take one of 9, then 81, ... values). The engine walks the teacher's block slots once; at each slot it keys
  every candidate by (its prefix node, its width here) and keeps one activation row per distinct key. Shared
  prefixes are computed once (the stem is the first such prefix), and the final map of each candidate is its
  node's row. `Embedder.stats` reports the rows and conv FLOPs actually executed.
* **One gather per slot, then contiguous groups.** The new rows are gathered from their parents in one
  `index_select`, sorted by this slot's width, so each width group is a contiguous run of rows: one fused
  conv1+bias+ReLU call and one conv2 call per group (at most 9 per slot), no per-group gathers or scatters.
* **Rows stay at the teacher's width with exact zeros past the candidate's own width**, in channels-last
  layout. conv1 reads the full row (the zeros add nothing; oneDNN pads small channel counts to its vector
  width anyway). conv2 runs with its weights zero-padded to the teacher's width and adds *in place* onto the
  row, which already holds the identity shortcut, with the add and ReLU fused as oneDNN post-ops; only the
  shortcut channels a narrower block drops are zeroed first. A stride-2 block writes its max-pooled shortcut
  into the next resolution's buffer. Absent blocks are rows left as they are.
* **No allocation in the loop.** The activation rows live in two reusable flat buffers (ping-pong between
  slots) kept by the Embedder between calls (each reserves batch_size x the largest row, 128 MiB at the CPU
  preset and the default batch; pages are touched only as rows are written), and the sliced, padded,
  channels-last weights are cached per (slot, width) (~50 MB at the CPU preset): a fresh multi-MB tensor
  per op costs more in page faults than the copy into it. Concurrent calls on one Embedder are safe (a call
  that finds the buffers busy uses private ones).

oneDNN builds a kernel per input shape and group sizes vary, so `dass_ray/__init__` enlarges its primitive
cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY) before torch loads; a long-lived encoder reuses them. Without
oneDNN (`torch.backends.mkldnn` unavailable) the same schedule runs on `F.conv2d` and in-place adds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dass_ray.core.nets import build, match_channels
from dass_ray.core.remap import check_state_dict, remapped_student
from dass_ray.core.space import ArchConfig, SpaceConfig


def noise_input(space: SpaceConfig, seed: int = 0) -> torch.Tensor:
    """The fixed Gaussian probe [1, in_channels, S, S]; same seed, same tensor on every machine."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, space.in_channels, space.image_size, space.image_size, generator=g)


def embed_reference(
    teacher_sd: dict[str, torch.Tensor],
    archs: Sequence[ArchConfig],
    space: SpaceConfig,
    x: torch.Tensor,
    scheme: str = "first_k",
    teacher_arch: ArchConfig | None = None,
) -> torch.Tensor:
    """Plain per-student path: remap, build, forward in eval mode. Returns [N, C4, h, w]."""
    teacher_arch = teacher_arch or space.teacher()
    outs = []
    with torch.inference_mode():
        for a in archs:
            net = remapped_student(teacher_sd, teacher_arch, a, space, scheme).eval()
            outs.append(match_channels(net.features(x), space.feature_channels))
    return torch.cat(outs) if outs else torch.zeros(0, space.feature_channels, space.feature_size, space.feature_size)


@dataclass
class _Folded:
    weight: torch.Tensor  # [C_out, C_in, 3, 3], BN scale folded in
    bias: torch.Tensor  # [C_out]


def _fold(sd: dict[str, torch.Tensor], conv: str, bn: str, eps: float = 1e-5) -> _Folded:
    scale = sd[f"{bn}.weight"] / torch.sqrt(sd[f"{bn}.running_var"] + eps)
    w = sd[f"{conv}.weight"] * scale[:, None, None, None]
    b = sd[f"{bn}.bias"] - sd[f"{bn}.running_mean"] * scale
    return _Folded(w.contiguous(), b.contiguous())



_CL = torch.channels_last


def _cl_view(flat: torch.Tensor, n: int, c: int, hw: int) -> torch.Tensor:
    """[n, c, hw, hw] channels-last view of the first n*c*hw*hw floats of `flat`."""
    return flat[: n * c * hw * hw].view(n, hw, hw, c).permute(0, 3, 1, 2)


class _Workspace:
    """Two flat float buffers; activation rows ping-pong between them from slot to slot."""

    def __init__(self) -> None:
        self.bufs = [torch.empty(0), torch.empty(0)]

    def reserve(self, numel: int) -> None:
        """Grow both buffers to `numel` floats (pages are only touched as rows are written)."""
        for i, buf in enumerate(self.bufs):
            if buf.numel() < numel:
                self.bufs[i] = torch.empty(0)  # free the old one first
                self.bufs[i] = torch.empty(numel)

    def get(self, i: int, n: int, c: int, hw: int) -> torch.Tensor:
        if self.bufs[i].numel() < n * c * hw * hw:
            raise AssertionError("workspace too small")  # reserve() covers every slot of a batch
        return _cl_view(self.bufs[i], n, c, hw)


def _use_onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _conv_relu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int, onednn: bool) -> torch.Tensor:
    """relu(conv3x3(x) + b), padding 1; channels-last in and out."""
    if onednn:
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, [1, 1], [stride, stride], [1, 1], 1, "relu", [], "")
    return F.relu(F.conv2d(x, w, b, stride, 1))


def _conv_add_relu_(out: torch.Tensor, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, onednn: bool) -> None:
    """out <- relu(out + conv3x3(h) + b), in place (out is a contiguous channels-last block of rows)."""
    if onednn:
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, h, w, b, [1, 1], [1, 1], [1, 1], 1, "add", None, "relu", [], "")
    else:
        out.add_(F.conv2d(h, w, b, 1, 1)).relu_()


class Embedder:
    """Batched first-k functional embeddings of many students of one teacher.

    Args:
        teacher_sd: the teacher's state dict (the teacher is `space.teacher()` unless `teacher_arch` is given).
        space: the search space (image size, widths).
        seed: seed of the Gaussian probe.

    After each `embed` call, `stats` holds what the engine executed: `rows` (activation rows computed, summed
    over block slots; a row is a distinct architecture prefix) and `conv_flops` (2 x multiply-adds of the
    conv calls it ran, padding included), next to `candidates` and `candidate_block_rows` (rows a
    one-row-per-candidate engine would compute).
    """

    def __init__(
        self,
        teacher_sd: dict[str, torch.Tensor],
        space: SpaceConfig,
        seed: int = 0,
        teacher_arch: ArchConfig | None = None,
    ):
        self.space = space
        self.teacher_arch = teacher_arch or space.teacher()
        check_state_dict(teacher_sd, self.teacher_arch, space, "teacher")
        if any(len(set(s)) != 1 for s in self.teacher_arch.widths):
            raise ValueError("the batched engine needs a teacher with one width per stage")
        if any(st not in (1, 2) for st in space.strides):
            raise ValueError(f"the batched engine supports strides 1 and 2, got {space.strides}")
        self.teacher_sd = {k: v.detach().clone() for k, v in teacher_sd.items()}
        self.x = noise_input(space, seed)
        self.seed = seed
        sd = self.teacher_sd
        self.stem = _fold(sd, "stem.conv", "stem.bn")
        self.blocks: list[list[tuple[_Folded, _Folded]]] = [
            [(_fold(sd, f"stages.{s}.{b}.conv1", f"stages.{s}.{b}.bn1"),
              _fold(sd, f"stages.{s}.{b}.conv2", f"stages.{s}.{b}.bn2")) for b in range(len(stage))]
            for s, stage in enumerate(self.teacher_arch.widths)
        ]
        self._slots = [(s, b) for s, stage in enumerate(self.teacher_arch.widths) for b in range(len(stage))]
        # per stage: the widths a member may use that the teacher has, and the teacher's depth
        self._choices = [(frozenset(w for w in space.width_choices(s) if w <= stage[0]),
                          min(len(stage), space.blocks_per_stage[s]))
                         for s, stage in enumerate(self.teacher_arch.widths)]
        with torch.inference_mode():
            self._stem_out = F.relu(F.conv2d(self.x, self.stem.weight, self.stem.bias, padding=1))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._weights: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}
        self._ws = _Workspace()
        self._ws_lock = threading.Lock()
        self.stats: dict[str, int] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_weights", "_ws", "_ws_lock"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def teacher_embedding(self) -> torch.Tensor:
        """The teacher's own map [1, C4, h, w], through the plain module (exact)."""
        net = build(self.teacher_arch, self.space)
        net.load_state_dict(self.teacher_sd)
        with torch.inference_mode():
            return net.eval().features(self.x)

    @torch.inference_mode()
    def embed(self, archs: Sequence[ArchConfig], batch_size: int = 2048) -> torch.Tensor:
        """Embeddings [N, C4, h, w] in the order of `archs` (float32). `batch_size` candidates per pass."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for a in archs:
            if not self._fast_member(a):
                self.space.validate(a)  # raises the space's own error
                for s, (ts, ss) in enumerate(zip(self.teacher_arch.widths, a.widths)):
                    if len(ss) > len(ts):
                        raise ValueError(f"stage {s}: student depth {len(ss)} exceeds the teacher's {len(ts)}")
                    if max(ss) > ts[0]:
                        raise ValueError(f"stage {s}: student width {max(ss)} exceeds the teacher's {ts[0]}")
        stats = {"candidates": len(archs), "candidate_block_rows": 0, "rows": 0, "conv_flops": 0}
        f = self.space.feature_size
        out = torch.empty(len(archs), self.space.feature_channels, f, f)
        shared = self._ws_lock.acquire(blocking=False)  # a concurrent call gets private buffers
        try:
            ws = self._ws if shared else _Workspace()
            for i in range(0, len(archs), batch_size):
                self._embed_batch(archs[i:i + batch_size], ws, stats, out[i:i + batch_size])
        finally:
            if shared:
                self._ws_lock.release()
        self.stats = stats
        return out

    def _fast_member(self, a: ArchConfig) -> bool:
        """True if `a` is a member of the space that fits the teacher (the rules of `SpaceConfig.validate`
        with precomputed width sets: validating thousands of candidates is otherwise a visible share of a
        call). False sends `a` through `validate` and the teacher checks, which raise the error."""
        ws = a.widths
        if len(ws) != len(self._choices) or len(ws) != self.space.num_stages:
            return False
        for stage, (choices, max_depth) in zip(ws, self._choices):
            if not 1 <= len(stage) <= max_depth or not choices.issuperset(stage):
                return False
        return not self.space.keep_last_width or ws[-1][-1] == self.space.stage_widths[-1]

    def _block_weights(self, s: int, b: int, w: int, c_in: int) -> tuple[torch.Tensor, ...]:
        """(conv1 weight [w, c_in], conv1 bias, conv2 weight and bias zero-padded to the stage width)."""
        key = (s, b, w)
        if key not in self._weights:
            c1, c2 = self.blocks[s][b]
            c_out = c2.weight.shape[0]
            w2 = torch.zeros(c_out, w, 3, 3)
            w2[:w] = c2.weight[:w, :w]
            b2 = torch.zeros(c_out)
            b2[:w] = c2.bias[:w]
            self._weights[key] = (c1.weight[:w, :c_in].contiguous(memory_format=_CL), c1.bias[:w].clone(),
                                  w2.contiguous(memory_format=_CL), b2)
        return self._weights[key]

    def _embed_batch(self, archs: Sequence[ArchConfig], ws: _Workspace, stats: dict, out: torch.Tensor) -> None:
        """Write the maps of `archs` into `out` [n, C4, h, w]; add what was executed to `stats`."""
        n = len(archs)
        onednn = _use_onednn()
        tw = [stage[0] for stage in self.teacher_arch.widths]
        # widths[i, k]: candidate i's width at block slot k, 0 where the block is absent
        widths = np.array([[a.widths[s][b] if b < len(a.widths[s]) else 0 for s, b in self._slots] for a in archs],
                          dtype=np.int64)
        stats["candidate_block_rows"] += int((widths > 0).sum())
        # Prefix nodes before slot 0: the stem, one node per stem width (= width of block (0, 0)).
        cur, node = np.unique(widths[:, 0], return_inverse=True)  # cur[j]: channel width of node j's row
        hw = self._stem_out.shape[-1]
        per_row, r = tw[0] * hw * hw, hw  # largest row of any slot: a node never has more rows than n
        for s, st in enumerate(self.space.strides):
            r //= st
            per_row = max(per_row, tw[s] * r * r, (tw[s - 1] if s else tw[0]) * r * r * st * st)
        ws.reserve(n * per_row)
        bi = 0
        act = ws.get(bi, len(cur), tw[0], hw)
        for j, c in enumerate(cur.tolist()):
            act[j].copy_(self._stem_out[0])
            act[j, c:].zero_()
        for k, (s, b) in enumerate(self._slots):
            stride = self.space.strides[s] if b == 0 else 1
            c_in, c_out = act.shape[1], tw[s]
            # children = distinct (width here, parent node), sorted by width, so width groups are contiguous
            n_par = len(cur)
            keys, node = np.unique(widths[:, k] * n_par + node, return_inverse=True)
            parent, child_w = keys % n_par, keys // n_par
            rows = len(keys)
            bi = 1 - bi
            x = torch.index_select(act, 0, torch.from_numpy(parent), out=ws.get(bi, rows, c_in, act.shape[-1]))
            cur = cur[parent]
            if stride > 1 or c_out != c_in:  # block 0 of a stage: every candidate has it
                nxt = ws.get(1 - bi, rows, c_out, x.shape[-1] // stride)  # the parents' buffer is free now
                bi = 1 - bi
            else:
                nxt = x  # in place: rows hold the identity shortcut
            group_w, starts, counts = np.unique(child_w, return_index=True, return_counts=True)
            for w, lo, m in zip(group_w.tolist(), starts.tolist(), counts.tolist()):
                if w == 0:  # absent block: the rows stay as they are
                    if nxt is not x:
                        raise AssertionError("absent block at a resolution change")
                    continue
                w1, b1, w2, b2 = self._block_weights(s, b, w, c_in)
                xg, y = x[lo:lo + m], nxt[lo:lo + m]
                h = _conv_relu(xg, w1, b1, stride, onednn)
                if nxt is x:  # shortcut = the row truncated to w: zero the channels the block drops
                    c_max = int(cur[lo:lo + m].max())
                    if w < c_max:
                        y[:, w:c_max].zero_()
                else:  # shortcut = max-pooled row, truncated or zero-padded to the block's width
                    kk = min(c_in, w)
                    d = y[:, :kk]
                    if stride > 1:
                        torch.maximum(xg[:, :kk, 0::2, 0::2], xg[:, :kk, 0::2, 1::2], out=d)
                        torch.maximum(d, xg[:, :kk, 1::2, 0::2], out=d)
                        torch.maximum(d, xg[:, :kk, 1::2, 1::2], out=d)
                    else:
                        d.copy_(xg[:, :kk])
                    if kk < c_out:
                        y[:, kk:].zero_()
                _conv_add_relu_(y, h, w2, b2, onednn)
                hh = h.shape[-1]
                stats["conv_flops"] += 2 * 9 * hh * hh * m * w * (c_in + c_out)
            stats["rows"] += int((child_w > 0).sum())
            cur = np.where(child_w > 0, child_w, cur)
            act = nxt
        out.copy_(match_channels(act.index_select(0, torch.from_numpy(node)), self.space.feature_channels))
