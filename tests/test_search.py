import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dass_ray.core.data import bundled_path
from dass_ray.search import DEFAULT_TEACHER, DaSSSearcher, InputError, SearchConfig, prepare
from dass_ray import contract as C
from dass_ray.core.space import get_space

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def predictor_path(tmp_path_factory):
    from dass_ray.core.meta import make_model, save_predictor

    p = tmp_path_factory.mktemp("pred") / "pred.pt"
    space = get_space("cpu")
    save_predictor(p, make_model(space, seed=1), space, {"note": "untrained, for tests"})
    return str(p)


def cfg(tmp_path, predictor_path, **kw):
    base = dict(dataset="mnist5k", teacher=str(DEFAULT_TEACHER), predictor=predictor_path,
                output=str(tmp_path / "out"), scale="tiny", candidates=64, top_k=2, encoders=2, batch_size=16)
    base.update(kw)
    return SearchConfig(**base)


# ---------------------------------------------------------------------------------------------- validation (no Ray)


@pytest.mark.parametrize("kw,msg", [
    ({"dataset": "/nonexistent/data.parquet"}, "--dataset: /nonexistent/data.parquet does not exist"),
    ({"teacher": "/nonexistent/t.pt"}, "--teacher: .*not found"),
    ({"dataset": "omniglot_small"}, "head has 10 classes but the dataset .* has 242"),
    ({"max_flops": 1000}, "budget: .*impossible"),
    ({"top_k": 100, "candidates": 10}, r"--top-k: top_k \(100\) must not exceed candidates \(10\)"),
    ({"candidates": 0}, r"--candidates: candidates must be in \[1, 1000000\], got 0"),
    ({"candidates": 2**31 - 1}, "--candidates: candidates must be in"),
    ({"kd_epochs": 2**31 - 1}, "--kd-epochs: kd_epochs must be in"),
    ({"max_params": -5}, "--max-params: max_params must be in"),
    ({"max_flops": 2.5e6}, "--max-flops: max_flops must be an integer"),
    ({"predictor": "/nonexistent/p.pt"}, "--predictor: .*not found"),
    ({"scale": "huge"}, "--scale: unknown scale 'huge'"),
    ({"remap": "sideways"}, "--remap: unknown remap 'sideways'"),
    ({"classes": ("0", "1", "2")}, "--teacher: its head has 10 classes but --classes names 3"),
    ({"classes": ("0", "seven")}, "--classes: the dataset has no class 'seven'"),
    ({"storage": "nosuch://bucket/x"}, "--storage: 'nosuch://bucket/x' is not a storage URI"),
    ({"image_size": 70}, r"--image-size: must be a multiple of 8 and at least 32 \(the predictor's size\), got 70"),
    ({"image_size": 24}, "--image-size: must be a multiple of 8 and at least 32"),
    ({"image_size": 2000}, r"--image-size: image_size must be in \[0, 1024\]"),
    ({"max_image_size": 16}, "--max-image-size: must be at least 32"),
])
def test_bad_inputs_are_rejected_before_ray(tmp_path, predictor_path, kw, msg):
    with pytest.raises(InputError, match=msg):
        prepare(cfg(tmp_path, predictor_path, **kw))


def test_classes_pick_a_subset_of_the_dataset(tmp_path, predictor_path):
    from dass_ray.core.data import load_dataset

    names = load_dataset(bundled_path("mnist5k")).class_names
    p = prepare(cfg(tmp_path, predictor_path, teacher="train", classes=(names[7], "3")))
    assert p.data.class_names == (names[3], names[7])  # in the dataset's label order
    assert set(p.data.y_train.tolist()) == {0, 1} and set(p.data.y_val.tolist()) == {0, 1}
    full = prepare(cfg(tmp_path / "b", predictor_path, teacher="train"))
    assert len(p.data.y_train) * 5 == len(full.data.y_train)  # the same images per class


def test_image_size_rule():
    from dass_ray.search.inputs import choose_image_size

    space = get_space("cpu")
    assert choose_image_size((28, 28), 0, 64, space) == 32  # never below the predictor's size
    assert choose_image_size((105, 105), 0, 64, space) == 64  # native, capped
    assert choose_image_size((105, 105), 0, 0, space) == 64  # 0: the default cap
    assert choose_image_size((100, 60), 0, 128, space) == 56  # the smaller side, a multiple of 8
    assert choose_image_size((227, 227), 0, 128, space) == 128
    assert choose_image_size((28, 28), 96, 64, space) == 96  # asked for: taken as it is (upsampling allowed)


def test_students_get_their_own_image_size_ranking_stays_at_32(tmp_path, predictor_path):
    classes = ("0", "5", "9")
    p = prepare(cfg(tmp_path, predictor_path, dataset="omniglot_small", teacher="train", classes=classes))
    assert p.data.x_train.shape[-2:] == (32, 32) and p.kd_data.x_train.shape[-2:] == (64, 64) and p.image_size == 64
    assert torch.equal(p.data.y_train, p.kd_data.y_train) and torch.equal(p.data.y_val, p.kd_data.y_val)
    # the same images: the 64-px tensors resized to 32 are close to the 32-px ones (both from the 105-px originals)
    down = torch.nn.functional.interpolate(p.kd_data.x_val, size=32, mode="bilinear", antialias=True)
    assert (down - p.data.x_val).abs().mean() < 0.1
    p96 = prepare(cfg(tmp_path / "b", predictor_path, dataset="omniglot_small", teacher="train", classes=classes,
                      max_image_size=96))
    assert p96.image_size == 96
    p40 = prepare(cfg(tmp_path / "c", predictor_path, dataset="omniglot_small", teacher="train", classes=classes,
                      image_size=40))
    assert p40.kd_data.x_val.shape[-1] == 40
    mn = prepare(cfg(tmp_path / "d", predictor_path))
    assert mn.image_size == 32 and mn.kd_data is mn.data  # 28-px MNIST: one tensor set, as before


def test_corrupt_dataset_names_the_row(tmp_path, predictor_path):
    import pyarrow as pa

    t = pq.read_table(bundled_path("mnist5k")).slice(0, 40)
    imgs = t["image"].to_pylist()
    imgs[7] = b"\x89PNG\r\n\x1a\nbroken"
    bad = tmp_path / "bad.parquet"
    pq.write_table(t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, pa.binary())), bad)
    with pytest.raises(InputError, match="row 7"):
        prepare(cfg(tmp_path, predictor_path, dataset=str(bad)))


def test_nonempty_output_needs_resume(tmp_path, predictor_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(InputError, match="not empty; pass --resume"):
        prepare(cfg(tmp_path, predictor_path))


def test_cli_fails_fast_with_one_line_and_exit_2(tmp_path, predictor_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "search.py"), "--top-k", "9", "--candidates", "3",
                        "--predictor", predictor_path, "--output", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --top-k: top_k (9) must not exceed candidates (3)"]
    assert not (tmp_path / "o").exists()
    h = subprocess.run([sys.executable, str(ROOT / "scripts" / "search.py"), "--help"], capture_output=True, text=True)
    for flag in ("--dataset", "--teacher", "--max-flops", "--max-params", "--candidates", "--top-k", "--kd-epochs",
                 "--encoders", "--predictors", "--seed", "--output", "--address"):
        assert flag in h.stdout


# ---------------------------------------------------------------------------------------------- searcher (no Ray)


def test_searcher_proposes_in_predicted_order_exactly_budget():
    archs = [f"a{i}" for i in range(6)]
    pred = np.array([0.1, 0.9, 0.5, 0.7, 0.3, 0.2])
    s = DaSSSearcher(archs, pred, list(np.argsort(-pred)), budget=3)
    got = [s.suggest(f"t{i}") for i in range(3)]
    assert [g["index"] for g in got] == [1, 3, 2]
    assert s.suggest("t0") == got[0]  # repeated suggest for the same trial: same config
    assert s.suggest("t9") == DaSSSearcher.FINISHED
    s.on_trial_complete("t0", {"best_acc": 0.8})
    s.on_trial_complete("t0", {"best_acc": 0.1})  # repeated callback ignored
    s.on_trial_complete("zzz", {"best_acc": 0.1})  # unknown trial ignored
    assert s.measured() == {1: 0.8}


def test_searcher_save_restore_resumes(tmp_path):
    archs = [f"a{i}" for i in range(5)]
    pred = np.array([0.5, 0.4, 0.3, 0.2, 0.1])
    s = DaSSSearcher(archs, pred, list(range(5)), budget=4)
    s.suggest("t0"), s.suggest("t1")
    s.on_trial_complete("t0", {"best_acc": 0.6})
    s.save(str(tmp_path / "s.pkl"))
    s2 = DaSSSearcher(archs, pred, list(range(5)), budget=4)
    s2.restore(str(tmp_path / "s.pkl"))
    assert s2.suggest("t1")["index"] == 1 and s2.suggest("t2")["index"] == 2 and s2.suggest("t3")["index"] == 3
    assert s2.suggest("t4") == DaSSSearcher.FINISHED
    # prior results (from trials.parquet on resume) count against the budget and are never re-proposed
    s3 = DaSSSearcher(archs, pred, list(range(5)), budget=2, done={0: 0.5})
    assert s3.suggest("x")["index"] == 1 and s3.suggest("y") == DaSSSearcher.FINISHED


def test_searcher_rerank_reorders_the_rest():
    archs = [f"a{i}" for i in range(5)]
    pred = np.array([0.5, 0.4, 0.3, 0.2, 0.1])
    seen = []

    def rerank(measured, remaining):
        seen.append(dict(measured))
        return list(reversed(remaining))

    s = DaSSSearcher(archs, pred, list(range(5)), budget=3, rerank=rerank)
    assert s.suggest("t0")["index"] == 0
    s.on_trial_complete("t0", {"best_acc": 0.7})
    assert seen == [{0: 0.7}] and s.suggest("t1")["index"] == 4


def test_search_order_on_a_small_fixed_case():
    """The fixed orders a search distils in (`order_key`, then highest key first, ties in candidate order), on five
    candidates worked out by hand."""
    from dass_ray.core.ranking import order_key

    scores = [0.50, 0.80, 0.20, 0.70, 0.30]  # score ranks (0 = lowest): 2, 4, 0, 3, 1
    params = [400, 100, 500, 300, 200]  # size ranks: 3, 0, 4, 2, 1

    def distilled(order, teacher_acc):
        return np.argsort(-order_key(order, scores, params, teacher_acc, 10), kind="mergesort").tolist()

    # a strong teacher (0.959 on 10 classes: 0.95 of the way from chance): mean ranks 2.5, 2, 2, 2.5, 1
    assert order_key("dass_size", scores, params, 0.959, 10).tolist() == [2.5, 2.0, 2.0, 2.5, 1.0]
    assert distilled("dass_size", 0.959) == [0, 3, 1, 2, 4]
    # a teacher near chance (0.3 on 10 classes: 0.22 of the way) and the "dass" order: the predictor's scores alone
    assert distilled("dass_size", 0.3) == [1, 3, 0, 4, 2]
    assert distilled("dass", 0.959) == [1, 3, 0, 4, 2]


# ---------------------------------------------------------------------------------------------- on Ray



@pytest.mark.ray
def test_scoring_survives_a_killed_encoder_and_scores_each_candidate_once(ray_local):
    from dass_ray.core.embed import Embedder
    from dass_ray.core.kd import load_teacher
    from dass_ray.core.meta import teacher_support
    from dass_ray.core.meta import make_model
    from dass_ray.core.predictor import PredictorBatch
    from dass_ray.search.scoring import EncoderActor, score_candidates

    ray = ray_local
    ck = load_teacher(DEFAULT_TEACHER)
    space = ck.space
    archs = space.sample_many(np.random.default_rng(0), 120)
    model = make_model(get_space("cpu"), seed=3)
    # in-process reference
    eng = Embedder(ck.state_dict, space)
    tmap = eng.teacher_embedding().clone()
    sup = teacher_support(tmap, torch.from_numpy(space.encode(space.teacher()).astype(np.float32)), ck.val_acc)
    ref = model.predict(sup, PredictorBatch(eng.embed(archs).clone(), tmap,
                                            torch.from_numpy(space.encode_many(archs)))).numpy()
    sd_ref = ray.put(ck.state_dict)
    actors = [EncoderActor.options(num_cpus=0.5).remote(space.to_dict(), 0, 1) for _ in range(2)]
    ray.get([a.load.remote([sd_ref]) for a in actors])
    ray.get([a.node.remote() for a in actors])
    calls = []

    def progress(k):
        calls.append(k)
        if len(calls) == 2:  # mid-run: kill one encoder for good
            ray.kill(actors[0], no_restart=True)

    got = score_candidates(ck.state_dict, space, archs, model, ck.val_acc, batch_size=10, on_progress=progress,
                           actors=actors)
    assert len(got) == len(archs) and sum(calls) == len(archs)  # every candidate scored exactly once
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_search_end_to_end_and_resume(ray_local, tmp_path, predictor_path, monkeypatch):
    import builtins

    from dass_ray.search import SearchRun

    # Ray's tqdm_ray swaps builtins.print once any Ray progress bar exists in the process; Tune then must still be
    # able to pickle its experiment state (callbacks and searcher must not drag the run or `print` along).
    real_print = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *a, **k: real_print(*a, **k))
    # KD checkpoints on separate storage given as a URI (as s3:// or a shared mount would be on a cluster): the
    # export must read the best one through its file system, not from --output.
    store = tmp_path / "shared-store"
    hist = tmp_path / "history"
    c = cfg(tmp_path, predictor_path, candidates=40, top_k=2, storage=f"file://{store}", history=str(hist),
            order="dass_size")
    prep = prepare(c)
    result = SearchRun(prep).run()
    out = Path(c.output)
    cands = pq.read_table(out / "candidates.parquet")
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert cands.num_rows == 40 and len(trials) == 2
    # the fixed blended order ("dass_size"): under a teacher well above chance (0.959 on 10 classes: (0.959 - 0.1)
    # / 0.9 = 0.95 of the way from chance, above the blend's threshold) the mean of the predictor-score rank and the
    # parameter-count rank (ties averaged), highest first, ties in candidate order -- written out here from that
    # definition, not with the code's own size_blend (whose arithmetic test_search_order_on_a_small_fixed_case pins)
    teacher_acc = json.loads((out / "result.json").read_text())["teacher_acc"]
    assert teacher_acc > 0.9 and not [w for w in result.warnings if "near chance" in w], result.warnings

    def avg_rank(v):
        return np.array([(v < x).sum() + ((v == x).sum() - 1) / 2 for x in v])

    score = cands["predictor_score" if "predictor_score" in cands.column_names else "predicted_acc"].to_numpy()
    key = (avg_rank(score) + avg_rank(cands["params"].to_numpy())) / 2
    first = sorted(range(40), key=lambda i: (-key[i], i))
    assert [int(cands["rank"][i].as_py()) for i in first] == list(range(40))
    assert {t["index"] for t in trials} == set(first[:2])  # exactly the first K in that order distilled
    # each measured accuracy is a count of correctly classified validation images (100 here: 10 per class) and
    # above chance (0.1) for a student distilled from a 0.96 teacher
    n_val = len(prep.data.y_val)
    assert n_val == 100
    for t in trials:
        assert t["status"] == "ok" and t["measured_acc"] > 0.1, t
        assert round(t["measured_acc"] * n_val, 6) == int(round(t["measured_acc"] * n_val)), t["measured_acc"]
    assert all(t["checkpoint"].startswith(str(store / "kd")) for t in trials), [t["checkpoint"] for t in trials]
    assert not (out / "tune").exists()
    # predictions a user reads as accuracies: each trial's posterior mean and 90% interval when it was picked, and
    # candidates.parquet rewritten with the posterior given both measured students (what a resume rebuilds)
    from dass_ray.core.posterior import PoolModel, load_prior
    from dass_ray.core.space import ArchConfig

    for t in trials:
        assert 0 <= t["predicted_lo"] <= t["predicted_acc"] <= t["predicted_hi"] <= 1, t
        assert t["predicted_lo"] < t["predicted_hi"], t
    post = PoolModel(load_prior(), score, cands["params"].to_numpy(), cands["flops"].to_numpy(), teacher_acc,
                     prep.data.num_classes,
                     prep.space.encode_many([ArchConfig.from_json(j) for j in cands["arch_json"].to_pylist()]))
    prior_mean = post.mean()
    for t in trials:
        post.observe(t["index"], t["measured_acc"])
    np.testing.assert_allclose(cands["predicted_acc"].to_numpy(), np.clip(post.mean(), 0, 1), atol=1e-9)
    np.testing.assert_allclose(cands["predicted_hi"].to_numpy(), post.interval()[1], atol=1e-9)
    assert np.abs(post.mean() - prior_mean).max() > 1e-4  # the measurements moved the predictions
    res = json.loads((out / "result.json").read_text())
    assert [e["format"] for e in res["exports"]] == ["torchscript", "onnx", "torch_export"] and res["stop_reason"] == ""
    assert result.best.measured_acc == max(t["measured_acc"] for t in trials)
    assert (out / "report.png").stat().st_size > 1000
    assert result.input_spec.to_dict() == {"height": 28, "width": 28, "channels": 1, "model_size": 32, "mean": 0.5,
                                           "std": 0.5, "dtype": "uint8"}  # mnist5k: 28x28 grayscale
    assert C.SearchResult.read(out / "result.json") == result and set(result.timings_s) <= set(C.TIMED_STAGES)
    ts = torch.jit.load(str(out / "student.torchscript.pt"))
    assert ts(torch.zeros(2, 28, 28, 1, dtype=torch.uint8)).shape == (2, 10)
    # The exported student is the best trial's: on the search's own validation split -- the same images, as uint8
    # at their native size and channel count, fed through the file's own preprocessing -- it scores exactly the
    # accuracy the search measured for the best student.
    from dass_ray.core.data import load_dataset, to_tensor
    from dass_ray.core.tasks import dataset_task, load_task_data

    task, _ = dataset_task(bundled_path("mnist5k"), prep.scale, c.seed)  # the split prepare() made
    _, va = load_task_data(task, load_dataset(bundled_path("mnist5k")))
    assert torch.equal(to_tensor(va.images, 32), prep.data.x_val) and torch.equal(torch.from_numpy(va.labels),
                                                                                  prep.data.y_val)
    assert (va.images == va.images[..., :1]).all()  # grayscale stored as RGB: one channel is the image
    images = torch.from_numpy(np.ascontiguousarray(va.images[..., :1]))  # [100, 28, 28, 1] uint8, as a user has them
    with torch.no_grad():
        pred = torch.cat([ts(images[i:i + 500]).argmax(1) for i in range(0, len(images), 500)])
    acc = int((pred == prep.data.y_val).sum()) / len(pred)
    assert acc == result.best.measured_acc, (acc, result.best.measured_acc, [t["measured_acc"] for t in trials])
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert events[-1]["stage"] == "done"
    # resume: drop one finished trial -> only that one runs again, scoring is not redone
    pq.write_table(pq.read_table(out / "trials.parquet").slice(0, 1), out / "trials.parquet")
    (out / "result.json").unlink()
    rows1 = pq.read_table(hist / "students").to_pylist()
    assert len(rows1) == 2 and {r["arch_json"] for r in rows1} == {t["arch_json"] for t in trials}
    c2 = cfg(tmp_path, predictor_path, candidates=40, top_k=2, resume=True, storage=str(store), history=str(hist),
             order="dass_size")
    SearchRun(prepare(c2)).run()
    # the resumed search re-exports and records its students again: the history still holds them once
    from dass_ray.offline.metadataset import load_history

    # counted on disk (load_history would count a student recorded twice once): one file each, the same rows
    assert [p.name for p in (hist / "students").iterdir()] == [p.name for p in (hist / "tasks").iterdir()] == \
        [f"{json.loads((out / 'state.json').read_text())['run_id']}.parquet"]
    rows2 = pq.read_table(hist / "students").to_pylist()
    assert sorted((r["arch_json"], r["best_acc"]) for r in rows2) == sorted((r["arch_json"], r["best_acc"])
                                                                            for r in rows1)
    assert len(pq.read_table(hist / "tasks").to_pylist()) == 1
    (task,) = load_history(hist)
    assert task.role == "history" and len(task.acc) == 2 and task.teacher_acc == pytest.approx(0.959, abs=1e-3)
    assert sorted(task.acc.tolist()) == pytest.approx(sorted(t["measured_acc"] for t in trials))
    assert task.maps.shape[0] == 2 and task.maps.shape[1:] == task.teacher_map.shape[1:]
    events2 = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    new = events2[len(events):]
    assert [e["seq"] for e in events2] == list(range(len(events2)))
    assert any("resumed: candidates already scored" in e["message"] for e in new)
    assert sum(1 for e in new if e["stage"] == "kd" and "measured" in e["message"]) == 1
    assert len(pq.read_table(out / "trials.parquet")) == 2 and (out / "result.json").exists()


@pytest.mark.ray
def test_search_distils_and_exports_at_the_images_own_size(ray_local, tmp_path, predictor_path):
    """Omniglot (105 px): ranked at 32 px, the top students distilled at 64 px (the default cap); the exported
    student takes the 105-px images and, on the search's validation split, scores exactly what the search measured."""
    from dass_ray.core.data import load_dataset
    from dass_ray.core.tasks import dataset_task, load_task_data
    from dass_ray.search import SearchRun

    c = cfg(tmp_path, predictor_path, dataset="omniglot_small", teacher="train", classes=("0", "5", "9"),
            candidates=8, top_k=1)
    prep = prepare(c)
    result = SearchRun(prep).run()
    assert result.input_spec.model_size == 64 and (result.input_spec.height, result.input_spec.width) == (105, 105)
    import dataclasses

    from dass_ray.core.space import ArchConfig

    at64 = dataclasses.replace(prep.space, image_size=64)  # FLOPs (and the budget) at the size it is exported at
    assert result.best.flops == at64.flops(ArchConfig.from_dict(result.best.arch)) > 3 * prep.space.flops(
        ArchConfig.from_dict(result.best.arch)) and result.teacher_flops == at64.flops(prep.space.teacher())
    events = [json.loads(line) for line in (Path(c.output) / "events.jsonl").read_text().splitlines()]
    assert any("at 64x64 px" in e["message"] for e in events if e["stage"] == "kd")
    ts = torch.jit.load(str(Path(c.output) / "student.torchscript.pt"))
    ds = load_dataset(bundled_path("omniglot_small"))
    task, _ = dataset_task(bundled_path("omniglot_small"), prep.scale, c.seed,
                           pick_classes=lambda names: [0, 5, 9])
    _, va = load_task_data(task, ds)
    images = torch.from_numpy(np.ascontiguousarray(va.images[..., :1]))  # [n, 105, 105, 1] uint8, grayscale
    assert images.shape[1:] == (105, 105, 1)
    with torch.no_grad():
        pred = ts(images).argmax(1)
    acc = int((pred == prep.kd_data.y_val).sum()) / len(pred)
    assert acc == result.best.measured_acc, (acc, [t["measured_acc"] for t in result.trials])
    # the file feeds the student 64-px tensors: its logits are the student's own on the search's 64-px split
    blob = torch.load(Path(c.output) / "student.pt", map_location="cpu", weights_only=False)
    from dass_ray.core.nets import build
    from dass_ray.core.space import ArchConfig, SpaceConfig

    student = build(ArchConfig.from_dict(blob["arch"]), SpaceConfig.from_dict(blob["space"]))
    student.load_state_dict(blob["state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(ts(images), student.eval()(prep.kd_data.x_val), rtol=1e-4, atol=1e-4)


def test_a_near_chance_teacher_is_warned_about():
    from dass_ray.core.ranking import NEAR_CHANCE_STRENGTH, teacher_strength
    from dass_ray.offline.labelgen import near_chance_warning
    from dass_ray.search import near_chance_teacher_warning

    w = near_chance_teacher_warning(0.23, 5)  # sign digits s74's teacher: 0.04 of the way from chance
    assert w is not None and "0.230" in w and "0.200 for 5 classes" in w and "--top-k" in w
    assert near_chance_teacher_warning(0.52, 6) is None and near_chance_teacher_warning(0.959, 10) is None
    # one rule for the search and for labelling: a quarter of the way from chance to perfect
    for acc, classes in ((0.39, 5), (0.41, 5), (0.3, 10), (0.33, 10), (0.0875, 40)):
        weak = teacher_strength(acc, classes) < NEAR_CHANCE_STRENGTH
        assert (near_chance_teacher_warning(acc, classes) is not None) == weak == (
            near_chance_warning(acc, classes) is not None), (acc, classes)


def test_a_foreign_teacher_near_chance_is_warned_about_even_with_a_good_proxy():
    from dass_ray.search.inputs import teacher_warnings

    # Tiny-ImageNet in artifacts/transfer: a from-scratch ResNet-18 at 0.26 on 5 classes, its proxy at 0.568
    w = teacher_warnings(0.568, 5, {}, foreign_acc=0.26)
    assert len(w) == 1 and w[0].startswith("teacher accuracy 0.260 is near chance")
    assert teacher_warnings(0.568, 5, {}) == [] and teacher_warnings(0.568, 5, {}, foreign_acc=0.65) == []


def test_teacher_outside_the_meta_training_range_is_warned_about():
    from dass_ray.search import teacher_range_warning

    meta = {"train_teacher_acc_range": [0.57, 0.98]}
    assert teacher_range_warning(0.75, meta) is None
    assert teacher_range_warning(0.57, meta) is None and teacher_range_warning(0.98, meta) is None
    w = teacher_range_warning(0.16, meta)
    assert w is not None and "0.160" in w and "0.57-0.98" in w and "--readapt" in w
    assert teacher_range_warning(0.99, meta) is not None
    assert teacher_range_warning(0.16, {}) is None  # an older checkpoint without the range: nothing to compare
    assert teacher_range_warning(0.16, {**meta, "adaptation": "none"}) is None  # never a step: nothing to warn of
    w = teacher_range_warning(0.16, {**meta, "adaptation": "clip"})
    assert w is not None and "takes the teacher-guided step anyway" in w
