#!/usr/bin/env python
"""KD throughput: the same students on the same data, with cached teacher logits vs the teacher in the loop.

Also the KD step's achieved compute rate on the cached path: each training image costs ~3x the student's forward
FLOPs (forward + backward for activations and weights) and each validation image once per epoch, counted from the
space's analytic forward FLOPs (2 x MAC); `kd_ratio` = that rate / the dense fp32 matmul peak measured in the same
process on the same device (best of a few 2048^3 matmuls on the CPU, 8192^3 on a GPU, before and after the timed
passes).

`--device cuda` runs it all on a GPU (`auto`: a GPU when torch sees one); `--space paper` uses the authors' 64x64,
width x2 space instead of ours (the scale a GPU is for); `--batch-size` overrides the KD recipe's 64.

`--image-size 32,64,96` adds a table per image size (the students distilled at that size from the teacher's
32-px soft labels, as `--image-size` searches do) for each `--variants` entry: fp32 (today's step), channels_last,
bf16 (autocast), channels_last+bf16, compile (torch.compile): images/s, achieved GFLOP/s and its ratio to the
matmul peak, and the students' mean validation accuracy next to fp32's (a speedup must not change accuracy).

Last line: one JSON object with cached_img_per_s, naive_img_per_s, speedup, kd_achieved_gflops,
matmul_peak_gflops, kd_ratio and the setup (device, space, batch size); with --image-size also `sizes`:
{size: {variant: {img_per_s, gflops, ratio, mean_acc, speedup_vs_fp32}}}.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from dass_ray.core.config import get_scale
from dass_ray.core.data import bundled_path, load_dataset
from dass_ray.core.tasks import load_task_data, make_class_subset_tasks
from dass_ray.core.kd import TensorData, compute_soft_labels, resolve_device, train_kd
from dass_ray.core.nets import build
from dass_ray.core.space import get_space

from bench_scoring import matmul_peak_gflops  # noqa: E402  (benchmarks/ is the script's directory)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    ap.add_argument("--space", default="cpu", choices=["cpu", "paper"])
    ap.add_argument("--batch-size", type=int, default=None, help="KD batch size (default: the recipe's)")
    ap.add_argument("--image-size", default="", help="comma-separated sizes for the per-size table, e.g. 32,64,96")
    ap.add_argument("--variants", default="fp32,channels_last,bf16,channels_last+bf16",
                    help="training-step variants of the per-size table (also: compile)")
    ap.add_argument("--dataset", default="mnist5k", help="bundled name or Parquet path (default mnist5k; a "
                    "source of >= 64 px such as tiny_imagenet50/train.parquet shows real detail at 64 px)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as e:
        ap.error(f"--device {args.device}: {e}")
    from pathlib import Path

    from dass_ray.core.data import resolve_dataset_path, shared_datasets_root

    if Path(args.dataset).exists() or "/" in args.dataset:
        ds = load_dataset(resolve_dataset_path(args.dataset, shared_datasets_root()))
    else:
        ds = load_dataset(bundled_path(args.dataset))
    task = make_class_subset_tasks(ds, source="bench", path=args.dataset, num_tasks=1, classes_per_task=5,
                                   train_per_class=args.train_per_class, val_per_class=20, seed=args.seed,
                                   prefix="bench")[0]
    tr, va = load_task_data(task, ds)
    data = TensorData.from_datasets(tr, va, get_space(args.space).image_size)
    space = get_space(args.space, data.num_classes)
    teacher = build(space.teacher(), space, seed=args.seed).eval()  # weights do not change the cost
    sd = teacher.state_dict()
    kd = get_scale("cpu").kd
    cfg = kd.__class__(**{**kd.to_dict(), "epochs": args.epochs, "batch_size": args.batch_size or kd.batch_size})
    archs = space.sample_many(np.random.default_rng(args.seed), args.students)
    n_img = len(data.y_train) * args.epochs * len(archs)
    peak = matmul_peak_gflops(device=str(device))
    t0 = time.perf_counter()
    soft = compute_soft_labels(teacher, data.x_train, views=2 if cfg.flip else 1, device=device)
    t_soft = time.perf_counter() - t0
    timings = {}
    for mode in ("naive", "cached"):  # interleaving would not change much; both see the same machine state
        t0 = time.perf_counter()
        for a in archs:
            if mode == "cached":
                r = train_kd(a, space, sd, data, cfg, seed=args.seed, soft=soft, device=device)
            else:
                r = train_kd(a, space, sd, data, cfg, seed=args.seed, teacher=teacher, device=device)
            assert r.ok, r.reason
        timings[mode] = time.perf_counter() - t0
    peak = max(peak, matmul_peak_gflops(device=str(device)))
    cached_total = timings["cached"] + t_soft  # the one-off teacher pass is charged to the cached path
    kd_flops = sum(args.epochs * (3 * len(data.y_train) + len(data.y_val)) * space.flops(a) for a in archs)
    out = {
        "cached_img_per_s": round(n_img / cached_total, 1),
        "naive_img_per_s": round(n_img / timings["naive"], 1),
        "speedup": round(timings["naive"] / cached_total, 3),
        "kd_achieved_gflops": round(kd_flops / timings["cached"] / 1e9, 2),
        "matmul_peak_gflops": round(peak, 1),
        "kd_ratio": round(kd_flops / timings["cached"] / 1e9 / peak, 4),
        "soft_label_s": round(t_soft, 3), "students": len(archs), "images_per_student": len(data.y_train) * args.epochs,
        "threads": args.threads, "device": str(device), "space": args.space, "batch_size": cfg.batch_size,
        "image_size": space.image_size, "teacher_mflops": round(space.flops(space.teacher()) / 1e6, 1),
        "mean_student_mflops": round(float(np.mean([space.flops(a) for a in archs])) / 1e6, 1),
    }
    if args.image_size:
        out["sizes"] = per_size(args, ds, task, space, teacher, soft, archs, cfg, device, peak)
        out["matmul_peak_gflops"] = round(max(peak, matmul_peak_gflops(device=str(device))), 1)
    print(json.dumps(out))
    return 0


def per_size(args, ds, task, space, teacher, soft, archs, cfg, device, peak) -> dict:
    """Per image size and variant: KD images/s, achieved GFLOP/s (FLOPs counted at that size), mean accuracy."""
    import dataclasses

    from dass_ray.core.tasks import load_task_data

    tr, va = load_task_data(task, ds)
    sizes = [int(v) for v in args.image_size.split(",") if v]
    variants = [v for v in args.variants.split(",") if v]
    table: dict = {}
    for size in sizes:
        data = TensorData.from_datasets(tr, va, size)
        at = dataclasses.replace(space, image_size=size)  # the analytic FLOPs at that size
        flops = sum(args.epochs * (3 * len(data.y_train) + len(data.y_val)) * at.flops(a) for a in archs)
        row = {}
        for v in variants:
            kw = {"channels_last": "channels_last" in v, "bf16": "bf16" in v, "compile": v == "compile"}
            c = dataclasses.replace(cfg, **kw)
            if v == "compile":  # the first epoch compiles: one untimed warm-up run per student shape
                train_kd(archs[0], space, teacher.state_dict(), data, dataclasses.replace(c, epochs=1),
                         seed=args.seed, soft=soft, device=device)
            t0 = time.perf_counter()
            accs = []
            for a in archs:
                r = train_kd(a, space, teacher.state_dict(), data, c, seed=args.seed, soft=soft, device=device)
                assert r.ok, r.reason
                accs.append(r.best_acc)
            dt = time.perf_counter() - t0
            n_img = len(data.y_train) * args.epochs * len(archs)
            row[v] = {"img_per_s": round(n_img / dt, 1), "gflops": round(flops / dt / 1e9, 2),
                      "ratio": round(flops / dt / 1e9 / peak, 4), "mean_acc": round(float(np.mean(accs)), 4)}
            print(f"size {size} {v}: {row[v]}", flush=True)
        base = row.get("fp32")
        for v in row:
            if base:
                row[v]["speedup_vs_fp32"] = round(row[v]["img_per_s"] / base["img_per_s"], 3)
        table[str(size)] = row
    return table


if __name__ == "__main__":
    raise SystemExit(main())
