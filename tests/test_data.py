"""Tests for dass_ray.core.data: adapters on real (bundled) data, bad inputs, tasks, tensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dass_ray.core.data import MEAN, STD, DatasetError, ImageDataset, bundled_names, bundled_path, check_classes, list_adapters, load_dataset, resolve_dataset_path, shared_datasets_root, to_tensor
from dass_ray.core.tasks import TaskSpec, load_task_data, load_tasks, make_class_subset_tasks, save_tasks

SHA256 = {
    "mnist5k": "ca9ee729da448a3599c67b766357fbb2c2db2e9f5138305ae5f84e9f6ad0de51",
    "omniglot_small": "51e67df6934138930111c254fbaeaeb092ed7f37e91aefe6272c4b9461a6482e",
}


@pytest.fixture(scope="module")
def mnist() -> ImageDataset:
    return load_dataset(bundled_path("mnist5k"))


@pytest.fixture(scope="module")
def mnist_table() -> pa.Table:
    return pq.read_table(bundled_path("mnist5k"))


@pytest.fixture(scope="module")
def small_table(mnist_table) -> pa.Table:
    """30 real rows: the first 3 images of each digit (rows are sorted by label, 500 per class)."""
    rows = [c * 500 + i for c in range(10) for i in range(3)]
    return mnist_table.take(pa.array(rows))


def _replace(table: pa.Table, name: str, values, type_=None) -> pa.Table:
    i = table.schema.get_field_index(name)
    return table.set_column(i, name, pa.array(values, type=type_ or table.schema.field(name).type))


def _write(tmp_path: Path, table: pa.Table, name: str = "bad.parquet") -> Path:
    p = tmp_path / name
    pq.write_table(table, p)
    return p


# ------------------------------------------------------------------------------------------------ bundled data


def test_bundled_files_match_provenance():
    assert set(bundled_names()) >= set(SHA256)
    text = (bundled_path("mnist5k").parent / "PROVENANCE.md").read_text()
    for name, digest in SHA256.items():
        p = bundled_path(name)
        assert p.is_absolute() and p.parent.name == "data"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest
        assert digest in text
    with pytest.raises(DatasetError, match="no bundled dataset"):
        bundled_path("nope")


def test_parquet_adapter_mnist(mnist):
    assert len(mnist) == 5000 and mnist.num_classes == 10
    assert mnist.images.dtype == np.uint8 and mnist.images.shape == (5000, 28, 28, 3)
    assert mnist.labels.dtype == np.int64
    assert mnist.class_names == tuple(str(i) for i in range(10))
    assert np.array_equal(mnist.class_counts(), np.full(10, 500))
    # grayscale replicated to 3 identical channels; real digits are not blank
    assert np.array_equal(mnist.images[..., 0], mnist.images[..., 2]) and mnist.channels == 1
    assert mnist.images.max() == 255 and mnist.images.mean() > 10
    assert mnist.source.endswith("mnist5k.parquet")
    assert "parquet" in list_adapters() and "imagefolder" in list_adapters()


def test_parquet_adapter_omniglot_and_resize():
    om = load_dataset(bundled_path("omniglot_small"), image_size=32)
    assert om.images.shape == (4840, 32, 32, 3) and om.num_classes == 242
    assert om.class_names[0].count("/") == 1  # alphabet/character
    assert np.array_equal(om.class_counts(), np.full(242, 20))


def test_subset_and_check_classes(mnist):
    sub = mnist.subset([0, 500, 4999])
    assert len(sub) == 3 and sub.labels.tolist() == [0, 1, 9] and sub.class_names == mnist.class_names
    assert np.array_equal(sub.images[1], mnist.images[500]) and sub.channels == 1
    check_classes(mnist, 10, "teacher head")
    with pytest.raises(DatasetError, match="teacher head expects 40 classes.*has 10"):
        check_classes(mnist, 40, "teacher head")
    with pytest.raises(DatasetError):
        mnist.subset([5000])


def test_split_dir_adapter(tmp_path, small_table):
    d = tmp_path / "ds"
    d.mkdir()
    pq.write_table(small_table, d / "train.parquet")
    pq.write_table(small_table.slice(0, 20), d / "test.parquet")
    tr = load_dataset(d, split="train")
    assert len(tr) == 30 and tr.source.endswith("train.parquet")
    with pytest.raises(DatasetError, match="several splits"):
        load_dataset(d)
    with pytest.raises(DatasetError, match="no split 'val'.*test.*train"):
        load_dataset(d, split="val")
    with pytest.raises(DatasetError, match="split"):
        load_dataset(d / "train.parquet", split="train")


def test_npz_adapter(tmp_path, mnist):
    sub = mnist.subset(np.arange(0, 5000, 250))  # 20 images, 2 per class
    gray = sub.images[..., 0]
    p = tmp_path / "a.npz"
    np.savez(p, images=gray, labels=sub.labels.astype(np.int32), class_names=np.array(sub.class_names))
    ds = load_dataset(p)
    assert ds.images.shape == (20, 28, 28, 3) and np.array_equal(ds.images, sub.images) and ds.channels == 1
    assert ds.class_names == sub.class_names and np.array_equal(ds.labels, sub.labels)
    p2 = tmp_path / "b.npz"
    np.savez(p2, images=sub.images, labels=sub.labels)  # RGB, no class names
    ds2 = load_dataset(p2, image_size=(16, 20))
    assert ds2.images.shape == (20, 16, 20, 3) and ds2.class_names == tuple(str(i) for i in range(10))
    assert ds2.channels == 3
    p3 = tmp_path / "c.npz"
    np.savez(p3, images=gray[..., None], labels=sub.labels)
    assert load_dataset(p3).images.shape == (20, 28, 28, 3) and load_dataset(p3).channels == 1


def test_imagefolder_adapter(tmp_path, small_table):
    root = tmp_path / "folder"
    blobs = small_table["image"].to_pylist()
    labels = small_table["label"].to_pylist()
    for i, (b, y) in enumerate(zip(blobs, labels)):
        d = root / f"digit_{y}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:03d}.png").write_bytes(b)
    (root / "digit_0" / ".DS_Store").write_bytes(b"junk")  # hidden files are not data
    ds = load_dataset(root)
    assert ds.class_names == tuple(f"digit_{c}" for c in range(10))
    assert len(ds) == 30 and ds.labels.tolist() == labels and ds.images.shape == (30, 28, 28, 3)
    ref = load_dataset(_write(tmp_path, small_table, "ref.parquet"))
    assert np.array_equal(ds.images, ref.images) and ds.channels == ref.channels == 1


def test_imagefolder_mixed_sizes_resized_to_most_common(tmp_path, small_table):
    om = pq.read_table(bundled_path("omniglot_small")).slice(0, 2)["image"].to_pylist()  # 105x105
    root = tmp_path / "mixed"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for i, b in enumerate(small_table["image"].to_pylist()[:3]):
        (root / "a" / f"{i}.png").write_bytes(b)
    for i, b in enumerate(om):
        (root / "b" / f"{i}.png").write_bytes(b)
    ds = load_dataset(root)
    assert ds.images.shape == (5, 28, 28, 3)
    assert load_dataset(root, image_size=40).images.shape == (5, 40, 40, 3)


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("bad", [b"not an image at all", "truncated"])
def test_corrupt_image_bytes_names_row_and_field(tmp_path, small_table, bad):
    blobs = small_table["image"].to_pylist()
    k = 17
    blobs[k] = blobs[k][: len(blobs[k]) // 2] if bad == "truncated" else bad
    p = _write(tmp_path, _replace(small_table, "image", blobs))
    with pytest.raises(DatasetError) as e:
        load_dataset(p)
    msg = str(e.value)
    assert str(p) in msg and f"row {k}" in msg and "'image'" in msg


def test_label_out_of_range(tmp_path, small_table):
    labels = small_table["label"].to_pylist()
    names = small_table["label_name"].to_pylist()
    labels[5], names[5] = 12, "twelve"  # 11 distinct names -> labels must be in 0..10
    p = _write(tmp_path, _replace(_replace(small_table, "label", labels), "label_name", names))
    with pytest.raises(DatasetError, match=r"row 5: field 'label'.*0\.\.10.*got 12"):
        load_dataset(p)
    labels[5] = -1
    p = _write(tmp_path, _replace(_replace(small_table, "label", labels), "label_name", names))
    with pytest.raises(DatasetError, match=r"row 5: field 'label'.*got -1"):
        load_dataset(p)
    labels[5], names[5] = 10, "1"  # a known name with a new label: reported as the inconsistency it is
    p = _write(tmp_path, _replace(_replace(small_table, "label", labels), "label_name", names))
    with pytest.raises(DatasetError, match=r"row 5: field 'label_name'.*'1' has label 10 here but label 1 at row 3"):
        load_dataset(p)


def test_label_not_integer(tmp_path, small_table):
    labels = [float(v) for v in small_table["label"].to_pylist()]
    labels[7] = 2.5
    p = _write(tmp_path, _replace(small_table, "label", labels, pa.float64()))
    with pytest.raises(DatasetError, match=r"row 7: field 'label'.*integer"):
        load_dataset(p)
    p = _write(tmp_path, _replace(small_table, "label", [str(v) for v in small_table["label"].to_pylist()],
                                  pa.string()))
    with pytest.raises(DatasetError, match=r"field 'label'.*integer"):
        load_dataset(p)


def test_missing_column(tmp_path, small_table):
    p = _write(tmp_path, small_table.drop(["label_name"]))
    with pytest.raises(DatasetError, match=r"bad\.parquet: field 'label_name': missing column"):
        load_dataset(p)


def test_inconsistent_label_name(tmp_path, small_table):
    names = small_table["label_name"].to_pylist()
    names[4] = "seven"  # row 4 is a '1'; 'seven' appears nowhere else -> 11 names, one label with two names
    names[29] = "seven"  # keep the count of distinct names at 11 > labels, no range error
    p = _write(tmp_path, _replace(small_table, "label_name", names))
    with pytest.raises(DatasetError, match=r"row 4: field 'label_name'.*label 1.*'seven'.*'1' at row 3"):
        load_dataset(p)


def test_same_label_name_for_two_labels(tmp_path, small_table):
    labels = small_table["label"].to_pylist()
    names = [("8" if y == 9 else n) for n, y in zip(small_table["label_name"].to_pylist(), labels)]  # rows 27..29
    p = _write(tmp_path, _replace(small_table, "label_name", names))
    with pytest.raises(DatasetError, match=r"row 27: field 'label_name'.*'8' has label 9 here but label 8 at row 24"):
        load_dataset(p)


def test_null_and_zero_rows(tmp_path, small_table):
    labels = small_table["label"].to_pylist()
    labels[3] = None
    p = _write(tmp_path, _replace(small_table, "label", labels))
    with pytest.raises(DatasetError, match=r"row 3: field 'label': expected a value, got null"):
        load_dataset(p)
    p = _write(tmp_path, small_table.slice(0, 0), "empty.parquet")
    with pytest.raises(DatasetError, match="empty.parquet: zero rows"):
        load_dataset(p)


def test_not_a_parquet_file(tmp_path):
    p = tmp_path / "x.parquet"
    p.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="x.parquet: not a readable Parquet"):
        load_dataset(p)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "missing.parquet")


def test_npz_bad_inputs(tmp_path, mnist):
    imgs = mnist.images[:6, :, :, 0]
    labels = np.array([0, 1, 2, 0, 1, 2])
    p = tmp_path / "n.npz"
    np.savez(p, images=imgs, labels=labels, class_names=np.array(["a", "b", "c", "d"]))
    with pytest.raises(DatasetError, match=r"n\.npz: field 'labels': class 3 \('d'\).*no images"):
        load_dataset(p)
    np.savez(p, images=imgs, labels=np.array([0, 1, 2, 0, 7, 2]), class_names=np.array(["a", "b", "c"]))
    with pytest.raises(DatasetError, match=r"n\.npz: row 4: field 'label'.*0\.\.2.*got 7"):
        load_dataset(p)
    np.savez(p, imgs=imgs, labels=labels)
    with pytest.raises(DatasetError, match=r"n\.npz: field 'images': missing array"):
        load_dataset(p)
    np.savez(p, images=imgs.astype(np.float32), labels=labels)
    with pytest.raises(DatasetError, match=r"field 'images': expected dtype uint8"):
        load_dataset(p)
    np.savez(p, images=imgs[:0], labels=labels[:0])
    with pytest.raises(DatasetError, match="zero rows"):
        load_dataset(p)
    np.savez(p, images=imgs, labels=np.array([0, 1, 2, 0, 1.5, 2]))
    with pytest.raises(DatasetError, match=r"row 4: field 'labels'.*integer"):
        load_dataset(p)


def test_imagefolder_bad_inputs(tmp_path, small_table):
    blobs = small_table["image"].to_pylist()
    root = tmp_path / "f"
    for c in ("a", "b", "c"):
        (root / c).mkdir(parents=True)
    (root / "a" / "0.png").write_bytes(blobs[0])
    (root / "b" / "0.png").write_bytes(blobs[3])
    with pytest.raises(DatasetError, match=r"f/c: field 'label': class 2 \('c'\) is an empty class"):
        load_dataset(root)
    (root / "c" / "0.jpg").write_bytes(b"\xff\xd8\xff broken jpeg")
    with pytest.raises(DatasetError, match=r"c/0\.jpg: field 'image': could not decode"):
        load_dataset(root)
    (root / "c" / "0.jpg").unlink()
    (root / "c" / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"notes\.txt: field 'image': unsupported file type"):
        load_dataset(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="zero rows"):
        load_dataset(empty)


# ------------------------------------------------------------------------------------------------ tensors


def test_to_tensor_shapes_range_and_grayscale(mnist):
    x = to_tensor(mnist.images[:10], 32)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    lo = (0 - MEAN[0]) / STD[0]
    hi = (1 - MEAN[0]) / STD[0]
    assert x.min() >= lo - 1e-6 and x.max() <= hi + 1e-6 and x.max() > 0.9 * hi
    same = to_tensor(mnist.images[:10], 28)
    expect = (torch.from_numpy(mnist.images[:10]).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    assert torch.allclose(same, expect)
    g = to_tensor(mnist.images[:4, :, :, 0], 16)  # [N,H,W] grayscale -> 3 channels
    assert g.shape == (4, 3, 16, 16)
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    assert torch.equal(g, to_tensor(mnist.images[:4], 16))  # deterministic and channel-consistent
    assert to_tensor(mnist.images[:1, :, :, :1], 8).shape == (1, 3, 8, 8)
    with pytest.raises(DatasetError):
        to_tensor(mnist.images[:2].astype(np.float32), 8)


# ------------------------------------------------------------------------------------------------ tasks


def _tasks(ds, **kw):
    args = dict(source="mnist5k", path="mnist5k.parquet", num_tasks=4, classes_per_task=3, train_per_class=10,
                val_per_class=5, seed=0, prefix="mn")
    args.update(kw)
    return make_class_subset_tasks(ds, **args)


def test_tasks_deterministic(mnist):
    a, b = _tasks(mnist), _tasks(mnist)
    assert a == b and [t.fingerprint() for t in a] == [t.fingerprint() for t in b]
    c = _tasks(mnist, seed=1)
    assert [t.fingerprint() for t in a] != [t.fingerprint() for t in c]
    assert _tasks(mnist, num_tasks=2) == a[:2]  # prefix-stable
    assert [t.task_id for t in a] == ["mn-000", "mn-001", "mn-002", "mn-003"]
    assert len({t.classes for t in a}) == 4  # no repeated class set while unseen ones remain
    state = np.random.get_state()[1].copy()
    _tasks(mnist, seed=5)
    assert np.array_equal(np.random.get_state()[1], state)  # global RNG untouched


def test_tasks_disjoint_and_no_overlap(mnist):
    tasks = _tasks(mnist, num_tasks=3, disjoint=True)
    seen: set[int] = set()
    for t in tasks:
        assert not seen & set(t.classes)
        seen |= set(t.classes)
        assert not set(t.train_indices) & set(t.val_indices)
        assert len(t.train_indices) == 30 and len(t.val_indices) == 15
        assert set(mnist.labels[list(t.train_indices + t.val_indices)].tolist()) == set(t.classes)
    with pytest.raises(DatasetError, match="disjoint tasks.*need 12 classes.*has 10"):
        _tasks(mnist, num_tasks=4, disjoint=True)
    with pytest.raises(DatasetError, match="has 500 images; a task needs 501"):
        _tasks(mnist, train_per_class=400, val_per_class=101)


def test_load_task_data(mnist):
    t = _tasks(mnist, classes_per_task=4)[0]
    tr, va = load_task_data(t, mnist)
    assert tr.num_classes == va.num_classes == 4 and tr.class_names == tuple(str(c) for c in t.classes)
    assert len(tr) == 40 and len(va) == 20 and tr.channels == va.channels == 1
    assert np.array_equal(np.bincount(tr.labels), np.full(4, 10))
    assert np.array_equal(tr.images[0], mnist.images[t.train_indices[0]])
    assert t.classes[int(tr.labels[0])] == int(mnist.labels[t.train_indices[0]])
    other = mnist.subset(np.arange(0, 5000, 100))  # 50 rows: indices out of range
    with pytest.raises(DatasetError, match="wrong dataset"):
        load_task_data(t, other)


def test_task_json_round_trip(tmp_path, mnist):
    tasks = _tasks(mnist)
    t = tasks[0]
    assert TaskSpec.from_json(t.to_json()) == t
    assert TaskSpec.from_json(t.to_json()).fingerprint() == t.fingerprint()
    assert t.fingerprint() == hashlib.sha256(t.to_json().encode()).hexdigest()
    assert json.loads(t.to_json())["classes"] == list(t.classes)
    p = tmp_path / "tasks.json"
    save_tasks(p, tasks)
    assert load_tasks(p) == tasks
    data = json.loads(p.read_text())
    data[1]["val_indices"] = data[1]["val_indices"] + [data[1]["train_indices"][0]]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="entry 1: .*disjoint"):
        load_tasks(p)
    del data[1]["seed"]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"entry 1: .*missing \['seed'\]"):
        load_tasks(p)
    with pytest.raises(DatasetError, match="duplicate task id"):
        save_tasks(p, [t, t])


def test_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("DASS_DATASETS", str(tmp_path))
    assert shared_datasets_root() == tmp_path
    (tmp_path / "x.parquet").write_bytes(b"")
    assert resolve_dataset_path("x.parquet") == tmp_path / "x.parquet"
    assert resolve_dataset_path("x.parquet", data_root=tmp_path) == tmp_path / "x.parquet"
    monkeypatch.setenv("DASS_DATASETS", str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="DASS_DATASETS"):
        shared_datasets_root()
    monkeypatch.setenv("DASS_DATASETS", str(tmp_path))
    assert resolve_dataset_path("mnist5k.parquet") == bundled_path("mnist5k")  # falls back to the bundled dir
    with pytest.raises(DatasetError, match="not found"):
        resolve_dataset_path("nope.parquet")
