#!/usr/bin/env python
"""Two measurements of issue 27, on meta-dataset tasks whose source images are at least 64 pixels:

* **resolution**: do students rank the same when distilled at 64x64 as at 32x32 (the predictor's size)? The same
  students (the task's meta-dataset students), the same family teacher (trained at 32 px on the task, its soft labels
  computed once at 32 px), distilled at 32 px with two seeds (the seed-to-seed Spearman is the ceiling) and at 64 px.
* **foreign**: how does the predictor's ranking hold up when the teacher is not of the remapping family? A torchvision
  ResNet-18 trained here at its own input size (64 px) is the foreign teacher; a proxy (the family's largest member
  distilled from it at 32 px, `dass_ray.core.kd.train_proxy`) is what the predictor and remapping see; the same
  students, initialised from the proxy, are distilled from the ResNet-18's own soft labels. Spearman of the
  predictor's ranking (with the proxy) against those accuracies vs the predictor's ranking (with the family teacher)
  against the students distilled from the family teacher.

Every run appends one JSON line to `<out>/rows.jsonl` (resumable: finished runs are skipped; teachers are cached under
`<out>/cache/`, not committed); `--summary` writes `<out>/summary.json` and `summary.md` from the rows. Runs one
process with `--threads` torch threads (default 1) so it can run beside other work.

    python scripts/measure_transfer.py --tasks train-tiny_imagenet50-s46-000,train-flowers5-s51-000
    python scripts/measure_transfer.py --summary
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from dass_ray._deps import require

require("torch", "torchvision", "pyarrow", "numpy")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from dass_ray.contract import DEFAULT_PREDICTOR  # noqa: E402
from dass_ray.core.config import get_scale  # noqa: E402
from dass_ray.core.kd import kd_recipe, compute_soft_labels, train_kd, train_model, train_proxy, train_teacher  # noqa: E402
from dass_ray.core.embed import Embedder  # noqa: E402
from dass_ray.core.meta import load_predictor, spearman, teacher_support  # noqa: E402
from dass_ray.core.predictor import PredictorBatch  # noqa: E402
from dass_ray.core.space import ArchConfig, get_space  # noqa: E402
from dass_ray.core.tasks import load_tasks  # noqa: E402
from dass_ray.offline.metadataset import task_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("family32", "foreign", "family32_seed1", "family64", "family64_seed1")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


class Rows:
    def __init__(self, path: Path):
        self.path = path
        self.rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
        self.keys = {r["key"] for r in self.rows}

    def add(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.keys.add(row["key"])


def _cached(path: Path, make):
    if path.exists():
        return torch.load(path, map_location="cpu", weights_only=True)
    blob = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return blob


def scores(teacher_sd: dict, space, archs, acc: float) -> list[float]:
    model, _ = load_predictor(DEFAULT_PREDICTOR)
    eng = Embedder(teacher_sd, space)
    tmap = eng.teacher_embedding().clone()
    sup = teacher_support(tmap, torch.from_numpy(space.encode(space.teacher()).astype(np.float32)), acc)
    q = PredictorBatch(eng.embed(archs).clone(), tmap, torch.from_numpy(space.encode_many(archs)))
    return [float(v) for v in model.predict(sup, q).numpy()]


def run_task(tid: str, phases: list[str], rows: Rows, out: Path, data_root: Path, cache: dict) -> None:
    scale = get_scale("cpu")
    spec = {t.task_id: t for t in load_tasks(ROOT / "artifacts/metadataset/tasks.json")}[tid]
    st = pq.read_table(ROOT / "artifacts/metadataset/students.parquet").to_pandas()
    st = st[(st.task_id == tid) & (st.replicate == 0) & (st.seed == 0)]
    archs = [ArchConfig.from_json(a) for a in st.arch_json]
    d32 = task_data(spec, 32, data_root, cache)
    space = get_space("cpu", d32.num_classes)
    cdir = out / "cache" / tid

    def teacher_blob():
        log(f"{tid}: training the family teacher at 32 px")
        m, res = train_teacher(space, d32, scale.teacher, seed=0, device="cpu")
        return {"sd": m.state_dict(), "acc": res.final_acc, "wall_s": res.wall_s}

    fam = _cached(cdir / "family.pt", teacher_blob)
    if f"{tid}/family/teacher" not in rows.keys:
        rows.add({"key": f"{tid}/family/teacher", "task": tid, "kind": "teacher", "teacher": "family", "size": 32,
                  "acc": fam["acc"], "wall_s": fam["wall_s"]})
    soft32 = compute_soft_labels(_family(space, fam["sd"]), d32.x_train, views=2, device="cpu")
    if f"{tid}/family/scores" not in rows.keys:
        rows.add({"key": f"{tid}/family/scores", "task": tid, "kind": "scores", "teacher": "family",
                  "digests": list(st.arch_digest), "scores": scores(fam["sd"], space, archs, fam["acc"]),
                  "meta_acc32": [float(a) for a in st.best_acc]})

    def students(tag: str, data, soft, init_sd, seed: int, size: int, teacher: str, kd=scale.kd):
        for a, dg in zip(archs, st.arch_digest):
            key = f"{tid}/{tag}/{dg}"
            if key in rows.keys:
                continue
            res = train_kd(a, space, init_sd, data, kd, seed=seed, soft=soft, device="cpu")
            rows.add({"key": key, "task": tid, "kind": "student", "tag": tag, "teacher": teacher, "size": size,
                      "seed": seed, "digest": dg, "acc": res.best_acc, "final_acc": res.final_acc,
                      "status": res.status, "wall_s": res.wall_s})
            log(f"{key}: {res.best_acc:.4f} ({res.wall_s:.0f} s)")

    for ph in phases:
        if ph == "family32":
            students("family32", d32, soft32, fam["sd"], 0, 32, "family")
        elif ph == "family32_seed1":
            students("family32_seed1", d32, soft32, fam["sd"], 1, 32, "family")
        elif ph in ("family64", "family64_seed1"):
            d64 = task_data(spec, 64, data_root, cache)
            students(ph, d64, soft32, fam["sd"], 0 if ph == "family64" else 1, 64, "family",
                     kd=kd_recipe(scale.kd, 64))
        elif ph == "foreign":
            import torchvision

            d64 = task_data(spec, 64, data_root, cache)

            def foreign_blob():
                log(f"{tid}: training a torchvision ResNet-18 at 64 px")
                torch.manual_seed(0)
                m, res = train_model(torchvision.models.resnet18(num_classes=d64.num_classes), d64, scale.teacher,
                                     seed=0, device="cpu")
                return {"sd": m.state_dict(), "acc": res.final_acc, "wall_s": res.wall_s}

            rn = _cached(cdir / "resnet18.pt", foreign_blob)
            model = torchvision.models.resnet18(num_classes=d64.num_classes)
            model.load_state_dict(rn["sd"])
            soft_rn = compute_soft_labels(model.eval(), d64.x_train, views=2, device="cpu")

            def proxy_blob():
                log(f"{tid}: distilling the proxy (family's largest member) from the ResNet-18 at 32 px")
                m, res = train_proxy(space, d32, soft_rn, scale.teacher, scale.kd, seed=0, device="cpu")
                return {"sd": m.state_dict(), "acc": res.final_acc, "wall_s": res.wall_s}

            px = _cached(cdir / "proxy.pt", proxy_blob)
            for name, b in (("resnet18", rn), ("proxy", px)):
                if f"{tid}/{name}/teacher" not in rows.keys:
                    rows.add({"key": f"{tid}/{name}/teacher", "task": tid, "kind": "teacher", "teacher": name,
                              "size": 64 if name == "resnet18" else 32, "acc": b["acc"], "wall_s": b["wall_s"]})
            if f"{tid}/proxy/scores" not in rows.keys:
                rows.add({"key": f"{tid}/proxy/scores", "task": tid, "kind": "scores", "teacher": "proxy",
                          "digests": list(st.arch_digest), "scores": scores(px["sd"], space, archs, px["acc"])})
            students("foreign32", d32, soft_rn, px["sd"], 0, 32, "resnet18")
        else:
            raise SystemExit(f"unknown phase {ph!r}; known: {PHASES}")


def _family(space, sd):
    from dass_ray.core.nets import build

    m = build(space.teacher(), space)
    m.load_state_dict(sd)
    return m.eval()


def _boot(x: list[float], y: list[float], n: int = 2000, seed: int = 0) -> list[float]:
    """90% bootstrap interval (over students) of the Spearman correlation of x and y."""
    rng = np.random.default_rng(seed)
    x, y = np.asarray(x), np.asarray(y)
    vals = []
    for _ in range(n):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            vals.append(spearman(x[i], y[i]))
    return [round(float(np.quantile(vals, 0.05)), 3), round(float(np.quantile(vals, 0.95)), 3)]


def _rho(x: list[float], y: list[float]) -> dict:
    return {"spearman": spearman(x, y), "n": len(x), "ci90": _boot(x, y)}


def summary(out: Path) -> dict:
    rows = Rows(out / "rows.jsonl").rows
    tasks = sorted({r["task"] for r in rows})
    res: dict = {"tasks": {}}
    for t in tasks:
        tr = [r for r in rows if r["task"] == t]
        acc = {}
        for r in tr:
            if r["kind"] == "student" and r["status"] == "ok":
                acc.setdefault(r["tag"], {})[r["digest"]] = r["acc"]
        sc = {r["teacher"]: r for r in tr if r["kind"] == "scores"}
        teachers = {r["teacher"]: r["acc"] for r in tr if r["kind"] == "teacher"}
        entry = {"teachers": teachers, "students": {k: len(v) for k, v in acc.items()},
                 "mean_acc": {k: float(np.mean(list(v.values()))) for k, v in acc.items()}}

        def rho(a, b):
            if a not in acc or b not in acc:
                return None
            common = sorted(set(acc[a]) & set(acc[b]))
            return _rho([acc[a][d] for d in common], [acc[b][d] for d in common])

        def rho_pred(teacher, tag):
            if teacher not in sc or tag not in acc:
                return None
            s = dict(zip(sc[teacher]["digests"], sc[teacher]["scores"]))
            common = sorted(set(s) & set(acc[tag]))
            return _rho([s[d] for d in common], [acc[tag][d] for d in common])

        entry["spearman"] = {
            "seed0_vs_seed1_at32": rho("family32", "family32_seed1"),
            "size32_vs_size64": rho("family32", "family64"),
            "seed0_vs_seed1_at64": rho("family64", "family64_seed1"),
            "family_vs_foreign_students": rho("family32", "foreign32"),
            "predictor_family_vs_family32": rho_pred("family", "family32"),
            "predictor_family_vs_family64": rho_pred("family", "family64"),
            "predictor_proxy_vs_foreign32": rho_pred("proxy", "foreign32"),
            "predictor_family_vs_foreign32": rho_pred("family", "foreign32"),
        }
        if "family" in sc and "family32" in acc:
            m = dict(zip(sc["family"]["digests"], sc["family"]["meta_acc32"]))
            common = sorted(set(m) & set(acc["family32"]))
            entry["spearman"]["metadataset_vs_family32"] = _rho([m[d] for d in common],
                                                                [acc["family32"][d] for d in common])
        for tag in ("family64", "family64_seed1"):
            if tag in acc and "family32" in acc:
                common = sorted(set(acc[tag]) & set(acc["family32"]))
                entry.setdefault("gain_64_minus_32", {})[tag] = float(
                    np.mean([acc[tag][d] - acc["family32"][d] for d in common]))
        res["tasks"][t] = entry
    res["kd_wall_s"] = float(sum(r.get("wall_s", 0.0) for r in rows))
    (out / "summary.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["| task | quantity | Spearman [90% bootstrap] | n |", "|---|---|---|---|"]
    for t, e in res["tasks"].items():
        for k, v in e["spearman"].items():
            if v is not None:
                lines.append(f"| {t} | {k} | {v['spearman']:.2f} [{v['ci90'][0]:.2f}, {v['ci90'][1]:.2f}] | {v['n']} |")
    lines += ["", "| task | teachers (val acc) | mean student acc |", "|---|---|---|"]
    for t, e in res["tasks"].items():
        lines.append(f"| {t} | " + ", ".join(f"{k} {v:.3f}" for k, v in e["teachers"].items()) + " | "
                     + ", ".join(f"{k} {v:.3f}" for k, v in e["mean_acc"].items()) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="train-tiny_imagenet50-s46-000,train-flowers5-s51-000",
                    help="comma-separated meta-dataset task ids (sources of at least 64 px)")
    ap.add_argument("--phases", default=",".join(PHASES[:4]), help=f"comma-separated, in order: {', '.join(PHASES)}")
    ap.add_argument("--output", default=str(ROOT / "artifacts/transfer"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared/datasets"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary", action="store_true", help="only write summary.json / summary.md from the rows")
    args = ap.parse_args(argv)
    out = Path(args.output)
    if args.summary:
        print(json.dumps(summary(out)))
        return 0
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(out / "rows.jsonl")
    t0 = time.time()
    ver = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True).stdout
    cache: dict = {}
    tasks = [t for t in args.tasks.split(",") if t]
    for ph in [p for p in args.phases.split(",") if p]:  # phase by phase over the tasks: early rows for both
        for t in tasks:
            run_task(t, [ph], rows, out, Path(args.data_root), cache)
    man = out / "manifest.json"
    sessions = json.loads(man.read_text())["sessions"] if man.exists() else []
    sessions.append({"command": " ".join(["python scripts/measure_transfer.py", *sys.argv[1:]]),
                     "code_version": ver.strip(), "wall_s": round(time.time() - t0), "threads": args.threads,
                     "host": platform.node(), "torch": torch.__version__})
    man.write_text(json.dumps({"sessions": sessions}, indent=1) + "\n")
    print(json.dumps(summary(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
