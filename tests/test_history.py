"""Retraining the predictor on a search history (dass_ray.offline.retrain) and searching with `--predictor latest`.

The history here is made of real rows: students of two of the shipped meta-dataset's test tasks, written in the
layout `scripts/search.py --history` writes (`history_from_metadataset`) (a real search appending to a history, exactly once across a resume,
is covered by tests/test_search.py; one history per service client by tests/test_server.py)."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "artifacts" / "metadataset"


def test_promotion_needs_the_users_own_domain():
    from dass_ray.offline.retrain import promotion

    def v(meta, hist, all_):
        return {"meta_val": meta, "history_held_out": hist, "all": all_}

    ok, why = promotion(v(0.2, None, 0.2), v(0.9, None, 0.9))  # better on meta-validation alone: not enough
    assert not ok and "no held-out task" in why
    ok, why = promotion(v(0.2, 0.5, 0.3), v(0.9, 0.4, 0.6))  # better overall, worse on the user's tasks
    assert not ok and "held-out history" in why
    ok, why = promotion(v(0.5, 0.5, 0.5), v(0.1, 0.6, 0.4))  # better on the user's tasks, worse overall
    assert not ok and "all validation" in why
    assert promotion(v(0.2, 0.5, 0.4), v(0.2, 0.5, 0.4))[0]  # ties promote (not worse)
    assert promotion(v(None, 0.5, 0.5), v(None, 0.7, 0.7))[0]



@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retrain_makes_a_version_not_worse_than_its_parent_latest(tmp_path, ray_local):
    """A retrain with learning rate 0 gives a version with its parent's exact parameters: equal on every validation
    task, which is "not worse" -- it must become latest, and `--predictor latest` must load it."""
    from dass_ray.core.space import get_space
    from dass_ray.offline.metadataset import load_history
    from dass_ray.offline.retrain import history_from_metadataset, retrain
    from dass_ray.search.history import LATEST, latest_predictor, versions_dir
    from dass_ray.search.inputs import DEFAULT_PREDICTOR

    hist = tmp_path / "hist"
    history_from_metadataset(META, ["test-mnist5k-s31-000", "test-omniglot_small-s32-000"], hist, students=20)
    assert sorted(len(t.acc) for t in load_history(hist)) == [20, 20]
    assert latest_predictor(hist) is None
    meta = retrain(hist, META, DEFAULT_PREDICTOR, get_space("cpu"), episodes=4, lr=0.0, holdout=0.5, seed=0)
    v1 = versions_dir(hist) / "v1.pt"
    assert meta["version"] == "v1" and v1.is_file() and json.loads(v1.with_suffix(".json").read_text()) == meta
    assert len(meta["history_val_tasks"]) == 1 and len(meta["history_train_tasks"]) == 1  # one held out
    assert set(meta["history_train_tasks"]) <= set(meta["train_tasks"])
    assert set(meta["history_val_tasks"]) <= set(meta["val_tasks"])
    b, a = meta["val_spearman_before"], meta["val_spearman_after"]
    assert b["history_held_out"] is not None and a == b  # the parent's parameters: the same on every task
    assert meta["promoted"] is True, meta["promotion"]
    assert latest_predictor(hist) == v1 and (versions_dir(hist) / LATEST).read_text().strip() == "v1.pt"
    # the next version's parent defaults to the latest; a search with --predictor latest loads it
    from dass_ray.search import SearchConfig, prepare

    c = SearchConfig(dataset="mnist5k", predictor="latest", history=str(hist), output=str(tmp_path / "o"),
                     scale="tiny", candidates=8, top_k=1)
    assert prepare(c).predictor_meta.get("version") == "v1"
    with pytest.raises(Exception, match="--predictor latest: needs --history"):
        prepare(SearchConfig(dataset="mnist5k", predictor="latest", output=str(tmp_path / "o2")))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retrain_without_a_held_out_history_task_is_written_but_never_latest(tmp_path, ray_local):
    """A history of one task has no held-out task to judge the user's domain on: the version is written, and must
    not become latest however it scores (here: trained at the default rate, on one task of real rows)."""
    from dass_ray.core.space import get_space
    from dass_ray.offline.retrain import history_from_metadataset, retrain
    from dass_ray.search.history import LATEST, latest_predictor, versions_dir
    from dass_ray.search.inputs import DEFAULT_PREDICTOR

    hist = tmp_path / "hist"
    history_from_metadataset(META, ["test-mnist5k-s31-000"], hist, students=20)
    meta = retrain(hist, META, DEFAULT_PREDICTOR, get_space("cpu"), episodes=2, holdout=0.5, seed=0)
    v1 = versions_dir(hist) / "v1.pt"
    assert meta["version"] == "v1" and v1.is_file() and json.loads(v1.with_suffix(".json").read_text()) == meta
    assert meta["history_val_tasks"] == [] and meta["val_spearman_before"]["history_held_out"] is None
    assert meta["promoted"] is False and "no held-out task" in meta["promotion"], meta["promotion"]
    assert latest_predictor(hist) is None and not (versions_dir(hist) / LATEST).exists()
    from dass_ray.search import SearchConfig, prepare

    c = SearchConfig(dataset="mnist5k", predictor="latest", history=str(hist), output=str(tmp_path / "o"),
                     scale="tiny", candidates=8, top_k=1)
    assert prepare(c).predictor_meta.get("version") is None  # the shipped predictor, not v1
