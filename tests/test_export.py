"""Tests for dass_ray.core.export: the TorchScript student takes images at the dataset's native size and reproduces the
data pipeline's preprocessing (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dass_ray.core.config import get_scale
from dass_ray.core.data import bundled_path, load_dataset, shared_datasets_root
from dass_ray.core.export import InputSpec, export_student, spec_for
from dass_ray.core.kd import TensorData, load_teacher
from dass_ray.core.tasks import dataset_task

TEACHER = Path(__file__).resolve().parents[1] / "dass_ray" / "assets" / "teachers" / "mnist5k_cpu.pt"


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    """The shipped teacher: a trained network of the family `SearchRun._export` exports (32x32, 10 classes)."""
    return load_teacher(TEACHER).model()


def _decode(path: Path, rows) -> torch.Tensor:
    """Rows of a Parquet dataset decoded as a user would with PIL: uint8 [n, H, W, C], C 1 (grayscale) or 3."""
    blobs = pq.read_table(path, columns=["image"]).take(pa.array(list(rows)))["image"].to_pylist()
    arrays = [np.asarray(Image.open(io.BytesIO(b))) for b in blobs]
    return torch.from_numpy(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays]))


def _check_reproduces(student, data: TensorData, native: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    """Export `student` for `data`; on `native` (rows 0..n-1 of data.x_train) it must compute the pipeline's tensors
    bit for bit and the student's logits on them, for any batch size. Returns the exported module's logits."""
    spec = spec_for(data, 32)
    path = tmp_path / "student.torchscript.pt"
    student.train()
    export_student(student, spec, path)  # exported in eval mode; the model's own mode is left alone
    assert student.training
    student.eval()
    ts = torch.jit.load(str(path))
    assert (ts.height, ts.width, ts.channels, ts.model_size) == (spec.height, spec.width, spec.channels, 32)
    assert tuple(native.shape[1:]) == (spec.height, spec.width, spec.channels)
    n = native.shape[0]
    with torch.no_grad():
        assert torch.equal(ts.preprocess(native), data.x_train[:n])
        ref = student(data.x_train[:n])
        got = ts(native)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ts(native[:1]), ref[:1], atol=1e-4, rtol=0)  # the batch dimension is free
        torch.testing.assert_close(ts(native[:5].float()), ref[:5], atol=1e-4, rtol=0)  # floats in 0..255 too
    return got


def test_mnist_student_on_native_grayscale_images(student, tmp_path):
    path = bundled_path("mnist5k")
    task, data = dataset_task(path, get_scale("cpu"), seed=0)  # what `search.prepare` builds; KD trains on x_train
    assert spec_for(data, 32) == InputSpec(height=28, width=28, channels=1, model_size=32)
    rows = task.train_indices[:16]
    got = _check_reproduces(student, data, _decode(path, rows), tmp_path)
    assert (got.argmax(1) == data.y_train[:16]).float().mean() >= 0.8  # a working classifier, not just equal noise
    ts = torch.jit.load(str(tmp_path / "student.torchscript.pt"))
    with pytest.raises(Exception, match=r"expected images \[N, H, W, C\]"):
        ts(torch.zeros(2, 28, 28, 2, dtype=torch.uint8))


@pytest.mark.parametrize("source", ["synthetic", "flowers5"])
def test_rgb_student_on_native_colour_images(source, student, tmp_path):
    """Colour through the Parquet loader: random 36x40 PNGs (always), or real 128x128 flowers (shared data)."""
    if source == "synthetic":
        rng = np.random.default_rng(0)
        blobs = []
        for _ in range(6):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(buf, "PNG")
            blobs.append(buf.getvalue())
    else:
        root = shared_datasets_root()
        if root is None or not (root / "flowers5" / "all.parquet").is_file():
            pytest.skip("shared dataset flowers5 not available")
        blobs = pq.read_table(root / "flowers5" / "all.parquet", columns=["image"]).slice(0, 6)["image"].to_pylist()
    path = tmp_path / "rgb.parquet"
    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": [0] * 6, "label_name": ["x"] * 6}), path)
    ds = load_dataset(path)
    data = TensorData.from_datasets(ds, ds, 32)
    assert spec_for(data, 32).channels == 3
    _check_reproduces(student, data, _decode(path, range(6)), tmp_path)


def test_input_spec_round_trip_and_validation():
    spec = InputSpec(height=28, width=30, channels=1, model_size=32)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == {"height": 28, "width": 30, "channels": 1, "model_size": 32, "mean": 0.5, "std": 0.5, "dtype": "uint8"}
    assert InputSpec.from_dict(d) == spec
    assert InputSpec.from_dict({**d, "added_later": 1}) == spec  # a newer writer's extra field is ignored
    for bad in ({"channels": 2}, {"height": 0}, {"std": 0.0}, {"dtype": "float32"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InputSpec.from_dict({**d, **bad})
