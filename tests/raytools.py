"""Test helpers: a private `ray start --head` and killing only the processes a test started (never `ray stop`)."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def restore_env(saved: dict) -> None:
    """Put environment variables back as `saved` ({name: value, None: was unset}) had them."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def wait_serving(address: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Poll a `dass-ray serve` on `address` until its health check answers SERVING; fail (with the end of its log)
    if the process exits or `timeout` passes first."""
    from dass_ray.service.client import ClientError, SearchClient

    with SearchClient(address, "x", timeout=2) as c:
        t0 = time.monotonic()
        while True:
            try:
                if c.health() == "SERVING":
                    return
            except ClientError:
                pass
            assert proc.poll() is None, f"server exited: {Path(log).read_text()[-3000:]}"
            assert time.monotonic() - t0 < timeout, f"server not healthy in {timeout} s: {Path(log).read_text()[-3000:]}"
            time.sleep(0.3)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line mentions `marker`, and all their descendants."""
    procs = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d.name)] = (ppid, cmd)
    chosen = {pid for pid, (_, cmd) in procs.items() if marker in cmd and pid != os.getpid()}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _) in procs.items() if ppid in chosen} - chosen
        grew = bool(kids)
        chosen |= kids
    return sorted(chosen)


def kill_under(marker: str) -> None:
    for pid in _pids_under(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    t0 = time.monotonic()
    while _pids_under(marker) and time.monotonic() - t0 < 15:
        time.sleep(0.2)


def with_env(entry: str) -> dict[int, str]:
    """pid -> command line of the live processes (this one aside) whose environment holds `entry` ("NAME=value")."""
    out = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int(d.name) != os.getpid() and \
                    entry.encode() in (d / "environ").read_bytes().split(b"\0") and \
                    (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def kill_ray(tmp: str) -> None:
    """Stop a Ray whose processes were started with RAY_TMPDIR=`tmp`: those whose command line names the dir or
    descends from one that does (`kill_under`), then those that only carry it in their environment."""
    kill_under(tmp)
    t0 = time.monotonic()
    while left := with_env(f"RAY_TMPDIR={tmp}"):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert time.monotonic() - t0 < 15, f"cannot stop: {left}"
        time.sleep(0.2)


class RayHead:
    """`ray start --head` under a private temp dir and private ports; `kill()` kills only its processes (and
    their children, e.g. the drivers of its Ray Jobs): the equivalent of losing the head node."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="dts")  # short: Ray's socket paths are length-limited
        (self.gcs, self.dash, self.agent_http, self.agent_grpc, self.metrics, self.rt_env, self.client_port,
         self.node_manager, self.object_manager) = free_ports(9)
        self.env = dict(os.environ, RAY_TMPDIR=self.tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
        self.address = f"http://127.0.0.1:{self.dash}"

    def start(self) -> None:
        ray = Path(sys.executable).parent / "ray"
        cmd = [str(ray), "start", "--head", f"--port={self.gcs}", f"--dashboard-port={self.dash}",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--disable-usage-stats",
               f"--temp-dir={self.tmp}", f"--dashboard-agent-listen-port={self.agent_http}",
               f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--metrics-export-port={self.metrics}",
               f"--runtime-env-agent-port={self.rt_env}", f"--ray-client-server-port={self.client_port}",
               f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}",
               "--node-ip-address=127.0.0.1"]
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"ray start failed:\n{r.stdout}\n{r.stderr}"
        from ray.job_submission import JobSubmissionClient

        t0 = time.monotonic()
        while True:
            try:
                JobSubmissionClient(self.address).list_jobs()
                return
            except Exception:  # noqa: BLE001
                if time.monotonic() - t0 > 120:
                    raise
                time.sleep(0.25)

    def kill(self) -> None:
        kill_under(self.tmp)
        # the head's Ray Client server (ray.util.client.server) names no temp dir, only the head's GCS address
        # (seen as --address=<the machine's own IP>:<gcs port>, not 127.0.0.1): any argument ending in the GCS port
        kill_under(f":{self.gcs}\0")  # /proc cmdline: NUL-separated

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def job_status(self, submission_id: str) -> str:
        from ray.job_submission import JobSubmissionClient

        return str(JobSubmissionClient(self.address).get_job_status(submission_id)).split(".")[-1]


