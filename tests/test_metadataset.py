"""Task plans (built-in and JSON files), class pools and plan extension rules: no Ray, bundled data only."""
import json

import pytest

from dass_ray.core.config import get_scale
from dass_ray.core.data import load_dataset, resolve_dataset_path
from dass_ray.core.tasks import make_class_subset_tasks
from dass_ray.offline.metadataset import MetaDatasetStore
from dass_ray.offline.plans import PLANS, TaskGroup, load_plan, make_tasks


def _plan_file(tmp_path, groups) -> str:
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"groups": groups}))
    return str(p)


GROUP = {"role": "test", "source": "mnist5k", "path": "mnist5k.parquet", "num_tasks": 2, "seed": 5,
         "classes_per_task": 4, "train_per_class": 10, "val_per_class": 5, "students": 7, "second_seed": 3,
         "teacher_epochs": 2, "class_pool": [0, 1, 2, 3, 4, 5]}


def test_plan_file_with_custom_counts(tmp_path):
    scale = get_scale("tiny")
    (g,) = load_plan(_plan_file(tmp_path, [GROUP]))
    assert g.num_students(scale) == 7 and g.num_second_seed(scale) == 3
    assert g.teacher_scale(scale).teacher.epochs == 2 and scale.teacher.epochs == 1
    pairs = make_tasks([g], scale)
    assert [t.task_id for t, _ in pairs] == ["test-mnist5k-s5-000", "test-mnist5k-s5-001"]
    for t, _ in pairs:
        assert len(t.classes) == 4 and set(t.classes) <= set(range(6))
        assert len(t.train_indices) == 40 and len(t.val_indices) == 20
    # counts left out take the scale's (test tasks: students_per_test_task and noise_ceiling_students)
    (d,) = load_plan(_plan_file(tmp_path, [{k: GROUP[k] for k in ("role", "source", "path", "num_tasks", "seed")}]))
    assert d.num_students(scale) == scale.students_per_test_task
    assert d.num_second_seed(scale) == scale.noise_ceiling_students
    assert TaskGroup("train", "x", "x", None, 1, 0).num_second_seed(scale) == 0


@pytest.mark.parametrize("change, message", [
    ({"students": 0}, "field 'students': expected an integer >= 1"),
    ({"second_seed": "all"}, "field 'second_seed': expected an integer >= 0"),
    ({"role": "training"}, "field 'role': expected one of"),
    ({"class_pool": []}, "field 'class_pool'"),
    ({"studnets": 3}, "unknown field(s) ['studnets']"),
    ({"seed": None}, "field 'seed': expected an integer >= 0"),
])
def test_plan_file_errors_name_the_group_and_field(tmp_path, change, message):
    path = _plan_file(tmp_path, [GROUP, {**GROUP, **change}])
    with pytest.raises(ValueError) as e:
        load_plan(path)
    assert f"{path}: groups[1]" in str(e.value) and message in str(e.value)


def test_plan_spec_neither_name_nor_file(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in plan .*broad.* nor a plan file"):
        load_plan(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON plan file"):
        load_plan(str(bad))
    bad.write_text(json.dumps({"groups": []}))
    with pytest.raises(ValueError, match="non-empty list 'groups'"):
        load_plan(str(bad))


def test_class_pool_keeps_tasks_inside_it_and_default_is_unchanged():
    ds = load_dataset(resolve_dataset_path("mnist5k.parquet"))
    kw = dict(source="m", path="p", num_tasks=3, classes_per_task=3, train_per_class=5, val_per_class=2, seed=9,
              prefix="t")
    pooled = make_class_subset_tasks(ds, class_pool=[5, 6, 7, 8, 9], **kw)
    assert all(set(t.classes) <= {5, 6, 7, 8, 9} for t in pooled)
    assert all(ds.labels[i] in t.classes for t in pooled for i in t.train_indices + t.val_indices)
    # an explicit pool of every class is the default
    assert make_class_subset_tasks(ds, class_pool=range(10), **kw) == make_class_subset_tasks(ds, **kw)
    with pytest.raises(ValueError, match="class pool has 2 classes"):
        make_class_subset_tasks(ds, class_pool=[0, 1], **kw)
    with pytest.raises(ValueError, match=r"class_pool must be class ids in 0..9"):
        make_class_subset_tasks(ds, class_pool=[3, 10], **kw)


@pytest.mark.parametrize("name", ["broad", "broad3", "broad4"])
def test_broad_plan_keeps_cpu_tasks_and_separates_val_classes(name):
    cpu, broad = PLANS["cpu"], PLANS[name]
    # the cpu plan's task ids (hence rows) survive in the broad plan
    assert [g.prefix for g in cpu] == [g.prefix for g in broad[:len(cpu)]]
    roles = {}
    for g in broad:
        roles.setdefault(g.role, set()).add(g.source)
    assert len(roles["train"]) >= 7 and len(roles["val"]) >= 3 and len(roles["test"]) >= 4
    assert not roles["test"] & (roles["train"] | roles["val"])
    assert sum(g.num_tasks for g in broad if g.role == "train") >= 24
    assert sum(g.num_tasks for g in broad if g.role == "val") >= 6
    assert sum(g.num_tasks for g in broad if g.role == "test") >= 8
    # validation classes never overlap a training group's classes of the same source
    for v in (g for g in broad if g.role == "val"):
        for t in (g for g in broad if g.role == "train" and g.source == v.source):
            assert v.class_pool and t.class_pool and not set(v.class_pool) & set(t.class_pool)
    scale = get_scale("cpu")
    assert all(g.num_students(scale) >= 30 for g in broad)
    assert all(g.num_students(scale) >= 50 and g.num_second_seed(scale) >= 50 for g in broad if g.role == "test")


def test_broad3_plan_extends_broad_with_a_third_task_per_test_source():
    broad, broad3 = PLANS["broad"], PLANS["broad3"]
    assert broad3[:len(broad)] == broad  # every recorded task (and row) of the broad plan survives
    tests = {}
    for g in broad3:
        if g.role == "test":
            tests[g.source] = tests.get(g.source, 0) + g.num_tasks
    # bench_history holds one task out and needs two more of its source: one to train on, one to validate on
    assert len(tests) >= 4 and min(tests.values()) >= 3, tests
    assert [g.role for g in broad3[len(broad):]] == ["test"] * (len(broad3) - len(broad))


def test_broad4_plan_adds_near_chance_teachers_to_meta_training_and_validation_only():
    broad3, broad4 = PLANS["broad3"], PLANS["broad4"]
    assert broad4[:len(broad3)] == broad3
    new = broad4[len(broad3):]
    assert {g.role for g in new} == {"train", "val"} and sum(g.role == "val" for g in new) >= 3
    test_sources = {g.source for g in broad3 if g.role == "test"}
    assert not {g.source for g in new} & test_sources
    # the regime the predictor was weakest in: a briefly trained teacher on few images, enough validation images
    assert all(g.teacher_epochs <= 3 and g.train_per_class <= 30 and g.val_per_class >= 40 for g in new)


def test_weak_holdout_plan_is_new_weak_teacher_test_tasks_of_the_test_sources_only():
    broad4, holdout = PLANS["broad4"], PLANS["weak_holdout"]
    test_sources = {g.source for g in broad4 if g.role == "test"}
    assert {g.role for g in holdout} == {"test"} and {g.source for g in holdout} == test_sources
    scale = get_scale("cpu")
    # none of them is a shipped task (a task's id and images follow from its source and seed): they are judged
    # once, on tasks no one has looked at
    assert not {g.seed for g in holdout} & {g.seed for g in broad4}
    # the regime of sign digits s74: a briefly trained teacher on few images; two KD seeds for every student
    assert all(g.teacher_epochs <= 3 and g.train_per_class <= 20 for g in holdout)
    assert all(g.num_students(scale) >= 50 and g.num_second_seed(scale) == g.num_students(scale) for g in holdout)


def test_store_accepts_a_plan_with_other_counts_and_refuses_another_recipe(tmp_path):
    scale = get_scale("tiny")
    store = MetaDatasetStore(tmp_path / "md")
    plan = {"scale": scale.to_dict(), "groups": [g.to_dict() for g in PLANS["tiny"]], "seed": 0}
    store.init(plan)
    more = {**plan, "scale": scale.replace(students_per_task=9, noise_ceiling_students=5).to_dict(),
            "groups": plan["groups"] + [dict(GROUP, class_pool=None)]}
    store.init(more)  # more students, a new group: a continuation
    assert json.loads((store.root / "plan.json").read_text()) == json.loads(json.dumps(more))
    with pytest.raises(ValueError, match=r"another scale or seed \(differs in \['kd'\]"):
        store.init({**plan, "scale": scale.replace(kd={"epochs": 2}).to_dict()})
    with pytest.raises(ValueError, match="another scale or seed"):
        store.init({**plan, "seed": 1})
