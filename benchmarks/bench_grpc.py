#!/usr/bin/env python
"""Load on the gRPC front door: many concurrent clients doing GetJob / ListJobs / WatchJob against a real
`dass-ray serve` subprocess on loopback, plus a burst of SubmitSearch with dry-run jobs (validated and recorded,
no search is started). Bounded: a fixed number of clients and requests, and a time limit.

Last line: one JSON object with rps, p50_ms, p99_ms, errors, jobs_submitted, jobs_recorded (the last two must
be equal: every acknowledged submit is in the server's job table, and no retry made a second job).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

from dass_ray.service.client import ClientError, SearchClient
from dass_ray.core.data import bundled_path
from dass_ray.v1 import search_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "dass_ray" / "assets" / "teachers" / "mnist5k_cpu.pt"


def start_server(state: Path, token_file: Path, workers: int) -> tuple[subprocess.Popen, int, float]:
    """The server process, its port, and the seconds from launch until its health check answered SERVING."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "dass_ray.service.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--state-dir",
           str(state), "--token-file", str(token_file), "--workers", str(workers), "--max-queued", "100000", "--max-queued-total", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(state.parent / "server.log", "wb"), text=True,
                         cwd=str(ROOT))
    line = p.stdout.readline()
    m = re.search(r"on port (\d+)", line)
    if not m:
        p.kill()
        raise SystemExit(f"server did not start: {line!r}; see {state.parent / 'server.log'}")
    port = int(m.group(1))
    with SearchClient(f"127.0.0.1:{port}", "-", timeout=2) as c:
        while True:
            try:
                if c.health() == "SERVING":
                    return p, port, time.perf_counter() - t0
            except ClientError:
                time.sleep(0.05)


def server_memory(pid: int) -> tuple[float, bool]:
    """(resident MB, whether libtorch or a Ray library is mapped) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    maps = Path(f"/proc/{pid}/maps").read_text()
    return rss, ("libtorch" in maps or "_raylet" in maps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=16, help="concurrent reading clients")
    ap.add_argument("--requests", type=int, default=6000, help="total read requests (GetJob/ListJobs/WatchJob)")
    ap.add_argument("--submits", type=int, default=200, help="dry-run SubmitSearch calls in the burst")
    ap.add_argument("--submitters", type=int, default=8, help="concurrent submitting clients")
    ap.add_argument("--duration", type=float, default=60.0, help="time limit, seconds")
    ap.add_argument("--workers", type=int, default=64, help="server threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the server's state directory")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    token = secrets.token_hex(16)
    (work / "tokens").write_text(f"bench {token}\n")
    proc, port, ready_s = start_server(work / "state", work / "tokens", args.workers)
    target = f"127.0.0.1:{port}"
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    submitted: set[str] = set()
    deadline = time.monotonic() + args.duration

    def timed(fn):
        t0 = time.perf_counter()
        try:
            fn()
            ok = True
        except (ClientError, grpc.RpcError):
            ok = False
        dt = time.perf_counter() - t0
        with lock:
            if ok:
                lat.append(dt)
            else:
                errors[0] += 1
        return ok

    try:
        with SearchClient(target, token) as c:  # a few finished jobs to read and watch
            seed_jobs = [c.submit(dataset_path=str(bundled_path("mnist5k")), teacher_path=str(TEACHER),
                                  dry_run=True, scale="tiny").job_id for _ in range(4)]
            for j in seed_jobs:
                c.wait(j, timeout_s=60)
        base = len(seed_jobs)

        def submitter(k: int, n: int):
            with SearchClient(target, token) as c:
                for i in range(n):
                    if time.monotonic() > deadline:
                        return
                    rid = f"burst-{k}-{i}"

                    def go():
                        job = c.submit(dataset_path=str(bundled_path("mnist5k")), teacher_path=str(TEACHER),
                                       dry_run=True, scale="tiny", candidates=50, top_k=2, request_id=rid)
                        with lock:
                            submitted.add(job.job_id)

                    timed(go)

        per_reader = args.requests // args.clients

        def reader(k: int):
            rng = random.Random(args.seed + k)
            with SearchClient(target, token) as c:
                for _ in range(per_reader):
                    if time.monotonic() > deadline:
                        return
                    op = rng.choice(("get", "list", "watch"))
                    j = rng.choice(seed_jobs)
                    if op == "get":
                        timed(lambda: c.get_job(j))
                    elif op == "list":
                        timed(lambda: c._call(c.stub.ListJobs, pb.ListJobsRequest(page_size=20)))
                    else:
                        timed(lambda: list(c.watch(j, reconnect=False)))

        per_sub = [args.submits // args.submitters + (1 if i < args.submits % args.submitters else 0)
                   for i in range(args.submitters)]
        threads = [threading.Thread(target=reader, args=(k,)) for k in range(args.clients)]
        threads += [threading.Thread(target=submitter, args=(k, n)) for k, n in enumerate(per_sub)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)  # let the runner finish the dry runs
        with SearchClient(target, token) as c:  # one real upload: decoded by a check worker, not the server
            c.upload_dataset(bundled_path("mnist5k"))
        rss_mb, heavy = server_memory(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    con = sqlite3.connect(work / "state" / "jobs.sqlite")
    recorded = con.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] - base
    con.close()
    lat.sort()

    def pct(q):
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None

    n = len(lat) + errors[0]
    print(f"{n} requests from {args.clients} readers + {args.submitters} submitters in {wall:.1f}s"
          + (f"; state in {work}" if args.keep else ""), file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"rps": round(len(lat) / wall, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
                      "errors": errors[0], "jobs_submitted": len(submitted), "jobs_recorded": recorded,
                      "requests": n, "clients": args.clients, "submitters": args.submitters,
                      "duration_s": round(wall, 2), "cpus": os.cpu_count(), "serving_after_s": round(ready_s, 2),
                      "server_rss_mb": round(rss_mb, 1), "server_loads_torch_or_ray": heavy}))
    return 0 if errors[0] == 0 and len(submitted) == recorded else 1


if __name__ == "__main__":
    raise SystemExit(main())
