"""Any classifier as the teacher (issue 27, items 1-3): TorchScript, ONNX and torchvision teachers recognised by
content, run at their own size and normalisation, checked with one-line errors; their soft labels computed once by
sharded Ray actors (a lost actor recomputes only its shard), cached by digest; a proxy teacher of the family ranks
the candidates while the students are distilled from the foreign teacher itself.

One small teacher is trained per module on the bundled MNIST subset at its native 28 px with the project's
normalisation, so TorchScript/ONNX defaults fit it. Fast: the loaders, the checks, the failures through the CLI, the
sharded soft labels and one end-to-end CLI search; slow: the ONNX and torchvision searches and one through gRPC.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from dass_ray.core.config import TeacherConfig, get_scale
from dass_ray.core.data import bundled_path, load_dataset, to_tensor
from dass_ray.core.foreign import ForeignError, TeacherOptions, load_foreign, sniff
from dass_ray.core.kd import TensorData, compute_soft_labels, train_model
from dass_ray.core.tasks import dataset_task, load_task_data

ROOT = Path(__file__).resolve().parent.parent
PREDICTOR = ROOT / "dass_ray" / "assets" / "predictor" / "cpu.pt"
TINY_CLI = ["--scale", "tiny", "--candidates", "16", "--top-k", "2", "--encoders", "1", "--num-cpus", "2",
            "--predictor", str(PREDICTOR)]


class SmallNet(nn.Module):
    """A small CNN classifier (any size: global pooling)."""

    def __init__(self, k: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, k)

    def forward(self, x):
        return self.fc(self.features(x))


class FixedNet(nn.Module):
    """A classifier that takes exactly 28x28 inputs (a flattening head)."""

    def __init__(self, k: int):
        super().__init__()
        self.fc = nn.Linear(3 * 28 * 28, k)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _onnx(model: nn.Module, path: Path, size: int = 28, dynamic_hw: bool = False) -> None:
    axes = {0: "batch", 2: "h", 3: "w"} if dynamic_hw else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(2, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], dynamic_axes={"x": axes, "logits": {0: "batch"}})


@pytest.fixture(scope="module")
def task():
    """The tiny scale's search task on mnist5k: (task, 32-px TensorData, raw train, raw val)."""
    t, data = dataset_task(bundled_path("mnist5k"), get_scale("tiny"), 0)
    tr, va = load_task_data(t, load_dataset(bundled_path("mnist5k")))
    return t, data, tr, va


@pytest.fixture(scope="module")
def teachers(task, tmp_path_factory):
    """One small teacher trained at 28 px, saved as TorchScript (odd extension), ONNX (odd extension); a 3-class
    one (wrong head), a fixed-size one, and an unreadable file."""
    _, _, tr, va = task
    d = tmp_path_factory.mktemp("teachers")
    data = TensorData(to_tensor(tr.images, 28), torch.from_numpy(tr.labels), to_tensor(va.images, 28),
                      torch.from_numpy(va.labels), tr.class_names)
    torch.manual_seed(0)
    model, res = train_model(SmallNet(10), data, TeacherConfig(epochs=6, batch_size=32, lr=0.05), seed=0,
                             device="cpu")
    paths = {"model": model, "acc": res.final_acc, "data28": data}
    torch.jit.save(torch.jit.script(model), d / "teacher.bin")
    paths["torchscript"] = d / "teacher.bin"
    _onnx(model, d / "teacher.model", dynamic_hw=True)
    paths["onnx"] = d / "teacher.model"
    torch.jit.save(torch.jit.script(SmallNet(3).eval()), d / "three.pt")
    paths["three"] = d / "three.pt"
    torch.jit.save(torch.jit.script(FixedNet(10).eval()), d / "fixed.pt")
    paths["fixed"] = d / "fixed.pt"
    _onnx(FixedNet(10), d / "fixed.onnx")
    paths["fixed_onnx"] = d / "fixed.onnx"
    (d / "junk.pt").write_bytes(os.urandom(4000))
    paths["junk"] = d / "junk.pt"
    blob = (d / "teacher.bin").read_bytes()
    (d / "torn.pt").write_bytes(blob[: len(blob) // 2])  # a TorchScript file cut short
    paths["torn"] = d / "torn.pt"
    return paths


# ---------------------------------------------------------------------------------------------- loading (no Ray)


def test_teachers_are_recognised_by_content_whatever_the_extension(teachers, tmp_path):
    torch.save(teachers["model"].state_dict(), tmp_path / "sd.onnx")
    assert sniff(teachers["torchscript"]) == "torchscript" and sniff(teachers["onnx"]) == "onnx"
    assert sniff(tmp_path / "sd.onnx") is None  # a state dict named .onnx is no ONNX file
    assert sniff(teachers["junk"]) is None and sniff(teachers["torn"]) is None
    assert sniff(ROOT / "dass_ray" / "assets" / "teachers" / "mnist5k_cpu.pt") is None  # our own checkpoints


def test_a_foreign_teacher_runs_at_its_own_size_and_normalisation(teachers, task):
    _, data, tr, va = task
    model = teachers["model"]
    ts = load_foreign(str(teachers["torchscript"]), TeacherOptions(), 10, tr.image_size)
    ox = load_foreign(str(teachers["onnx"]), TeacherOptions(), 10, tr.image_size)
    assert ts.size == (28, 28) and ts.mean == (0.5, 0.5, 0.5)  # the dataset's native size, the project's norm
    with torch.no_grad():
        want = model(to_tensor(va.images, 28))
    torch.testing.assert_close(ts.logits(va.images), want, rtol=1e-4, atol=1e-4)  # uint8 images
    torch.testing.assert_close(ox.logits(va.images), want, rtol=1e-4, atol=1e-4)
    # the project's 32-px normalised tensors are taken too: back to 0..1, resized to 28, its normalisation
    x01 = torch.nn.functional.interpolate(data.x_val * 0.5 + 0.5, size=(28, 28), mode="bilinear",
                                          align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(ts.logits(data.x_val), model((x01 - 0.5) / 0.5), rtol=1e-4, atol=1e-4)
    assert teachers["acc"] > 0.3  # a teacher well above chance (0.1)
    # it travels (to Ray actors) as its bytes; the digest names file and options
    again = pickle.loads(pickle.dumps(ox))
    torch.testing.assert_close(again.logits(va.images[:4]), want[:4], rtol=1e-4, atol=1e-4)
    assert again.digest() == ox.digest() != ts.digest()
    other = load_foreign(str(teachers["onnx"]), TeacherOptions(image_size=32), 10, tr.image_size)
    assert other.digest() != ox.digest()
    assert abs(ts.accuracy(va.images, torch.from_numpy(va.labels)) - teachers["acc"]) < 1e-9


def test_torchvision_teacher_from_a_state_dict(task, tmp_path):
    import torchvision

    _, _, tr, va = task
    net = torchvision.models.resnet18(num_classes=10).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pt")
    t = load_foreign("torchvision:resnet18", TeacherOptions(weights=str(tmp_path / "w.pt")), 10, tr.image_size)
    assert t.mean == (0.485, 0.456, 0.406) and t.size == (28, 28)  # ImageNet's normalisation by default
    t = load_foreign("torchvision:resnet18", TeacherOptions(weights=str(tmp_path / "w.pt"), image_size=64,
                                                            mean="0.5", std="0.25,0.25,0.25"), 10, tr.image_size)
    x = va.images[:3]
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, size=(64, 64),
                                          mode="bilinear", align_corners=False, antialias=False)
    with torch.no_grad():
        torch.testing.assert_close(t.logits(x), net((ref - 0.5) / 0.25), rtol=1e-4, atol=1e-4)


def test_timm_teacher_takes_its_input_size_and_normalisation_from_pretrained_cfg(task, tmp_path):
    timm = pytest.importorskip("timm")  # installed by `make install` (the [timm] extra)

    _, _, tr, va = task
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    cfg = net.pretrained_cfg
    assert cfg["input_size"] == (3, 160, 160) and cfg["mean"] == (0.485, 0.456, 0.406)  # what the test relies on
    torch.save(net.state_dict(), tmp_path / "w.pt")
    t = load_foreign("timm:test_efficientnet", TeacherOptions(weights=str(tmp_path / "w.pt")), 10, tr.image_size)
    assert t.size == (160, 160) and t.mean == cfg["mean"] and t.std == cfg["std"]
    x = va.images[:2]
    ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, size=(160, 160),
                                          mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(t.logits(x), net((ref - mean) / std), rtol=1e-4, atol=1e-4)
    with pytest.raises(ForeignError, match="timm has no model 'no_such_net'"):
        load_foreign("timm:no_such_net", TeacherOptions(weights=str(tmp_path / "w.pt")), 10, tr.image_size)


def _cfg(tmp_path, teacher, **kw):
    from dass_ray.search import SearchConfig

    base = dict(dataset="mnist5k", teacher=str(teacher), predictor=str(PREDICTOR), output=str(tmp_path / "out"),
                scale="tiny", candidates=16, top_k=2, encoders=1)
    base.update(kw)
    return SearchConfig(**base)


def test_prepare_loads_a_foreign_teacher_with_the_tasks_own_images(teachers, task, tmp_path):
    from dass_ray.search import prepare

    _, data, tr, _ = task
    p = prepare(_cfg(tmp_path, teachers["onnx"]))
    assert p.teacher is None and p.foreign is not None and p.foreign.teacher.kind == "onnx"
    assert p.foreign.x_train.shape == (len(data.y_train), 28, 28, 3)
    np.testing.assert_array_equal(p.foreign.x_train, tr.images)  # index i is sample i of the soft labels


@pytest.mark.parametrize("which,kw,msg", [
    ("three", {}, r"^--teacher: its head has 3 classes but the dataset has 10$"),
    ("torchscript", {"classes": ("0", "1", "2")}, r"^--teacher: its head has 10 classes but the dataset has 3$"),
    ("junk", {}, r"^--teacher: .*junk.pt: not a readable teacher checkpoint .*TorchScript and ONNX teachers are "
                 r"recognised by their content$"),
    ("torn", {}, r"^--teacher: .*torn.pt: not a readable teacher checkpoint"),
    ("fixed", {"teacher_image_size": 32}, r"^--teacher-image-size: the teacher rejects 32x32 inputs \(.*\); give "
                                          r"the size it was trained at$"),
    ("fixed_onnx", {"teacher_image_size": 32}, r"^--teacher-image-size: the teacher rejects 32x32 inputs"),
    ("torchscript", {"teacher_weights": "w.pt"}, r"^--teacher-weights: only for timm:<name> / torchvision:<name>"),
    ("torchscript", {"teacher_mean": "0.5,x"}, r"^--teacher-mean: expected one number or three"),
    ("torchscript", {"teacher_std": "0,1,1"}, r"^--teacher-std: must be positive"),
    ("tv:", {}, r"^--teacher-weights: torchvision:resnet18 needs a weights file"),
    ("tv:", {"teacher": "torchvision:nosuchnet", "teacher_weights": "W"}, r"^--teacher: torchvision has no model "
                                                                          r"'nosuchnet'"),
    ("tv:", {"teacher": "torchvision:resnet34", "teacher_weights": "W"}, r"^--teacher-weights: .*w18.pt: the weights "
                                                                         r"do not fit torchvision:resnet34"),
    ("tv:", {"teacher": "torchvision:resnet18", "teacher_weights": "J"}, r"^--teacher-weights: .*: not a readable "
                                                                         r"state dict"),
    ("family", {"teacher_image_size": 64}, r"^--teacher-image-size: only for a foreign teacher"),
])
def test_a_bad_foreign_teacher_fails_with_one_line_naming_the_option(teachers, tmp_path, which, kw, msg):
    import torchvision

    from dass_ray.search import InputError, prepare

    w18 = tmp_path / "w18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), w18)
    subs = {"W": str(w18), "J": str(teachers["junk"])}
    kw = {k: subs.get(v, v) if isinstance(v, str) else v for k, v in kw.items()}
    teacher = {"tv:": "torchvision:resnet18", "family": ROOT / "dass_ray/assets/teachers/mnist5k_cpu.pt"}.get(
        which) or teachers[which]
    kw.setdefault("teacher", str(teacher))
    with pytest.raises(InputError) as e:
        prepare(_cfg(tmp_path, kw.pop("teacher"), **kw))
    assert "\n" not in str(e.value)
    assert __import__("re").search(msg, str(e.value)), str(e.value)


@pytest.mark.parametrize("which", ["three", "torn"])
def test_cli_refuses_a_mismatched_or_unreadable_teacher_with_one_line_and_exit_2(teachers, tmp_path, which):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "search.py"), "--teacher", str(teachers[which]),
                        *TINY_CLI, "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=180)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --teacher: "), r.stderr[-2000:]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- sharded soft labels


@pytest.mark.ray
def test_sharded_soft_labels_survive_a_killed_actor_recomputing_only_its_shard(ray_local, teachers, task):
    from dass_ray.search.softlabels import SoftLabelActor, sharded_soft_labels

    ray = ray_local
    _, data, _, _ = task
    teacher = load_foreign(str(teachers["torchscript"]), TeacherOptions(), 10, (28, 28))
    want = compute_soft_labels(teacher, data.x_train, views=2)  # in process, on the 32-px normalised tensors
    t_ref = ray.put(teacher)
    actors = [SoftLabelActor.options(num_cpus=0.5).remote(t_ref, 1, 0.3) for _ in range(2)]
    ray.get([a.pid.remote() for a in actors])
    stats, killed = {}, []

    def on_shard(s, done):
        if not killed:  # mid-way: the other actor is computing its shard right now (each takes >= 0.3 s)
            killed.append(True)
            ray.kill(actors[1], no_restart=True)

    got = sharded_soft_labels(teacher, data.x_train, 2, shard_size=25, actors=actors, stats=stats,
                              on_shard=on_shard, delay_s=0.3)
    assert stats["completed"] == [1] * 8  # every shard exactly once
    assert stats["actors_lost"] == 1 and sorted(stats["dispatched"]) == [1] * 7 + [2]  # only the lost one again
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert ray.get(actors[0].pid.remote())  # the caller's live actor is left to the caller
    ray.kill(actors[0])


@pytest.mark.ray
def test_foreign_soft_labels_are_cached_by_digest(ray_local, teachers, task, tmp_path):
    from dass_ray.core.foreign import ForeignTask
    from dass_ray.search.softlabels import foreign_soft_labels

    _, data, tr, va = task
    t = load_foreign(str(teachers["onnx"]), TeacherOptions(), 10, (28, 28))
    ft = ForeignTask(t, tr.images, va.images, data.y_val)
    soft, cached = foreign_soft_labels(ft, 2, tmp_path)
    assert not cached and soft.logits.shape == (2, len(tr.images), 10)
    torch.testing.assert_close(soft.logits[1], t.logits(tr.images[:, :, ::-1].copy()), rtol=1e-4, atol=1e-4)
    again, cached = foreign_soft_labels(ft, 2, tmp_path)
    assert cached and torch.equal(again.logits, soft.logits)
    assert [p.name for p in tmp_path.iterdir()] == [f"soft-{ft.soft_label_key(2)}.parquet"]
    assert ft.soft_label_key(1) != ft.soft_label_key(2)


# ---------------------------------------------------------------------------------------------- end to end


def _search(tmp_path: Path, teacher: str, *extra: str, out: str = "out", cache: Path | None = None) -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(ROOT / "scripts" / "search.py"), "--teacher", teacher, *TINY_CLI,
           "--output", str(tmp_path / out), *extra]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, f"rc {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    res = json.loads((tmp_path / out / "result.json").read_text())
    events = [json.loads(line) for line in (tmp_path / out / "events.jsonl").read_text().splitlines()]
    return {"result": res, "events": events, "stdout": r.stdout}


def _check_foreign_result(run: dict, kind: str, teacher_acc: float, out: Path) -> None:
    res = run["result"]
    assert res["teacher_kind"] == kind
    assert res["teacher_acc"] == pytest.approx(teacher_acc, abs=1e-9)  # the foreign teacher's own, at 28 px
    assert 0 < res["proxy_teacher_acc"] <= 1 and res["best"]["measured_acc"] > 0
    msgs = [e["message"] for e in run["events"] if e["stage"] == "teacher"]
    assert any(f"teacher ({kind}) val acc {teacher_acc:.4f}; proxy teacher val acc" in m for m in msgs), msgs
    assert (out / "proxy_teacher.pt").is_file() and (out / "student.onnx").is_file()
    from dass_ray.core.kd import load_teacher

    assert load_teacher(out / "proxy_teacher.pt").val_acc == pytest.approx(res["proxy_teacher_acc"])
    _check_exports_match_the_student(out, res)


def _check_exports_match_the_student(out: Path, res: dict) -> None:
    """The found student's ONNX and torch.export files load and give the PyTorch student's logits (1e-4) on images
    as a user has them (uint8, the input spec's size and channels)."""
    import onnxruntime as ort

    from dass_ray.contract import InputSpec
    from dass_ray.core.export import Preprocessed
    from dass_ray.core.nets import build
    from dass_ray.core.space import ArchConfig, SpaceConfig

    blob = torch.load(out / "student.pt", map_location="cpu", weights_only=False)
    student = build(ArchConfig.from_dict(blob["arch"]), SpaceConfig.from_dict(blob["space"]))
    student.load_state_dict(blob["state_dict"])
    spec = InputSpec.from_dict(res["input_spec"])
    x = torch.randint(0, 256, (3, spec.height, spec.width, spec.channels), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = Preprocessed(student.eval(), spec)(x)
        prog = torch.export.load(str(out / "student.pt2")).module()
        torch.testing.assert_close(prog(x), ref, rtol=1e-4, atol=1e-4)
    sess = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.ray
def test_cli_search_with_a_torchscript_teacher(teachers, tmp_path):
    run = _search(tmp_path, str(teachers["torchscript"]))
    out = tmp_path / "out"
    _check_foreign_result(run, "torchscript", teachers["acc"], out)
    cache = sorted(p.name for p in (out / "cache").iterdir())
    assert [c.split("-")[0] for c in cache] == ["proxy", "soft"], cache


@pytest.mark.ray
@pytest.mark.slow
def test_cli_search_with_an_onnx_teacher_and_its_cache_reused(teachers, tmp_path):
    cache = tmp_path / "cache"
    first = _search(tmp_path, str(teachers["onnx"]), cache=cache)
    _check_foreign_result(first, "onnx", teachers["acc"], tmp_path / "out")
    again = _search(tmp_path, str(teachers["onnx"]), out="out2", cache=cache)  # another search, the same inputs
    msgs = [e["message"] for e in again["events"] if e["stage"] == "teacher"]
    assert "soft labels read from the cache" in msgs and any("(from the cache)" in m for m in msgs), msgs
    assert again["result"]["proxy_teacher_acc"] == first["result"]["proxy_teacher_acc"]


@pytest.mark.ray
@pytest.mark.slow
def test_cli_search_with_a_torchvision_teacher(task, tmp_path):
    import torchvision

    _, _, tr, va = task
    data = TensorData(to_tensor(tr.images, 28), torch.from_numpy(tr.labels), to_tensor(va.images, 28),
                      torch.from_numpy(va.labels), tr.class_names)
    torch.manual_seed(0)
    net, res = train_model(torchvision.models.resnet18(num_classes=10), data,
                           TeacherConfig(epochs=1, batch_size=32, lr=0.05), seed=0, device="cpu")
    torch.save(net.state_dict(), tmp_path / "resnet18.pt")
    run = _search(tmp_path, "torchvision:resnet18", "--teacher-weights", str(tmp_path / "resnet18.pt"),
                  "--teacher-mean", "0.5", "--teacher-std", "0.5")
    _check_foreign_result(run, "torchvision", res.final_acc, tmp_path / "out")


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory):
    """A `dass-ray serve` subprocess on a loopback port (test_server's); no Ray until a real search runs (then the
    local head it starts), stopped afterwards by killing only the processes of its private Ray temp dir."""
    from test_server import TOKENS, Server, kill_ray

    d = tmp_path_factory.mktemp("grpc")
    (d / "tokens.txt").write_text("".join(f"{k} {v}\n" for k, v in TOKENS.items()))
    tmp = tempfile.mkdtemp(prefix="dsv")
    srv = Server(d / "state", d / "tokens.txt", None, dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        kill_ray(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_grpc_takes_torchscript_and_onnx_teacher_uploads(teachers, grpc_server):
    """Uploads recognised by content (stored under their digest whatever their name); a mismatched head and a
    foreign teacher's options on a family teacher are refused at submit (INVALID_ARGUMENT, one line)."""
    import grpc

    from test_server import TEACHER, client, expect

    with client(grpc_server, "alice") as alice:
        ds = alice.upload_dataset(bundled_path("mnist5k"))
        ts = alice.upload_teacher(teachers["torchscript"])
        assert (ts.kind, ts.num_classes, ts.space, ts.image_size) == ("torchscript", 10, "", 0)
        ox = alice.upload_teacher(teachers["fixed_onnx"])
        assert (ox.kind, ox.num_classes, ox.image_size) == ("onnx", 10, 28)  # its fixed input size
        assert alice.upload_teacher(TEACHER).kind == "family"
        three = alice.upload_teacher(teachers["three"])
        IA = grpc.StatusCode.INVALID_ARGUMENT
        expect(IA, alice.submit, dataset_id=ds.dataset_id, teacher_id=three.teacher_id, scale="tiny",
               contains="the teacher's head has 3 classes but the search has 10")
        fam = alice.upload_teacher(TEACHER)
        expect(IA, alice.submit, dataset_id=ds.dataset_id, teacher_id=fam.teacher_id, scale="tiny",
               teacher_image_size=64, contains="teacher_image_size: only for a foreign teacher")
        job = alice.submit(dataset_id=ds.dataset_id, teacher_id=ts.teacher_id, scale="tiny", dry_run=True,
                           teacher_image_size=32, teacher_mean="0.5")
        assert job.spec.teacher_image_size == 32 and job.spec.teacher_mean == "0.5"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grpc_search_with_an_uploaded_torchscript_teacher(teachers, grpc_server):
    """A real search through the service (its own local Ray head) with an uploaded TorchScript teacher."""
    from test_server import client, wait_job
    from dass_ray.service.client import TERMINAL, state_name

    with client(grpc_server, "alice") as alice:
        ds = alice.upload_dataset(bundled_path("mnist5k"))
        ts = alice.upload_teacher(teachers["torchscript"])
        job = alice.submit(dataset_id=ds.dataset_id, teacher_id=ts.teacher_id, scale="tiny", candidates=16, top_k=2,
                           kd_epochs=1)
        j = wait_job(alice, job.job_id, lambda j: j.state in TERMINAL, 600, "the search to end")
        assert state_name(j.state) == "SUCCEEDED", j.error
        r = alice.result(job.job_id)
        assert r.teacher_kind == "torchscript" and r.teacher_acc == pytest.approx(teachers["acc"])
        assert 0 < r.proxy_teacher_acc <= 1
        assert json.loads(r.result_json)["proxy_teacher_acc"] == pytest.approx(r.proxy_teacher_acc)
