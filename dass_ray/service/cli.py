"""`dass-ray`: run the search service, or talk to one.

    dass-ray serve  --port 50051 --state-dir state/ --token-file tokens.txt [--address http://HEAD:8265]
    dass-ray submit --server HOST:PORT --token-file my.token --dataset data.parquet [--teacher t.pt] [--watch]
    dass-ray jobs | watch ID | result ID [--download DIR] | cancel ID
    dass-ray retrain [--watch] | predictors   # your predictor, retrained on your own search history
    dass-ray search ...            # the search itself, in this process (same flags as scripts/search.py)

Client commands read --server / --token-file from $DASS_RAY_SERVER / $DASS_RAY_TOKEN_FILE when not given
($DASS_RAY_TOKEN may hold the token itself). Errors are one line on stderr; the exit code is 1 (2 for usage).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from dass_ray._deps import CLIENT, FULL, require
from dass_ray.contract import Caps, add_request_arguments, knobs_from_args


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=os.environ.get("DASS_RAY_SERVER", "localhost:50051"),
                   help="HOST:PORT of the service (default $DASS_RAY_SERVER or localhost:50051)")
    p.add_argument("--token-file", default=os.environ.get("DASS_RAY_TOKEN_FILE"),
                   help="file with your token (or a 'client-name token' line); default $DASS_RAY_TOKEN_FILE")
    p.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (turns on TLS)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds (default 60)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dass-ray", description="Distillation-aware student search as a service.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the gRPC search service")
    s.add_argument("--port", type=int, default=50051, help="TCP port (0: pick a free one)")
    s.add_argument("--host", default="[::]", help="interface to bind (default all)")
    s.add_argument("--state-dir", required=True, help="job table, event log, uploads and results live here")
    s.add_argument("--token-file", required=True, help="one 'client-name token' pair per line")
    s.add_argument("--address", help="dashboard address of the Ray cluster the searches run on "
                   "(http://HEAD:8265); default: one local Ray head, started on the first search and kept for "
                   "the next server")
    s.add_argument("--ray-num-cpus", type=int, help="CPUs of that local head (default: all)")
    s.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--max-running", type=int, default=1, help="searches run at once; the rest queue (default 1)")
    s.add_argument("--max-running-per-client", type=int, default=0,
                   help="jobs of one client run at once (default 0: up to --max-running); a freed slot goes to "
                        "the client with the fewest running jobs")
    s.add_argument("--max-queued", type=int, default=100,
                   help="queued jobs of one client before its submits answer RESOURCE_EXHAUSTED (default 100)")
    s.add_argument("--max-queued-total", type=int, default=1000,
                   help="queued jobs of all clients together before RESOURCE_EXHAUSTED (default 1000)")
    s.add_argument("--max-upload-mb", type=float, default=512.0, help="largest upload, MiB (default 512)")
    s.add_argument("--workers", type=int, default=64, help="server threads (default 64)")
    s.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown")
    s.add_argument("--data-root", action="append", default=None,
                   help="directory clients may name by path (repeatable; default: bundled data and "
                        "../shared/datasets)")
    s.add_argument("--search-cmd", help="command that runs one search (default: python scripts/search.py)")
    s.add_argument("--encoders", type=int, help="encoder actors of a search that does not ask for a number")
    s.add_argument("--predictors", type=int, help="predictor replicas of a search that does not ask for a number")
    what = {"max_candidates": "candidates scored", "max_top_k": "students distilled (top_k)",
            "max_kd_epochs": "KD epochs per student", "max_concurrent": "KD trials at once (max_concurrent)",
            "max_encoders": "encoder actors", "max_predictors": "predictor replicas",
            "max_batch_size": "candidates per encoder call"}
    for f in dataclasses.fields(Caps):  # per-search limits: over one, a submit answers RESOURCE_EXHAUSTED
        s.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                       help=f"most {what[f.name]} one search may ask for (default {f.default})")
    s.add_argument("--no-history", action="store_true", help="keep no per-client search history (searches do "
                   "not record their students; RetrainPredictor is refused)")
    s.add_argument("-v", "--verbose", action="store_true")

    s = sub.add_parser("submit", help="upload a dataset (and teacher) and queue a search")
    _add_client_flags(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", help="local .parquet/.npz file to upload")
    g.add_argument("--dataset-id", help="an id answered by an earlier upload")
    g.add_argument("--dataset-path", help="absolute path the cluster can read (under the server's data roots)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--teacher", help="local teacher checkpoint to upload (default: the service trains one)")
    g.add_argument("--teacher-id", help="an id answered by an earlier upload")
    g.add_argument("--teacher-path", help="absolute path the cluster can read")
    add_request_arguments(s, service=True)  # every per-search knob of the contract
    s.add_argument("--request-id", help="idempotency key (default: a fresh one)")
    s.add_argument("--dry-run", action="store_true", help="validate and record only")
    s.add_argument("--watch", action="store_true", help="show progress until the job ends")

    s = sub.add_parser("jobs", help="list your jobs, newest first")
    _add_client_flags(s)
    s.add_argument("--state", action="append", default=[], help="only this state (repeatable)")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("watch", help="follow a job's progress until it ends")
    _add_client_flags(s)
    s.add_argument("job_id")
    s.add_argument("--from-sequence", type=int, default=0)

    s = sub.add_parser("result", help="show the best student of a finished job")
    _add_client_flags(s)
    s.add_argument("job_id")
    s.add_argument("--download", metavar="DIR", help="also download every artifact into DIR")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("cancel", help="cancel a queued or running job")
    _add_client_flags(s)
    s.add_argument("job_id")
    s.add_argument("--no-wait", action="store_true", help="do not wait for the job to stop")

    s = sub.add_parser("retrain", help="retrain your predictor on your own search history (then submit with "
                       "--predictor latest)")
    _add_client_flags(s)
    s.add_argument("--episodes", type=int, default=0, help="meta-training episodes (default: the server's, 100)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--request-id", help="idempotency key (default: a fresh one)")
    s.add_argument("--watch", action="store_true", help="show progress until the job ends")

    s = sub.add_parser("predictors", help="your retrained predictor versions, newest first")
    _add_client_flags(s)
    s.add_argument("--json", action="store_true")

    sub.add_parser("search", help="run one search here (scripts/search.py's flags)", add_help=False)
    return ap


# ----------------------------------------------------------------------------------------------------------------


def _serve(a) -> int:
    from dass_ray.service.server import ServerConfig, default_data_roots, serve

    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dass_ray").setLevel(logging.INFO)
    defaults = {k: getattr(a, k) for k in ("encoders", "predictors") if getattr(a, k)}
    caps = Caps(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Caps)})
    import shlex

    cfg = ServerConfig(state_dir=Path(a.state_dir), token_file=Path(a.token_file), port=a.port, host=a.host,
                       address=a.address, ray_num_cpus=a.ray_num_cpus, tls_cert=a.tls_cert and Path(a.tls_cert),
                       tls_key=a.tls_key and Path(a.tls_key), max_running=a.max_running, max_queued=a.max_queued,
                       max_running_per_client=a.max_running_per_client, max_queued_total=a.max_queued_total,
                       max_upload_bytes=int(a.max_upload_mb * (1 << 20)), workers=a.workers, grace_s=a.grace,
                       data_roots=[Path(d) for d in a.data_root] if a.data_root else default_data_roots(),
                       search_cmd=shlex.split(a.search_cmd) if a.search_cmd else None, search_defaults=defaults,
                       caps=caps, history=not a.no_history)
    try:
        return serve(cfg)
    except (OSError, ValueError) as e:
        print(f"dass-ray serve: {e}", file=sys.stderr)
        return 1


def _client(a):
    from dass_ray.service.client import ClientError, SearchClient, read_token

    if a.token_file:
        token = read_token(a.token_file)
    elif os.environ.get("DASS_RAY_TOKEN"):
        token = os.environ["DASS_RAY_TOKEN"].strip()
    else:
        raise ClientError("no token: pass --token-file or set DASS_RAY_TOKEN_FILE / DASS_RAY_TOKEN")
    return SearchClient(a.server, token, tls=a.tls, tls_ca=a.tls_ca, timeout=a.timeout)


def _fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _follow(c, job_id: str, from_sequence: int = 0, result_hint: str | None = None) -> int:
    """Print progress until the job ends; 0 if it succeeded, 1 otherwise."""
    from dass_ray.service.client import state_name

    try:  # a progress bar on a terminal, when tqdm is there (the slim client install does without)
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    tty = sys.stderr.isatty() and tqdm is not None
    bar, bar_stage, last = None, None, None
    for ev in c.watch(job_id, from_sequence):
        last = ev
        if tty:
            if ev.stage != bar_stage:
                if bar is not None:
                    bar.close()
                bar, bar_stage = tqdm(total=ev.total or None, desc=f"{job_id} {ev.stage}", file=sys.stderr,
                                      dynamic_ncols=True, leave=True), ev.stage
            if ev.total:
                bar.total = ev.total
                bar.n = ev.done
            bar.set_postfix_str(ev.message[:60])
            bar.refresh()
        else:
            prog = f" {ev.done}/{ev.total}" if ev.total else ""
            print(f"[{ev.sequence}] {ev.stage}{prog} {ev.message}".rstrip(), file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    job = c.get_job(job_id)
    st = state_name(job.state)
    if st == "SUCCEEDED":
        from dass_ray.v1 import search_pb2 as pb

        hint = result_hint or ("dass-ray predictors" if job.kind == pb.JOB_KIND_RETRAIN else f"dass-ray result {job_id}")
        print(f"job {job_id} succeeded: {hint}")
        return 0
    reason = job.error or (last.message if last else "")
    print(f"dass-ray: job {job_id} {st.lower()}: {reason}", file=sys.stderr)
    return 1


def _submit(a) -> int:
    from dass_ray.service.client import ClientError, state_name

    with _client(a) as c:
        kw = {}
        if a.dataset:
            if not Path(a.dataset).is_file():
                raise ClientError(f"--dataset {a.dataset}: no such file")
            info = c.upload_dataset(a.dataset)
            print(f"dataset {info.dataset_id}: {info.num_images} images, {info.num_classes} classes, "
                  f"{info.image_height}x{info.image_width}", file=sys.stderr)
            kw["dataset_id"] = info.dataset_id
        elif a.dataset_id:
            kw["dataset_id"] = a.dataset_id
        else:
            kw["dataset_path"] = a.dataset_path
        if a.teacher:
            if not Path(a.teacher).is_file():
                raise ClientError(f"--teacher {a.teacher}: no such file")
            t = c.upload_teacher(a.teacher)
            print(f"teacher {t.teacher_id}: {t.num_classes} classes, val acc {t.val_acc:.3f}", file=sys.stderr)
            kw["teacher_id"] = t.teacher_id
        elif a.teacher_id:
            kw["teacher_id"] = a.teacher_id
        elif a.teacher_path:
            kw["teacher_path"] = a.teacher_path
        else:
            kw["train_teacher"] = True
        job = c.submit(**kw, **knobs_from_args(a), dry_run=a.dry_run, request_id=a.request_id)
        print(job.job_id)
        if not a.watch:
            print(f"job {job.job_id} {state_name(job.state).lower()}; follow it with: dass-ray watch {job.job_id}",
                  file=sys.stderr)
            return 0
        return _follow(c, job.job_id)


def _jobs(a) -> int:
    from dass_ray.service.client import state_name
    from google.protobuf.json_format import MessageToDict

    with _client(a) as c:
        jobs = list(c.list_jobs(states=tuple(a.state), limit=a.limit))
        if a.json:
            print(json.dumps([MessageToDict(j, preserving_proto_field_name=True) for j in jobs], indent=1))
            return 0
        print(f"{'JOB':12}  {'STATE':9}  {'STAGE':9}  {'PROGRESS':>9}  {'CREATED':19}  MESSAGE")
        for j in jobs:
            prog = f"{j.done}/{j.total}" if j.total else ""
            msg = j.error or j.message
            print(f"{j.job_id:12}  {state_name(j.state):9}  {j.stage[:9]:9}  {prog:>9}  "
                  f"{_fmt_time(j.created_unix_s):19}  {msg[:60]}")
        return 0


def _result(a) -> int:
    from dass_ray.service.client import ARTIFACTS

    with _client(a) as c:
        r = c.result(a.job_id)
        if a.json:
            print(r.result_json)
        else:
            b = r.best
            print(f"job {r.job_id}: best student {b.arch_json}")
            print(f"  measured acc {b.measured_acc:.4f}  predicted {b.predicted_acc:.4f}  teacher "
                  f"{r.teacher_acc:.4f}")
            print(f"  {b.flops:,} FLOPs  {b.params:,} params  ({r.candidates} candidates scored, "
                  f"{r.top_k} distilled)")
            if r.timings_s:
                print("  timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in r.timings_s.items()))
            print("  artifacts: " + ", ".join(f"{x.filename} ({x.size_bytes:,} B)" for x in r.artifacts))
        if a.download:
            names = {v: k for k, v in ARTIFACTS.items()}
            for art in r.artifacts:
                path = c.download(a.job_id, names[art.kind], a.download)
                print(f"downloaded {path}", file=sys.stderr)
        return 0


def _retrain(a) -> int:
    from dass_ray.service.client import state_name

    with _client(a) as c:
        job = c.retrain(episodes=a.episodes, seed=a.seed, request_id=a.request_id)
        print(job.job_id)
        if not a.watch:
            print(f"retrain job {job.job_id} {state_name(job.state).lower()}; follow it with: dass-ray watch "
                  f"{job.job_id}; then: dass-ray predictors", file=sys.stderr)
            return 0
        rc = _follow(c, job.job_id, result_hint="dass-ray predictors")
        if rc == 0:
            _print_versions(c.predictors()[:1])
        return rc


def _print_versions(versions) -> None:
    def f(v, name):
        return f"{getattr(v, name):.3f}" if v.HasField(name) else "n/a"

    print(f"{'VERSION':8}  {'PARENT':8}  {'LATEST':6}  {'VAL BEFORE':>10}  {'VAL AFTER':>9}  {'HISTORY':>16}  CREATED")
    for v in versions:
        print(f"{v.version:8}  {v.parent_version:8}  {'yes' if v.latest else '':6}  "
              f"{f(v, 'val_spearman_before'):>10}  {f(v, 'val_spearman_after'):>9}  "
              f"{f'{v.history_tasks} tasks/{v.history_students}':>16}  {_fmt_time(v.created_unix_s)}")


def _predictors(a) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(a) as c:
        versions = c.predictors()
        if a.json:
            print(json.dumps([MessageToDict(v, preserving_proto_field_name=True) for v in versions], indent=1))
        elif not versions:
            print("no retrained predictor yet: searches use the shipped one (dass-ray retrain makes one from your "
                  "search history)", file=sys.stderr)
        else:
            _print_versions(versions)
        return 0


def _cancel(a) -> int:
    from dass_ray.service.client import TERMINAL, state_name

    with _client(a) as c:
        job = c.cancel(a.job_id)
        if not a.no_wait and job.state not in TERMINAL:
            job = c.wait(a.job_id, timeout_s=120)
        print(f"job {job.job_id} {state_name(job.state).lower()}"
              + (" (stopping)" if job.cancel_requested and state_name(job.state) == "RUNNING" else ""))
        return 0 if state_name(job.state) == "CANCELLED" or job.cancel_requested else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "search":  # everything after it belongs to the search's own parser
        require(*FULL, "dass_ray.search", what="dass-ray search")
        from dass_ray.search import cli as search_cli

        return search_cli.main(argv[1:])
    a = _parser().parse_args(argv)
    if a.cmd == "serve":
        require("dass_ray.service.server", *CLIENT, what="dass-ray serve")
        return _serve(a)
    require(*CLIENT, what=f"dass-ray {a.cmd}")
    from dass_ray.service.client import ClientError

    try:
        return {"submit": _submit, "jobs": _jobs, "watch": lambda a: _follow_cmd(a), "result": _result,
                "cancel": _cancel, "retrain": _retrain, "predictors": _predictors}[a.cmd](a)
    except ClientError as e:
        print(f"dass-ray: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _follow_cmd(a) -> int:
    with _client(a) as c:
        c.get_job(a.job_id)  # a clear NOT_FOUND before streaming
        return _follow(c, a.job_id, a.from_sequence)


if __name__ == "__main__":
    raise SystemExit(main())
