"""Where a search process runs: a detached local process (`LocalBackend`) or a Ray Job (`RayJobBackend`)."""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("dass_ray.jobs")

ROOT = Path(__file__).resolve().parents[3]  # the repository (a search's working directory)



@dataclass(frozen=True)
class Status:
    """What a backend knows about one launched search.

    kind: "running"; "exited" (with `returncode`; negative = killed by that signal); "stopped" (stopped by
    someone, e.g. `ray job stop`); "lost" (gone with no exit status: the machine or the Ray cluster went away);
    "unreachable" (cannot tell right now).
    """

    kind: str
    returncode: int | None = None
    detail: str = ""


class Backend(Protocol):
    name: str

    def launch(self, job_id: str, cmd: list[str], workdir: Path, attempt: int) -> str:
        """Start the search; returns a handle (a string stored in the job table)."""

    def poll(self, handle: str) -> Status: ...

    def stop(self, handle: str, force: bool = False) -> None: ...

    def failure_detail(self, handle: str) -> str:
        """The last meaningful line of the search's output (for a failure message)."""


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ")):
            return line[:500]
    return ""


class LocalBackend:
    """Each search is a detached process group (`python -m dass_ray.service.jobs.launch`): it survives the server and
    records its exit code in a file, so a restarted server can still learn how it ended."""

    name = "local"

    def __init__(self, env: dict | None = None):
        self.env = env
        self._children: dict[int, subprocess.Popen] = {}

    def launch(self, job_id: str, cmd: list[str], workdir: Path, attempt: int) -> str:
        workdir.mkdir(parents=True, exist_ok=True)
        exit_file = workdir / f"attempt-{attempt}.exit"
        exit_file.unlink(missing_ok=True)
        out = open(workdir / f"attempt-{attempt}.log", "ab")
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONUNBUFFERED"] = "1"
        launcher = [sys.executable, "-m", "dass_ray.service.jobs.launch", "--exit-file", str(exit_file), "--", *cmd]
        p = subprocess.Popen(launcher, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             cwd=str(ROOT), env=env, start_new_session=True, close_fds=True)
        out.close()
        self._children[p.pid] = p
        return json.dumps({"pid": p.pid, "exit_file": str(exit_file),
                           "log": str(workdir / f"attempt-{attempt}.log")})

    def _alive(self, pid: int, marker: str) -> bool:
        p = self._children.get(pid)
        if p is not None:
            if p.poll() is None:
                return True
            self._children.pop(pid, None)
            return False
        cmdline = Path(f"/proc/{pid}/cmdline")
        if Path("/proc/self").exists():
            try:
                return marker in cmdline.read_bytes().decode(errors="replace")
            except OSError:
                return False
        try:  # no /proc: trust the pid (may be fooled by pid reuse)
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def poll(self, handle: str) -> Status:
        h = json.loads(handle)
        exit_file = Path(h["exit_file"])
        if self._alive(h["pid"], h["exit_file"]):
            return Status("running")
        if exit_file.exists():
            try:
                rc = int(json.loads(exit_file.read_text())["returncode"])
            except (ValueError, KeyError, OSError) as e:
                return Status("lost", detail=f"unreadable exit file {exit_file}: {e}")
            return Status("exited", rc)
        return Status("lost", detail=f"search process {h['pid']} is gone without an exit status")

    def stop(self, handle: str, force: bool = False) -> None:
        pid = json.loads(handle)["pid"]
        try:
            os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.warning("cannot signal search process group %d: %s", pid, e)

    def failure_detail(self, handle: str) -> str:
        try:
            p = Path(json.loads(handle)["log"])
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - 8192))
                return _last_line(f.read().decode(errors="replace"))
        except (OSError, KeyError, ValueError):
            return ""


class RayJobsError(RuntimeError):
    """An HTTP error answer of the Ray Jobs API (`status` 0: no answer at all)."""

    def __init__(self, status: int, text: str):
        super().__init__(f"Ray Jobs API: HTTP {status}: {text[:300]}" if status else f"Ray Jobs API: {text[:300]}")
        self.status = status


def ray_auth_headers() -> dict:
    """The `Authorization` header for a Ray cluster with token auth (RAY_AUTH_MODE=token): the token from
    RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray's own clients find it."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not tok:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        tok = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {tok}"} if tok else {}


class RayJobsAPI:
    """The Ray Jobs REST API of a cluster's dashboard (what `ray job submit` and `JobSubmissionClient` speak),
    with the standard library only: the server process loads no Ray library."""

    def __init__(self, address: str, headers: dict | None = None, timeout_s: float = 10.0):
        self.address = address.rstrip("/")
        if "://" not in self.address:
            self.address = "http://" + self.address
        self.headers = dict(headers) if headers else ray_auth_headers()
        self.timeout_s = timeout_s

    def request(self, method: str, endpoint: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.address + endpoint, data=data, method=method,
                                     headers={"Content-Type": "application/json", **self.headers})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise RayJobsError(e.code, e.read().decode(errors="replace")) from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise RayJobsError(0, f"cannot reach {self.address}: {getattr(e, 'reason', e)}") from None

    def submit(self, entrypoint: str, submission_id: str, runtime_env: dict, metadata: dict) -> str:
        # a submit waits for the head to start the job's supervisor: much slower than a status read when loaded
        return self.request("POST", "/api/jobs/", {"entrypoint": entrypoint, "submission_id": submission_id,
                                                   "runtime_env": runtime_env, "metadata": metadata},
                            timeout_s=120)["submission_id"]

    def info(self, submission_id: str) -> dict:
        return self.request("GET", f"/api/jobs/{submission_id}")

    def stop(self, submission_id: str) -> bool:
        return bool(self.request("POST", f"/api/jobs/{submission_id}/stop").get("stopped"))

    def logs(self, submission_id: str) -> str:
        return str(self.request("GET", f"/api/jobs/{submission_id}/logs").get("logs", ""))

    def version(self) -> dict:
        return self.request("GET", "/api/version")


class RayJobBackend:
    """Each search is a Ray Job on the cluster whose dashboard is at `address` (e.g. http://127.0.0.1:8265):
    the same command a user would `ray job submit`. Ray Jobs outlive the server; when the Ray head itself is
    restarted they are gone, and the runner resubmits them with `--resume`.

    Assumes the server and the job drivers share the file system of the state directory (the server runs on
    the Ray head node, or the state directory is on shared storage). `address` may be a callable that answers
    the address once a head is up (`LocalRayHead.address`); until then launches wait in the queue.
    """

    name = "ray"

    def __init__(self, address, env_vars: dict | None = None, headers: dict | None = None):
        self._address = address
        self.env_vars = dict(env_vars or {})
        self.headers = headers
        self._api: RayJobsAPI | None = None

    @property
    def api(self) -> RayJobsAPI:
        if self._api is None:
            addr = self._address() if callable(self._address) else self._address
            self._api = RayJobsAPI(addr, self.headers)
        return self._api

    @staticmethod
    def _unreachable(e: Exception) -> bool:
        return (isinstance(e, RayJobsError) and (e.status == 0 or e.status >= 500)) or \
            isinstance(e, (ConnectionError, TimeoutError, OSError))

    def launch(self, job_id: str, cmd: list[str], workdir: Path, attempt: int) -> str:
        workdir.mkdir(parents=True, exist_ok=True)
        sub_id = f"dass-{job_id}-{attempt}"
        runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", **self.env_vars}}
        try:
            self.api.submit(shlex.join(cmd), sub_id, runtime_env, {"dass_ray_job": job_id, "attempt": str(attempt)})
        except RayJobsError as e:
            if "already exists" in str(e):  # a launch whose answer we lost: it is ours
                return sub_id
            self._api = None
            raise
        return sub_id

    def poll(self, handle: str) -> Status:
        try:
            info = self.api.info(handle)
        except RayJobsError as e:
            if e.status == 404:
                return Status("lost", detail=f"Ray Job {handle} is unknown to the cluster (was the head restarted?)")
            self._api = None
            return Status("unreachable", detail=str(e))
        except Exception as e:  # noqa: BLE001 - e.g. the head's address is not known yet
            return Status("unreachable", detail=f"{type(e).__name__}: {e}")
        st, msg = str(info.get("status", "")).split(".")[-1], str(info.get("message") or "")
        if st in ("PENDING", "RUNNING"):
            return Status("running")
        if st == "SUCCEEDED":
            return Status("exited", 0)
        if st == "STOPPED":
            return Status("stopped", detail=msg or "the Ray Job was stopped")
        rc = info.get("driver_exit_code")
        if rc is not None:
            return Status("exited", int(rc), detail=msg)
        return Status("lost", detail=f"Ray Job {handle} failed without an exit code: {msg}")

    def stop(self, handle: str, force: bool = False) -> None:
        try:
            self.api.stop(handle)
        except Exception as e:  # noqa: BLE001
            log.warning("stopping Ray Job %s: %s", handle, e)
            self._api = None

    def failure_detail(self, handle: str) -> str:
        try:
            return _last_line(self.api.logs(handle)[-8192:])
        except Exception:  # noqa: BLE001
            return ""
