"""One local Ray head for a server started without `--address`: every search runs as a Ray Job on it, so there
is one backend and no per-search Ray start-up. The head is started (with the `ray` CLI, in its own process) on
the first search, not when the server starts, and is left running when the server stops: like the searches on
it, it is re-attached by the next server on the same state directory. When it is gone (the machine rebooted,
someone ran `ray stop`), the next call starts a new one; the runner then resumes the lost searches on it."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from dass_ray.service.jobs.backends import RayJobsAPI, RayJobsError

log = logging.getLogger("dass_ray.jobs")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalRayHead:
    """`address()` answers the dashboard address of a running head, starting one first when needed."""

    def __init__(self, state_dir: str | Path, num_cpus: int | None = None, start_timeout_s: float = 120.0):
        self.info_file = Path(state_dir) / "ray_head.json"
        self.log_file = Path(state_dir) / "ray_head.log"
        self.num_cpus = num_cpus
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()

    def _alive(self, address: str) -> bool:
        try:
            RayJobsAPI(address, timeout_s=3).version()
            return True
        except RayJobsError as e:
            return e.status != 0  # it answered (e.g. 401 without a token): it is up

    def address(self) -> str:
        with self._lock:
            if self.info_file.is_file():
                try:
                    addr = json.loads(self.info_file.read_text())["dashboard"]
                except (ValueError, KeyError):
                    addr = ""
                if addr and self._alive(addr):
                    return addr
            return self._start()

    def _start(self) -> str:
        # Every port its own free one, on the loopback address: Ray's defaults (the dashboard agent's 52365, ...)
        # may be held by another Ray on this machine, and a head whose agent cannot bind accepts no job.
        gcs, dash, *rest = _free_ports(9)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}",
               f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--disable-usage-stats"]
        cmd += [f"--{flag}={port}" for flag, port in zip(
            ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port"), rest)]
        if self.num_cpus:
            cmd.append(f"--num-cpus={self.num_cpus}")
        log.info("starting a local Ray head for the searches: %s", " ".join(cmd))
        t0 = time.monotonic()
        with open(self.log_file, "ab") as out:
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"), timeout=self.start_timeout_s)
        if rc != 0:
            raise RayJobsError(0, f"`ray start --head` failed with exit code {rc}; see {self.log_file}")
        addr = f"http://127.0.0.1:{dash}"
        while not self._alive(addr):
            if time.monotonic() - t0 > self.start_timeout_s:
                raise RayJobsError(0, f"the local Ray head's dashboard did not answer on {addr} within "
                                   f"{self.start_timeout_s:.0f} s; see {self.log_file}")
            time.sleep(0.5)
        tmp = self.info_file.with_name(self.info_file.name + ".tmp")
        tmp.write_text(json.dumps({"dashboard": addr, "gcs": f"127.0.0.1:{gcs}", "started": time.time()}))
        tmp.replace(self.info_file)
        log.info("local Ray head up in %.1f s: dashboard %s", time.monotonic() - t0, addr)
        return addr
