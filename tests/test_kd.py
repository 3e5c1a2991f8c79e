import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dass_ray.core.config import KDConfig, TeacherConfig
from dass_ray.core.data import bundled_path, load_dataset
from dass_ray.core.tasks import load_task_data, make_class_subset_tasks
from dass_ray.core.kd import (ListReporter, SoftLabels, TensorData, _flip, compute_soft_labels, init_student, kd_loss,
                         kd_start_images, kd_start_loss, load_teacher, resolve_device, round_half, save_teacher, train_kd, train_teacher)
from dass_ray.core.space import get_space


# Bit-exactness (cached vs live logits, reruns, resume) is a claim about the CPU; on a GPU, cuDNN's algorithms make a
# run match it only to within float noise, which the GPU test at the end checks.
EXACT = "cpu"


@pytest.fixture(scope="module")
def mnist_task():
    ds = load_dataset(bundled_path("mnist5k"))
    task = make_class_subset_tasks(ds, source="mnist5k", path="mnist5k", num_tasks=1, classes_per_task=3,
                                   train_per_class=100, val_per_class=30, seed=0, prefix="t")[0]
    tr, va = load_task_data(task, ds)
    return TensorData.from_datasets(tr, va, 32)


@pytest.fixture(scope="module")
def trained_teacher(mnist_task):
    """Trained with 2 torch threads (the module's tests that use it compare bit-exact runs at that setting); the
    process's thread count is restored when the module ends, so later test modules see what they started with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        space = get_space("cpu", 3)
        model, res = train_teacher(space, mnist_task, TeacherConfig(epochs=5, batch_size=32, lr=0.05), seed=0)
        yield space, model, res
    finally:
        torch.set_num_threads(threads)


def test_kd_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    out = kd_loss(s, t, y, alpha=0.3, temperature=2.0)
    p = F.softmax(t / 2, 1)
    soft_ce = -(p * F.log_softmax(s / 2, 1)).sum(1).mean()
    ce = F.cross_entropy(s, y)
    assert torch.allclose(out["kd_loss"], 4 * soft_ce)
    assert torch.allclose(out["task_loss"], ce)
    assert torch.allclose(out["loss"], 0.7 * 4 * soft_ce + 0.3 * ce)


def test_teacher_learns_real_data(trained_teacher):
    _, _, res = trained_teacher
    assert res.ok and res.best_acc > 0.6, res.history  # chance is 1/3


def test_cached_logits_equal_teacher_in_loop(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train, device=EXACT)
    idx = torch.arange(0, 40)
    flips = torch.rand(40, generator=torch.Generator().manual_seed(1)) < 0.5
    with torch.no_grad():
        live = teacher(_flip(mnist_task.x_train[idx], flips))
    assert torch.allclose(soft.lookup(idx, flips), live, atol=1e-5)
    arch = space.smallest()
    for flip in (False, True):  # same KD loss, step by step, with augmentation off and with the cached flip view
        cfg = KDConfig(epochs=1, batch_size=32, flip=flip)
        a = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=0, soft=soft, device=EXACT)
        b = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=0, teacher=teacher, device=EXACT)
        assert a.ok and b.ok
        for k in ("loss", "kd_loss", "task_loss"):
            assert math.isclose(a.history[0][k], b.history[0][k], rel_tol=1e-4), (flip, k)


def test_soft_label_file_round_trip(tmp_path, mnist_task, trained_teacher):
    _, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train, meta={"teacher": "abc"})
    p = tmp_path / "soft.parquet"
    soft.save(p)
    back = SoftLabels.load(p, expect={"teacher": "abc"})
    assert torch.equal(back.logits, soft.logits)
    with pytest.raises(ValueError, match="teacher='abc', expected 'xyz'"):
        SoftLabels.load(p, expect={"teacher": "xyz"})
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="bad.parquet"):
        SoftLabels.load(tmp_path / "bad.parquet")


def test_kd_beats_chance_and_is_deterministic(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train, device=EXACT)
    arch = space.sample(np.random.default_rng(0))
    cfg = KDConfig(epochs=3, batch_size=32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=5, soft=soft, device=EXACT)
    assert torch.equal(torch.get_rng_state(), state)  # seeded by its argument, the caller's RNG untouched
    torch.manual_seed(456)  # ... and not reading it either
    b = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=5, soft=soft, device=EXACT)
    assert a.ok and a.best_acc > 0.6, a.history  # chance 1/3
    assert a.best_acc == max(h["val_acc"] for h in a.history) and a.final_acc == a.history[-1]["val_acc"]
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_resume_from_reported_state_equals_uninterrupted(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train, device=EXACT)
    arch = space.smallest()
    cfg = KDConfig(epochs=2, batch_size=32)
    full = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=2, soft=soft, device=EXACT)

    class StopAfterFirst(ListReporter):
        def report(self, metrics, state):
            super().report(metrics, state)
            if metrics["epoch"] == 1:
                self.last_state = state()
                raise KeyboardInterrupt  # simulates a killed trial

    rep = StopAfterFirst()
    with pytest.raises(KeyboardInterrupt):
        train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=2, soft=soft, reporter=rep, device=EXACT)
    resumed = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=2, soft=soft,
                       resume=rep.last_state, device=EXACT)
    strip = lambda h: [{k: v for k, v in r.items() if k != "wall_s"} for r in h]
    assert strip(resumed.history) == strip(full.history)
    assert all(torch.allclose(resumed.state_dict[k].float(), full.state_dict[k].float())
               for k in full.state_dict)


def test_diverging_run_is_a_failed_result(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train)
    soft.logits[0, 5, 0] = float("nan")  # one poisoned logit -> non-finite loss when its batch comes
    res = train_kd(space.smallest(), space, teacher.state_dict(), mnist_task,
                   KDConfig(epochs=1, batch_size=32, flip=False), seed=0, soft=soft)
    assert res.status == "failed" and "non-finite loss" in res.reason and res.epochs == 0
    huge = train_kd(space.smallest(), space, teacher.state_dict(), mnist_task,
                    KDConfig(epochs=2, batch_size=32, lr=1e12), seed=0, soft=compute_soft_labels(teacher, mnist_task.x_train))
    assert huge.status == "failed" and "non-finite" in huge.reason


def test_kd_rejects_mismatched_inputs(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    with pytest.raises(ValueError, match="cached soft labels or a teacher"):
        train_kd(space.smallest(), space, teacher.state_dict(), mnist_task, KDConfig())
    with pytest.raises(ValueError, match="5-class head"):
        train_kd(space.smallest(), get_space("cpu", 5), teacher.state_dict(), mnist_task, KDConfig(), teacher=teacher)


def test_teacher_checkpoint_round_trip_and_errors(tmp_path, trained_teacher, mnist_task):
    space, teacher, res = trained_teacher
    p = tmp_path / "t.pt"
    save_teacher(p, teacher, space, res.best_acc, mnist_task.class_names, meta={"x": 1}, half=True)
    ck = load_teacher(p)
    assert ck.space == space and ck.class_names == mnist_task.class_names and ck.meta == {"x": 1}
    rounded = round_half(teacher.state_dict())
    assert all(torch.equal(ck.state_dict[k], rounded[k]) for k in rounded)
    assert p.stat().st_size < 0.6 * 4 * space.params(space.teacher()) + 200_000  # float16 on disk
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="junk.pt: not a readable teacher checkpoint"):
        load_teacher(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not found"):
        load_teacher(tmp_path / "missing.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a dass_ray teacher checkpoint"):
        load_teacher(tmp_path / "other.pt")


def test_kd_start_loss_is_the_loss_distillation_starts_from(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train, device=EXACT)
    x, y = mnist_task.x_train, mnist_task.y_train
    cfg = KDConfig(epochs=2, batch_size=32)
    arch = space.sample(np.random.default_rng(1))
    student = init_student(arch, space, teacher.state_dict(), None, cfg.remap, seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    got = kd_start_loss(student, x, y, soft.logits, cfg, batch_size=70)  # batches that do not divide 300 images
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # nothing trained, BN untouched
    with torch.no_grad():  # the same loss in one pass over both views, written out
        want = kd_loss(student.eval()(torch.cat([x, x.flip(3)])), soft.logits.reshape(-1, soft.logits.shape[-1]),
                       y.repeat(2), cfg.alpha, cfg.temperature)["loss"]
    assert got == pytest.approx(float(want), rel=1e-5)
    # distillation lowers it: the distilled student starts from a smaller loss than its remapped init
    res = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=0, soft=soft, device=EXACT)
    student.load_state_dict(res.state_dict)
    assert kd_start_loss(student, x, y, soft.logits, cfg) < got
    with pytest.raises(ValueError, match=r"teacher logits \(2, 300, 3\) .* for 10 images"):
        kd_start_loss(student, x[:10], y[:10], soft.logits, cfg)
    # the images it is taken over: all up to the cap, else a seeded sample the same on every call
    assert kd_start_images(300).tolist() == list(range(300))
    few = kd_start_images(300, max_images=50)
    assert len(few) == 50 and len(set(few.tolist())) == 50 and torch.equal(few, kd_start_images(300, 50))
    assert torch.equal(few, few.sort().values) and few.max() < 300


def test_device_choice_is_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(RuntimeError):  # torch's own error names the bad string
        resolve_device("gpu0")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")


@needs_cuda
def test_kd_and_teacher_on_gpu_match_cpu_and_hand_back_cpu_state(mnist_task, trained_teacher):
    space, teacher, _ = trained_teacher
    soft_cpu = compute_soft_labels(teacher, mnist_task.x_train, device="cpu")
    soft_gpu = compute_soft_labels(teacher, mnist_task.x_train, device="cuda")
    assert soft_gpu.logits.device.type == "cpu" and next(teacher.parameters()).device.type == "cpu"
    assert torch.allclose(soft_gpu.logits, soft_cpu.logits, rtol=1e-2, atol=2e-2)
    assert (soft_gpu.logits.argmax(-1) == soft_cpu.logits.argmax(-1)).float().mean() > 0.99
    arch = space.sample(np.random.default_rng(0))
    cfg = KDConfig(epochs=3, batch_size=32)
    c = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=5, soft=soft_cpu, device="cpu")

    class StopAfterFirst(ListReporter):
        def report(self, metrics, state):
            super().report(metrics, state)
            self.last_state = state()
            if metrics["epoch"] == 1:
                raise KeyboardInterrupt  # a killed trial

    g = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=5, soft=soft_cpu, device="cuda")
    assert g.ok and g.device.startswith("cuda") and c.device == "cpu"
    assert all(v.device.type == "cpu" for v in g.state_dict.values())
    assert abs(g.history[0]["loss"] - c.history[0]["loss"]) < 0.05 * c.history[0]["loss"]  # same batches, same init
    assert abs(g.best_acc - c.best_acc) <= 0.1 and g.best_acc > 0.6, (g.history, c.history)
    rep = StopAfterFirst()
    with pytest.raises(KeyboardInterrupt):
        train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=5, soft=soft_cpu, device="cuda",
                 reporter=rep)
    moments = [t for s in rep.last_state["optimizer"]["state"].values() for t in s.values()
               if isinstance(t, torch.Tensor)]
    assert moments and all(t.device.type == "cpu" for t in moments)  # a GPU checkpoint loads on a CPU node
    resumed = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=5, soft=soft_cpu, device="cpu",
                       resume=rep.last_state)
    assert resumed.ok and [h["epoch"] for h in resumed.history] == [1, 2, 3] and resumed.best_acc > 0.6
    model, res = train_teacher(space, mnist_task, TeacherConfig(epochs=5, batch_size=32, lr=0.05), seed=0,
                               device="cuda")  # the recipe of the CPU teacher in `trained_teacher`
    assert res.ok and res.device.startswith("cuda") and next(model.parameters()).device.type == "cpu"
    assert res.best_acc > 0.6 and abs(res.best_acc - trained_teacher[2].best_acc) <= 0.15, res.history


def test_fast_layouts_train_the_same_student(mnist_task, trained_teacher):
    """channels-last is a layout change: the same run to float noise; bf16 autocast trains a student as good (within a
    few points on 90 validation images) and evaluation stays fp32. kd_recipe turns channels-last on from 64 px."""
    import dataclasses

    from dass_ray.core.kd import FAST_LAYOUT_FROM, kd_recipe

    space, teacher, _ = trained_teacher
    soft = compute_soft_labels(teacher, mnist_task.x_train, device=EXACT)
    arch = space.sample(np.random.default_rng(1))
    cfg = KDConfig(epochs=2, batch_size=32)
    ref = train_kd(arch, space, teacher.state_dict(), mnist_task, cfg, seed=3, soft=soft, device=EXACT)
    cl = train_kd(arch, space, teacher.state_dict(), mnist_task, dataclasses.replace(cfg, channels_last=True),
                  seed=3, soft=soft, device=EXACT)
    assert ref.ok and cl.ok
    for k in ref.state_dict:
        torch.testing.assert_close(cl.state_dict[k], ref.state_dict[k], rtol=1e-3, atol=1e-3)
    assert [h["loss"] for h in cl.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-4)
    bf = train_kd(arch, space, teacher.state_dict(), mnist_task, dataclasses.replace(cfg, bf16=True), seed=3,
                  soft=soft, device=EXACT)
    assert bf.ok and abs(bf.best_acc - ref.best_acc) <= 0.05, (bf.best_acc, ref.best_acc)
    assert all(v.dtype == torch.float32 for v in bf.state_dict.values() if v.is_floating_point())
    assert kd_recipe(cfg, 32) is cfg and not kd_recipe(cfg, FAST_LAYOUT_FROM - 8).channels_last
    assert kd_recipe(cfg, FAST_LAYOUT_FROM).channels_last and kd_recipe(cfg, 96).channels_last
