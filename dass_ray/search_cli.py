"""`scripts/search.py` / `dass-ray search`: find the student that distills best from a teacher on a dataset."""

from __future__ import annotations

import argparse
import json
import sys

from dass_ray.search import DEFAULT_PREDICTOR, DEFAULT_TEACHER, InputError, SearchConfig


def parser() -> argparse.ArgumentParser:
    d = SearchConfig()
    ap = argparse.ArgumentParser(
        prog="search.py", description="DaSS search: score many candidate students with the meta-trained predictor "
        "(adapted on the teacher), then distil only the top-K and return the best measured one.")
    ap.add_argument("--dataset", default=d.dataset, help="Parquet file (image/label/label_name columns), ImageFolder "
                    "directory, .npz (images, labels[, class_names]) or a bundled name (default: %(default)s)")
    ap.add_argument("--teacher", default=d.teacher, help="teacher checkpoint (scripts/train_teacher.py), or 'train' to "
                    "train one on the dataset first (default: the shipped MNIST teacher)")
    ap.add_argument("--predictor", default=d.predictor, help="meta-trained predictor checkpoint (default: shipped)")
    ap.add_argument("--max-flops", type=float, default=None, help="budget: max FLOPs per image (multiply-add = 2)")
    ap.add_argument("--max-params", type=float, default=None, help="budget: max trainable parameters")
    ap.add_argument("--candidates", type=int, default=d.candidates, help="candidates sampled and scored (N)")
    ap.add_argument("--top-k", type=int, default=d.top_k, help="top-predicted candidates really distilled (K <= N)")
    ap.add_argument("--kd-epochs", type=int, default=None, help="KD epochs per trial (default: the scale's)")
    ap.add_argument("--encoders", type=int, default=d.encoders, help="encoder actors (E) embedding candidates")
    ap.add_argument("--predictors", type=int, default=d.predictors, help="predictor replicas (P); GPU when present")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="candidates per encoder call")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of sampling, data split and KD")
    ap.add_argument("--output", default=d.output, help="output directory (default: %(default)s)")
    ap.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    ap.add_argument("--scale", default=d.scale, help="training scale: cpu (default) or tiny (tests)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted search in --output")
    ap.add_argument("--readapt", action="store_true", help="re-adapt the predictor on teacher + measured students "
                    "after each KD trial and re-rank the remaining candidates")
    ap.add_argument("--asha", action="store_true", help="ASHA early stopping of weak KD trials")
    ap.add_argument("--max-concurrent", type=int, default=None, help="KD trials at once (default: the CPUs the cluster has or can autoscale to)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray instance (default: all)")
    ap.add_argument("--storage", default=None,
                    help="where KD-trial checkpoints go: on a multi-node cluster a directory every node mounts "
                         "(NFS/EFS) or a URI (s3://bucket/prefix, gs://...); default $DASS_RAY_STORAGE, else "
                         "<output>/tune (one machine only)")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    cfg = SearchConfig(dataset=args.dataset, teacher=args.teacher, output=args.output, predictor=args.predictor,
                       max_flops=args.max_flops, max_params=args.max_params, candidates=args.candidates,
                       top_k=args.top_k, kd_epochs=args.kd_epochs, encoders=args.encoders,
                       predictors=args.predictors, batch_size=args.batch_size, seed=args.seed, address=args.address,
                       scale=args.scale, resume=args.resume, readapt=args.readapt, asha=args.asha,
                       max_concurrent=args.max_concurrent, storage=args.storage)
    from dass_ray.search import SearchRun, prepare

    try:
        prep = prepare(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from dass_ray.rayutil import init_ray

    init_ray(cfg.address, args.num_cpus)
    try:
        result = SearchRun(prep).run()
    except Exception as e:
        print(f"error: search failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:  # disconnect (and stop a local Ray) before the interpreter exits, not from its atexit hooks
        import ray

        ray.shutdown()
    b = result["best"]
    print(json.dumps({"output": cfg.output, "best_measured_acc": b["measured_acc"], "best_predicted_acc":
                      b["predicted_acc"], "flops": b["flops"], "params": b["params"],
                      "teacher_acc": result["teacher_acc"], "timings": result["timings"]}))
    return 0
