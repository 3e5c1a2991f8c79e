"""Tests for dass_ray.core.export: the TorchScript student takes images at the dataset's native size and reproduces the
data pipeline's preprocessing (no Ray)."""

from __future__ import annotations

import dataclasses
import io
import json
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dass_ray.core.config import get_scale
from dass_ray.core.data import bundled_path, load_dataset, shared_datasets_root
from dass_ray.core.export import EXPORTS, InputSpec, Preprocessed, export_all, export_student, spec_for
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


# --- ONNX, torch.export, and no paths of the machine that exported -------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small() -> torch.nn.Module:
    """The search space's smallest student (exports in a third of the teacher's time), with non-trivial BN stats."""
    from dass_ray.core.nets import build
    from dass_ray.core.space import get_space

    space = get_space("cpu", 10)
    model = build(space.smallest(), space, seed=0)
    with torch.no_grad():
        model.train()(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 + 0.5)
    return model.eval()


def _leaks(path: Path, *extra: Path) -> list[str]:
    """Members of the file (a zip archive's members, else the whole file) holding this machine's paths: the repo's,
    the Python installation's (site-packages with torch) or `extra`'s."""
    needles = {str(p).encode() for p in (REPO, Path(torch.__file__).resolve().parents[1], Path(sys.prefix), *extra)}
    needles.add(b"site-packages")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            members = [(i.filename, z.read(i)) for i in z.infolist()]
    else:
        members = [(path.name, path.read_bytes())]
    return [f"{name}: {n.decode()}" for name, data in members for n in needles if n in data]


@pytest.mark.parametrize("shape", [(28, 28, 1), (48, 40, 3)], ids=["gray28-up", "rgb48x40-down"])
def test_onnx_and_torch_export_match_pytorch_without_paths(shape, small, tmp_path):
    """The three exports of `export_all` compute the PyTorch student behind `Preprocessed` (uint8 NHWC at the spec's
    size; 28 -> 32 upsizes, 48x40 -> 32 downsizes with antialiasing) at batch 1 and 3, and none holds a path."""
    import onnxruntime as ort

    h, w, c = shape
    spec = InputSpec(height=h, width=w, channels=c, model_size=32)
    out = tmp_path / "out"
    out.mkdir()
    exports, seconds = export_all(small, spec, out)
    assert not small.training  # left as it was
    assert exports == [{"format": f, "file": EXPORTS[f]} for f in ("torchscript", "onnx", "torch_export")]
    assert set(seconds) == set(EXPORTS) and all(s >= 0 for s in seconds.values())
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORTS.values())  # no temporary files left

    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [h, w, c])
    assert isinstance(inp.shape[0], str) and outp.name == "logits" and outp.shape[1] == 10  # dynamic batch
    program = torch.export.load(str(out / "student.pt2")).module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(out / "student.torchscript.pt"))
    ref_net = Preprocessed(small, spec).eval()
    g = torch.Generator().manual_seed(h)
    for n in (1, 3):
        x = torch.randint(0, 256, (n, h, w, c), dtype=torch.uint8, generator=g)
        with torch.no_grad():
            ref = ref_net(x)
            onnx_out = torch.from_numpy(sess.run(["logits"], {"images": x.numpy()})[0])
            torch.testing.assert_close(onnx_out, ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(program(x), ref, atol=1e-4, rtol=0)
            torch.testing.assert_close(ts(x), ref, atol=1e-4, rtol=0)

    for f in EXPORTS.values():
        assert _leaks(out / f, tmp_path) == [], f
    with zipfile.ZipFile(out / "student.torchscript.pt") as z:
        assert not [m for m in z.namelist() if m.endswith(".debug_pkl")]


def test_leak_check_finds_torchscript_debug_records(small, tmp_path):
    """The check above is not vacuous: a TorchScript file saved plainly holds dass_ray's and torch's absolute paths in
    its debug records (what `export_student` wrote before it dropped them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        plain = torch.jit.script(Preprocessed(small, InputSpec(height=28, width=28, channels=1, model_size=32)))
        plain.save(str(tmp_path / "plain.pt"))
    found = _leaks(tmp_path / "plain.pt")
    assert any(".debug_pkl: " + str(REPO) in f for f in found), found
    assert any(str(Path(torch.__file__).resolve().parents[1]) in f for f in found), found


def test_result_exports_field_and_artifacts():
    """result.json's `exports` round-trips and defaults to [] in results written before it existed; the gRPC
    DownloadArtifact serves every export format."""
    from dass_ray import contract as C
    from dass_ray.service.server.servicer import _ARTIFACT_FILES
    from dass_ray.v1 import search_pb2 as pb

    best = C.StudentResult(arch={}, arch_json="{}", measured_acc=0.9, predicted_acc=0.8, flops=1, params=1, index=0,
                           predicted_rank=0)
    exports = [{"format": f, "file": EXPORTS[f]} for f in C.EXPORT_FORMATS]
    res = C.SearchResult(best=best, teacher_acc=0.9, teacher_flops=2, teacher_params=2, candidates=1, top_k=1,
                         trials=[], request={}, input_spec=InputSpec(height=28, width=28, channels=1, model_size=32),
                         class_names=["a"], exports=exports)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["exports"] == exports and C.SearchResult.from_dict(d) == res
    del d["exports"]  # written by an older version
    assert C.SearchResult.from_dict(d) == dataclasses.replace(res, exports=[])
    assert _ARTIFACT_FILES[pb.ARTIFACT_KIND_ONNX] == "student.onnx"
    assert _ARTIFACT_FILES[pb.ARTIFACT_KIND_TORCH_EXPORT] == "student.pt2"
    assert set(EXPORTS.values()) <= set(_ARTIFACT_FILES.values())
