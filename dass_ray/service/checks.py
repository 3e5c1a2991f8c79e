"""Checks of uploads and requests that need torch, run in worker processes so the server process stays light.

The server (`Checker`) never imports torch or Ray: it sends each check (a JSON line) to a few worker processes
(`python -m dass_ray.service.checks`) that import the project's dataset adapters and checkpoint loader. A check answers `(info, None)` or `(None, reason)`:
the reason is one line a user understands, naming the file as the client knows it (`shown`) and never a server
path or an internal exception's text (those go to the server log). A worker that dies (a hostile file crashing a
decoder, memory) fails only that check and is replaced.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger("dass_ray.checks")

_FORMAT_HINT = {".parquet": "a Parquet file with columns image (PNG/JPEG bytes), label (int) and label_name",
                ".npz": "a NumPy .npz archive with arrays images [N, H, W] or [N, H, W, C] and labels [N]"}


def _scrub(msg: str, path: str, shown: str) -> str:
    return " ".join(msg.replace(path, shown).split())[:500]


def dataset_info(path: str, shown: str) -> tuple[dict | None, str | None]:
    """Decode a dataset file with the project's adapters: its classes, size and image shape."""
    from pathlib import Path

    from dass_ray.core.data import DatasetError, load_dataset

    try:
        ds = load_dataset(path)
    except DatasetError as e:  # the adapters' own messages name the row and field
        return None, _scrub(str(e), path, shown)
    except Exception as e:  # noqa: BLE001 - a hostile file may break a decoder in any way
        log.warning("dataset %s (%s) unreadable: %r", shown, path, e)
        hint = _FORMAT_HINT.get(Path(path).suffix.lower(), "a .parquet or .npz dataset")
        return None, f"{shown}: not a readable dataset (expected {hint})"
    if len(ds) == 0:
        return None, f"{shown}: no images"
    h, w = ds.image_size
    names = [str(n) for n in ds.class_names]
    return {"num_classes": ds.num_classes, "num_images": len(ds), "image_height": h, "image_width": w,
            "class_names": names[:20], "all_class_names": names,
            "class_counts": [int(n) for n in ds.class_counts()]}, None


def foreign_teacher_info(path: str, shown: str, kind: str) -> tuple[dict | None, str | None]:
    """A TorchScript or ONNX teacher (`dass_ray.core.foreign`): it must load and run; its head width from a probe
    batch (an ONNX file's fixed input size, else 32, 64, 224 px tried; 0 when none answers: checked when a search
    runs it), its input size where the file fixes one (else 0: decided by the search)."""
    import re

    from dass_ray.core.foreign import ForeignError, TeacherOptions, _onnx_input_shape, load_foreign

    fixed = 0
    if kind == "onnx":
        try:
            _, h, w = _onnx_input_shape(Path(path).read_bytes())
            fixed = int(h or 0) if h == w else 0
        except Exception:  # noqa: BLE001 - load_foreign below answers with the reason
            pass
    for side in (0, 32, 64, 224):
        classes = 0
        try:
            load_foreign(path, TeacherOptions(image_size=side), 1, (32, 32))
            classes = 1
        except ForeignError as e:
            m = re.search(r"its head has (\d+) classes", str(e))
            if m:
                classes = int(m.group(1))
            elif e.option == "--teacher-image-size":
                continue  # the probe's size was rejected: try the next one
            else:
                log.warning("teacher %s (%s) refused: %s", shown, path, e)
                return None, _scrub(str(e), path, shown)
        except Exception as e:  # noqa: BLE001 - a hostile file may break a loader in any way
            log.warning("teacher %s (%s) unreadable: %r", shown, path, e)
            return None, f"{shown}: a {kind} file that does not load"
        return {"num_classes": classes, "image_size": fixed, "val_acc": 0.0, "space": "", "kind": kind}, None
    return {"num_classes": 0, "image_size": fixed, "val_acc": 0.0, "space": "", "kind": kind}, None


def teacher_info(path: str, shown: str) -> tuple[dict | None, str | None]:
    """Load a teacher checkpoint: its head width, input size, recorded accuracy and search space; or a foreign
    teacher (TorchScript, ONNX; recognised by content): `foreign_teacher_info`."""
    from dass_ray.core.foreign import sniff
    from dass_ray.core.kd import load_teacher

    kind = sniff(path)
    if kind is not None:
        return foreign_teacher_info(path, shown, kind)
    try:
        ck = load_teacher(path)
    except ValueError as e:
        log.warning("teacher %s (%s) refused: %r (cause %r)", shown, path, e, e.__cause__)
        return None, _scrub(str(e), path, shown)
    except Exception as e:  # noqa: BLE001
        log.warning("teacher %s (%s) unreadable: %r", shown, path, e)
        return None, (f"{shown}: not a readable teacher checkpoint (expected a file written by train_teacher.py, "
                      f"or a TorchScript or ONNX classifier)")
    return {"num_classes": int(ck.space.num_classes), "image_size": int(ck.space.image_size),
            "val_acc": float(ck.val_acc), "space": ck.space.name, "kind": "family"}, None


def budget(scale: str, num_classes: int, max_flops: int, max_params: int) -> tuple[dict | None, str | None]:
    """Whether any student of the scale's space fits the budget."""
    from dass_ray.core.config import get_scale
    from dass_ray.core.space import get_space

    try:
        space = get_space(get_scale(scale).space, num_classes=num_classes)
        space.check_budget(max_flops=max_flops or None, max_params=max_params or None)
    except ValueError as e:
        return None, " ".join(str(e).split())[:500]
    return {}, None


def _client_cell(v, prefix: str, hidden: list[str], path_column: bool):
    if not isinstance(v, str):
        return v
    if path_column:  # a file of the search: named relative to its output directory, or not at all
        if v.startswith(prefix):
            return v[len(prefix):]
        return "" if v.startswith("/") or "://" in v else v
    v = v.replace(prefix, "")
    for h in hidden:
        v = v.replace(h, "<server>")
    return v


def client_table(src: str, dst: str, out_dir: str, hidden: list[str]) -> tuple[dict | None, str | None]:
    """A copy of a job's Parquet table for its client (`dst`, written whole): no cell names a server file. The
    `checkpoint` column (trials.parquet) becomes relative to the job's output directory `out_dir` (empty when
    elsewhere); any other text loses `out_dir` and the server directories `hidden`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(src)
    prefix = out_dir.rstrip("/") + "/"
    cols = []
    for field, col in zip(t.schema, t.columns):
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type):
            col = pa.array([_client_cell(v, prefix, hidden, field.name == "checkpoint") for v in col.to_pylist()],
                           type=field.type)
        cols.append(col)
    tmp = f"{dst}.{os.getpid()}.tmp"
    pq.write_table(pa.Table.from_arrays(cols, schema=t.schema), tmp)
    os.replace(tmp, dst)
    return {}, None


_CHECKS = {"dataset": dataset_info, "teacher": teacher_info, "budget": budget, "client_table": client_table}


def _worker_main() -> int:
    """`python -m dass_ray.service.checks`: answer one JSON request line per line on stdin."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own pipe; library prints go to stderr
    os.dup2(2, 1)
    import dass_ray.core.data  # noqa: F401 - import torch and the adapters before the first request
    import dass_ray.core.kd  # noqa: F401 - and the checkpoint loader

    proto.write("ready\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            info, err = _CHECKS[req["op"]](**req["kw"])
        except Exception as e:  # noqa: BLE001 - never let one request kill the worker
            log.exception("check failed")
            info, err = None, f"the check failed ({type(e).__name__})"
        proto.write(json.dumps([info, err]) + "\n")
    return 0


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "dass_ray.service.checks"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, start_new_session=True)
        self.ready = False

    def _readline(self, timeout_s: float) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not r:
            raise TimeoutError
        line = self.proc.stdout.readline()
        if not line:
            raise EOFError
        return line

    def call(self, op: str, kw: dict, timeout_s: float):
        if not self.ready:
            if self._readline(timeout_s).strip() != "ready":
                raise EOFError
            self.ready = True
        self.proc.stdin.write(json.dumps({"op": op, "kw": kw}) + "\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self._readline(timeout_s)))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class Checker:
    """`workers` worker processes (`python -m dass_ray.service.checks`, started on first use or by `warm()`)
    that run the checks above, one request at a time each. A worker that crashes or times out is replaced."""

    def __init__(self, workers: int = 2, timeout_s: float = 300.0):
        self.workers, self.timeout_s = workers, timeout_s
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False

    def warm(self) -> None:
        """Start the workers now (they import torch while the server already answers)."""
        with self._lock:
            while len(self._all) < self.workers and not self._closed:
                w = _Worker()
                self._all.append(w)
                self._idle.put(w)

    def call(self, op: str, **kw) -> tuple[dict | None, str | None]:
        self.warm()
        w = self._idle.get()
        try:
            out = w.call(op, kw, self.timeout_s)
        except (EOFError, OSError, ValueError, TimeoutError) as e:
            log.error("a %s check lost its worker process (%s); starting another", op, type(e).__name__)
            with self._lock:
                self._all.remove(w)
            w.kill()
            self.warm()
            if isinstance(e, TimeoutError):
                return None, f"the check took longer than {self.timeout_s:.0f} s (the file is too large or malformed)"
            return None, "the file could not be checked (it crashed the validator); it is not a valid upload"
        self._idle.put(w)
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        for w in workers:
            w.kill()


if __name__ == "__main__":
    raise SystemExit(_worker_main())
