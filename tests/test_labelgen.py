"""Label generation and meta-training on a real local Ray (tiny config, bundled data)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dass_ray.core.config import get_scale
from dass_ray.core.meta import spearman
from dass_ray.offline.metadataset import MetaDatasetStore, load_meta_tasks
from dass_ray.offline.plans import PLANS

pytestmark = [pytest.mark.ray, pytest.mark.slow]



def raw_student_keys(root: Path) -> list[tuple[str, str, int]]:
    """(task, arch, seed) of every student row on disk -- the compacted file and every part, read raw (not through
    `MetaDatasetStore.students()`, which drops duplicates): a run recorded twice shows up twice here."""
    import pyarrow.parquet as pq

    files = sorted((root / "parts").glob("*.parquet"))
    if (root / "students.parquet").exists():
        files.append(root / "students.parquet")
    keys = []
    for f in files:
        t = pq.read_table(f, columns=["task_id", "arch_digest", "seed"])
        keys += zip(t["task_id"].to_pylist(), t["arch_digest"].to_pylist(), t["seed"].to_pylist())
    return keys


@pytest.fixture(scope="module")
def built(ray_local, tmp_path_factory):
    """Built once for the module, and never changed by a test: a partial build (as if killed after 5 runs), then
    the resumed build that completes it (4 tasks x 3 students + 2 noise-ceiling replicates). What the tests check
    about the two builds is recorded here; a test that changes the directory works on its own copy."""
    from types import SimpleNamespace

    from dass_ray.offline.labelgen import build

    out = tmp_path_factory.mktemp("md")
    scale = get_scale("tiny")
    msgs: list[str] = []
    first = build(out, scale, PLANS["tiny"], max_runs=5, log=msgs.append)  # a partial run (as if killed)
    first["log"] = msgs
    partial_keys = raw_student_keys(out)
    store = MetaDatasetStore(out)
    teachers_before = {p.name: p.stat().st_mtime for p in store.teachers.glob("*.pt")}
    man = build(out, scale, PLANS["tiny"], log=lambda m: None)
    return SimpleNamespace(out=out, scale=scale, first=first, partial_keys=partial_keys,
                           teachers_before=teachers_before, man=man)


def test_teachers_train_concurrently_up_to_the_cpus(built):
    # 4 tasks, 2 CPUs, 1 CPU per teacher: two Ray Train runs in flight at once, the next starting as one ends
    log = [m for m in built.first["log"] if m.startswith("[teacher ") and "warning:" not in m]
    kinds = ["start" if "training" in m else "done" for m in log]
    assert kinds.count("start") == kinds.count("done") == 4, log
    assert kinds[:3] == ["start", "start", "done"], log
    assert kinds[3] == "start", log  # a freed slot is refilled before waiting again


def test_near_chance_teacher_is_labelled_with_a_warning(built):
    from dass_ray.offline.labelgen import near_chance_warning

    log = built.first["log"]
    accs = {m.split()[2].rstrip(":"): float(m.split("val acc ")[1].split()[0]) for m in log if "val acc" in m}
    warned = {m.split()[2].rstrip(":") for m in log if m.startswith("[teacher ") and "warning:" in m}
    assert accs, log
    # tiny teachers: 3 classes, 1 epoch on 60 images -> at or near chance; exactly those under 0.5 are warned
    assert warned == {t for t, a in accs.items() if a < 0.5}, (accs, warned)
    assert near_chance_warning(0.0875, 40) and "near chance (0.025 for 40 classes)" in near_chance_warning(0.0875, 40)
    assert near_chance_warning(0.9, 10) is None


def test_partial_build_then_resume_records_everything_once(built, tmp_path):
    import shutil

    from dass_ray.offline.labelgen import build

    # the partial build: 5 runs, each one row on disk
    assert len(built.partial_keys) == len(set(built.partial_keys)) == 5 and built.first["sessions"][-1]["runs"] == 5
    man = built.man
    # 4 tasks x 3 students + noise-ceiling replicates of the test task (2), each exactly once on disk: the rows of
    # the partial build were kept, not written again by the resume
    assert man["students"] == 4 * 3 + 2
    keys = raw_student_keys(built.out)
    assert len(keys) == len(set(keys)) == 14, sorted(keys)
    assert set(built.partial_keys) < set(keys)
    assert not [p for p in built.out.rglob("*.tmp")]
    assert man["sessions"][-1]["runs"] == 9  # only what was missing ran
    store = MetaDatasetStore(built.out)
    assert {p.name: p.stat().st_mtime for p in store.teachers.glob("*.pt")} == built.teachers_before  # not retrained
    rows = store.students().to_pylist()
    assert all(r["status"] == "ok" and r["epochs"] == built.scale.kd.epochs for r in rows)
    assert all(len(r["embedding"]) == 128 * 4 * 4 * 2 for r in rows)
    # compaction and a resume without teachers change the directory: on a copy
    out = tmp_path / "md"
    shutil.copytree(built.out, out)
    store = MetaDatasetStore(out)
    n = store.compact()
    assert n == 14 and not list(store.parts.glob("*.parquet"))
    keys = raw_student_keys(out)
    assert len(keys) == len(set(keys)) == 14
    # a finished build resumes without its teachers (train/val teachers are not shipped): nothing retrained
    shutil.rmtree(store.teachers)
    msgs: list[str] = []
    again = build(out, built.scale, PLANS["tiny"], log=msgs.append)
    assert again["sessions"][-1]["runs"] == 0
    assert not [m for m in msgs if m.startswith("[teacher ")], msgs
    assert not list(store.teachers.glob("*.pt"))
    assert len(raw_student_keys(out)) == 14


def test_plan_file_counts_and_a_plan_that_extends_the_directory(built, tmp_path):
    import dataclasses
    import json

    from dass_ray.offline.labelgen import build
    from dass_ray.offline.plans import load_plan

    scale = built.scale
    test_group = {"role": "test", "source": "omniglot_small", "path": "omniglot_small.parquet", "num_tasks": 1,
                  "seed": 3, "classes_per_task": 3, "train_per_class": 10, "val_per_class": 5, "students": 3,
                  "second_seed": 3, "teacher_epochs": 1}
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"groups": [test_group]}))
    out = tmp_path / "md"
    man = build(out, scale, load_plan(str(plan)), log=lambda m: None)
    assert man["students"] == 6  # 3 students + all again with a second seed (not the scale's 3 and 2)
    (tid,) = man["tasks"]
    assert man["tasks"][tid] == {"role": "test", "source": "omniglot_small", "teacher_acc": man["tasks"][tid]["teacher_acc"],
                                 "ok": 3, "failed": 0, "replicates": 3}
    # evaluation of a meta-dataset that holds only test tasks: the baseline it cannot train is skipped, said so
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, str(root / "scripts" / "evaluate.py"), "--metadataset", str(out),
                        "--predictor", str(root / "dass_ray" / "assets" / "predictor" / "cpu.pt"), "--output",
                        str(tmp_path / "eval"), "--scale", "tiny", "--bootstrap", "50"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no meta-training tasks: the architecture-only baseline is skipped" in p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert list(res["tasks"]) == [tid] and "arch_only" not in res["tasks"][tid]
    assert {"posterior", "dass", "dass_size", "params", "flops", "synflow", "naswot", "kd_start",
            "random"} <= set(res["tasks"][tid])
    assert res["default_method"] == "posterior" and "dass_size" in res["diff_vs_default_ci"]
    # the posterior's intervals after 0, 1 and 3 measured students, judged on the students not yet measured
    cal = res["posterior_intervals"]["per_task"][tid]
    assert [cal[k]["students"] for k in ("0", "1", "3")] == [cal["0"]["students"], cal["0"]["students"] - 1,
                                                               cal["0"]["students"] - 3]
    # the predictor's own adaptation is `dass`; every other mode is shown beside it
    from dass_ray.core.meta import ADAPTATIONS

    assert res["adaptation"] in ADAPTATIONS
    assert {f"dass_{m}" for m in ADAPTATIONS if m != res["adaptation"]} <= set(res["tasks"][tid])
    ceiling = res["noise_ceiling_detail"][tid]
    assert ceiling["students"] == 3 and ceiling["label_seeds"] == 2 and res["task_info"][tid]["label_seeds"] == 2
    before = MetaDatasetStore(out).students().to_pylist()
    # a plan that moves the task to validation (same ids) and adds a training group: only the new task runs
    moved = dataclasses.replace(load_plan(str(plan))[0], role="val", id_prefix="test-omniglot_small-s3")
    extra = load_plan(str(plan))[0].__class__("train", "mnist5k", "mnist5k.parquet", None, 1, seed=8, students=2)
    man2 = build(out, scale, [moved, extra], log=lambda m: None)
    assert man2["sessions"][-1]["runs"] == 2 and man2["students"] == 8
    keys = raw_student_keys(out)
    assert len(keys) == len(set(keys)) == 8  # the 6 recorded rows once each, plus the new task's 2
    assert man2["tasks"][tid]["role"] == "val" and len(man2["tasks"]) == 2
    after = {(r["task_id"], r["arch_digest"], r["seed"]): r["best_acc"] for r in MetaDatasetStore(out).students().to_pylist()}
    assert all(after[(r["task_id"], r["arch_digest"], r["seed"])] == r["best_acc"] for r in before)  # rows kept
    assert [t.task_id for t in load_meta_tasks(out, ("val",))] == [tid]
    # a plan that changes a recorded task's images is refused, and nothing recorded changes
    files = {f: (out / f).read_text() for f in ("plan.json", "tasks.json", "roles.json")}
    with pytest.raises(ValueError, match="changes the images of task"):
        build(out, scale, [dataclasses.replace(moved, train_per_class=9), extra], log=lambda m: None)
    with pytest.raises(ValueError, match="drops task"):
        build(out, scale, [extra], log=lambda m: None)
    assert len(raw_student_keys(out)) == 8
    assert {f: (out / f).read_text() for f in files} == files


def test_a_diverging_student_is_a_failed_row_not_a_crash(built):
    from dass_ray.offline.labelgen import build  # noqa: F401  (same module-scoped Ray)
    from dass_ray.core.kd import SoftLabels, load_teacher
    from dass_ray.offline.metadataset import TaskContext, run_student, task_data
    from dass_ray.core.tasks import load_tasks

    out, scale = built.out, built.scale
    store = MetaDatasetStore(out)
    task = load_tasks(out / "tasks.json")[0]
    ck = load_teacher(store.teacher_path(task.task_id))
    data = task_data(task, 32)
    soft = SoftLabels(torch.full((2, len(data.y_train), data.num_classes), float("nan")))
    ctx = TaskContext(task.task_id, "train", task.source, ck.space, ck.state_dict, ck.val_acc, data, soft)
    row = run_student(ctx, ck.space.smallest(), scale, seed=0)
    assert row["status"] == "failed" and "non-finite loss" in row["reason"]


def test_meta_training_one_vs_two_workers_same_parameters_and_resume(built, tmp_path):
    import dataclasses

    from dass_ray.core.meta import make_model
    from dass_ray.core.space import get_space
    from dass_ray.offline.metatrain import MetaTrainConfig, train_local
    from dass_ray.offline.metatrain_ray import meta_train

    out = built.out
    train = load_meta_tasks(out, ("train",))
    val = load_meta_tasks(out, ("val",))
    assert len(train) == 2 and len(val) == 1
    space = get_space("cpu")
    cfg = MetaTrainConfig(episodes=4, query_size=3, eval_every=2, lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray Train worker runs
    try:
        _, ref = train_local(space, train, val, cfg)  # the single-process reference, no Ray
    finally:
        torch.set_num_threads(threads)
    ref = ref["last"]
    init = make_model(space, seed=cfg.seed).state_dict()
    assert any(not torch.allclose(init[k], ref[k]) for k in init)  # training moved the parameters
    # One worker, interrupted after 2 episodes, then resumed to 4: the same steps as the uninterrupted reference.
    meta_train(space, train, val, dataclasses.replace(cfg, episodes=2), num_workers=1, storage=tmp_path, name="r")
    resumed = meta_train(space, train, val, cfg, num_workers=1, storage=tmp_path, name="r")
    assert resumed["episodes"] == 4 and resumed["resumed_from"] == 2
    for k in ref:
        torch.testing.assert_close(resumed["last"][k], ref[k], rtol=1e-5, atol=1e-7)
    # Two workers sum the tasks' gradients in a different order (an all-reduce across workers): float32 rounding
    # differs by ~1e-7, and Adam's normalised step turns that into up to ~1% of one step (lr 1e-3) for a weight
    # whose gradient is ~0 (seen: 7e-6 on 1 of 36,864 weights). A real divergence -- a task skipped or counted
    # twice -- moves weights by whole steps, far above this tolerance.
    two = meta_train(space, train, val, cfg, num_workers=2, storage=tmp_path, name="w2")
    assert two["episodes"] == 4
    for k in ref:
        torch.testing.assert_close(two["last"][k], ref[k], rtol=1e-3, atol=2e-5)


def test_schedule_sweep_uses_meta_validation_only(built, tmp_path):
    import json
    import subprocess
    import sys

    out = built.out
    res = tmp_path / "sweep.json"
    script = str(Path(__file__).resolve().parent.parent / "scripts" / "sweep_meta.py")
    p = subprocess.run([sys.executable, script, "--metadataset", str(out), "--scale", "tiny",
                        "--episodes", "2", "--lr", "1e-3,2e-3", "--weight-decay", "0", "--rank-weight", "0,1",
                        "--jobs", "2", "--output", str(res)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert [(r["lr"], r["rank_weight"]) for r in last["runs"]] == [(1e-3, 0), (1e-3, 1), (2e-3, 0), (2e-3, 1)]
    val_ids = {t.task_id for t in load_meta_tasks(out, ("val",))}
    assert all(set(r["per_task"]) == val_ids for r in last["runs"])
    for r in last["runs"]:  # every adaptation variant is judged on the validation tasks only
        assert set(r["per_task_by_method"]) == {"step", "gated", "none", "clip0.05", "clip0.1", "clip0.2"}
        assert all(set(v) == val_ids for v in r["per_task_by_method"].values())
    # "best" is the run with the highest validation Spearman; a run whose Spearman is undefined (NaN: its
    # predictions or labels tie) never beats a defined one
    spear = [r["val_spearman"] for r in last["runs"]]
    finite = [v for v in spear if v == v]
    assert finite, spear  # at least one setting ranks the validation task: otherwise "best" chose nothing
    i = spear.index(max(finite))
    assert (last["best"]["lr"], last["best"]["rank_weight"]) == (last["runs"][i]["lr"], last["runs"][i]["rank_weight"])
    assert last["best"]["val_spearman"] == max(finite)
    assert json.loads(res.read_text())["manifest"]["command"].startswith("python ")
    bad = subprocess.run([sys.executable, script, "--metadataset", str(out), "--lr", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--lr > 0" in bad.stderr

    # objectives and seeds are grid dimensions; several seeds add each setting's seed-ensemble
    p = subprocess.run([sys.executable, script, "--metadataset", str(out), "--scale", "tiny", "--episodes", "2",
                        "--lr", "1e-3", "--train-adaptation", "step,shift", "--task-weight", "spread",
                        "--seed", "0,1", "--jobs", "2", "--output", str(res)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    full = json.loads(res.read_text())
    assert [(r["train_adaptation"], r["task_weight"], r["seed"]) for r in full["runs"]] == [
        ("step", "spread", 0), ("step", "spread", 1), ("shift", "spread", 0), ("shift", "spread", 1)]
    assert [(e["train_adaptation"], e["seeds"]) for e in full["ensembles"]] == [("step", [0, 1]), ("shift", [0, 1])]
    for e, members in zip(full["ensembles"], (full["runs"][:2], full["runs"][2:])):
        for mode in ("step", "none"):
            for task, y in members[0]["val_labels"].items():  # the ensemble scores the mean of its members
                mean = np.mean([m["val_predictions"][mode][task] for m in members], axis=0)
                want = spearman(mean, y)
                got = e[mode]["per_task"][task]
                assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want)
    assert "val_predictions" not in json.loads(p.stdout.strip().splitlines()[-1])["runs"][0]
    bad = subprocess.run([sys.executable, script, "--metadataset", str(out), "--train-adaptation", "gate"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "step, shift" in bad.stderr
