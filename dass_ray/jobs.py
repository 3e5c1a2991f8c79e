"""The search service's job runner: a durable job table and event log, and the workers that run the searches.

Every job is one run of the search job contract (`scripts/search.py --dataset ... --output DIR`), which writes
`DIR/events.jsonl` (progress), `DIR/result.json` and the artifacts. The runner

- keeps the job table, the uploads table and each job's event log in SQLite (WAL mode) under the state
  directory, so they survive a restart of the server;
- runs each search as a **Ray Job** (`JobSubmissionClient`, when given the cluster's dashboard address) or as a
  **detached local process** (its own session, so it outlives the server), at most `max_running` at once, the
  rest queued in submission order;
- copies the search's events into the job's event log with the runner's own gapless sequence numbers; the
  search's terminal event ("done"/"failed") is held back until its process is known to have ended, so a
  client's stream ends with exactly one terminal event even when a worker dies and the search is resumed;
- after a restart re-attaches to the searches still running, and when a search's process or Ray Job is gone
  without an exit status (the server's machine rebooted, the Ray head was restarted) launches it again with
  `--resume`, so it continues from its last saved stage.

No gRPC here: `dass_ray.server` translates between protobuf and this module. Ray is imported only by the Ray
Job backend.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

log = logging.getLogger("dass_ray.jobs")

ROOT = Path(__file__).resolve().parents[1]

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# Stages of the search job contract, in order; "done"/"failed" are its terminal stages.
SEARCH_STAGES = ("validate", "teacher", "embed", "score", "kd", "export")
SEARCH_TERMINAL = ("done", "failed")
# Artifacts a successful search leaves in its output directory.
ARTIFACTS = ("student.torchscript.pt", "student.pt", "report.png", "candidates.parquet", "trials.parquet")


# ----------------------------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------------------------


class SpecError(ValueError):
    """A search request that cannot run; `field` names the offending request field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SearchSpec:
    """One search request with its inputs resolved to files the workers can read.

    `dataset`/`teacher` are what the client gave ("sha256:<hex>" or a path; teacher "" when one is trained);
    `dataset_path`/`teacher_path` are the files the search reads. Numbers at 0 mean "the search's default".
    """

    dataset: str
    dataset_path: str
    teacher: str = ""
    teacher_path: str = ""  # "" -> train a teacher
    max_flops: int = 0  # FLOPs of one forward pass (0: no limit)
    max_params: int = 0  # parameters (0: no limit)
    candidates: int = 0
    top_k: int = 0
    kd_epochs: int = 0
    seed: int | None = None
    scale: str = ""
    dry_run: bool = False

    @property
    def train_teacher(self) -> bool:
        return not self.teacher_path

    def validate(self) -> "SearchSpec":
        """Raise SpecError (naming the request field) for values no search can run with."""
        if not self.dataset_path:
            raise SpecError("dataset", "a dataset is required")
        for name, key in (("max_flops", "budget.max_flops"), ("max_params", "budget.max_params"),
                          ("candidates", "candidates"), ("top_k", "top_k"), ("kd_epochs", "kd_epochs")):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise SpecError(key, f"{key} must be an integer >= 0 (0: default), got {v}")
        if self.candidates and self.top_k and self.top_k > self.candidates:
            raise SpecError("top_k", f"top_k ({self.top_k}) must not exceed candidates ({self.candidates})")
        if self.seed is not None and not (0 <= self.seed < 2**32):
            raise SpecError("seed", f"seed must be in [0, 2^32), got {self.seed}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def canonical(self) -> str:
        """Canonical JSON: equal requests give equal strings (for idempotent submits)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def search_args(self, output: Path, *, resume: bool, address: str | None = None,
                    extra: Iterable[str] = ()) -> list[str]:
        """The search job contract's command-line arguments (after the program)."""
        a = ["--dataset", self.dataset_path, "--teacher", self.teacher_path or "train", "--output", str(output)]
        for flag, v in (("--max-flops", self.max_flops), ("--max-params", self.max_params),
                        ("--candidates", self.candidates), ("--top-k", self.top_k), ("--kd-epochs", self.kd_epochs)):
            if v:
                a += [flag, str(v)]
        if self.seed is not None:
            a += ["--seed", str(self.seed)]
        if self.scale:
            a += ["--scale", self.scale]
        if address:
            a += ["--address", address]
        a += list(extra)
        if resume:
            a.append("--resume")
        return a


def default_search_command() -> list[str]:
    """How to start a search: `$DASS_RAY_SEARCH_CMD` if set, else this interpreter on the repository's
    scripts/search.py, else `python -m dass_ray.search_cli` (an installed package without the scripts)."""
    env = os.environ.get("DASS_RAY_SEARCH_CMD")
    if env:
        return shlex.split(env)
    script = ROOT / "scripts" / "search.py"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "dass_ray.search_cli"]


# ----------------------------------------------------------------------------------------------------------------
# The durable store
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """One row of the job table."""

    job_id: str
    owner: str
    request_id: str
    spec: SearchSpec
    state: str
    stage: str
    done: int
    total: int
    message: str
    error: str
    created: float
    started: float
    finished: float
    attempts: int
    backend: str
    handle: str
    cancel_requested: bool
    next_seq: int
    qorder: float
    events_offset: int

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def last_sequence(self) -> int:
        return self.next_seq - 1


@dataclass(frozen=True)
class Event:
    """One entry of a job's event log; `seq` is gapless from 0 per job."""

    job_id: str
    seq: int
    time: float
    stage: str
    done: int
    total: int
    message: str
    state: str

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Upload:
    """A validated upload of one client: `kind` "dataset" or "teacher", `info` what validation found."""

    owner: str
    kind: str
    sha256: str
    path: str
    size: int
    info: dict
    created: float


class QueueFull(RuntimeError):
    """Too many queued jobs."""


class RequestConflict(ValueError):
    """A request_id reused for a different request."""


class JobNotFound(LookupError):
    pass


class JobFinished(RuntimeError):
    """The job is already in a terminal state."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    stage TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    backend TEXT NOT NULL DEFAULT '',
    handle TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    next_seq INTEGER NOT NULL DEFAULT 0,
    qorder REAL NOT NULL,
    events_offset INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs(owner, request_id) WHERE request_id != '';
CREATE INDEX IF NOT EXISTS jobs_owner_created ON jobs(owner, created DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, qorder);
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    stage TEXT NOT NULL,
    done INTEGER NOT NULL,
    total INTEGER NOT NULL,
    message TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uploads (
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    info TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (owner, kind, sha256)
) WITHOUT ROWID;
"""

_JOB_COLS = [f.name for f in dataclasses.fields(JobRow)]


class JobStore:
    """The job table, event logs and uploads in one SQLite database (WAL: readers never block the writer).

    Thread-safe: one connection per thread. Writes that must be atomic (events + job fields) run in one
    `BEGIN IMMEDIATE` transaction.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        con = self._con()
        mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: could not switch SQLite to WAL mode (got {mode})")
        con.executescript(_SCHEMA)

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
            self._local.con = con
            with self._lock:
                self._all.append(con)
        return con

    def close(self) -> None:
        with self._lock:
            for con in self._all:
                try:
                    con.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    def journal_mode(self) -> str:
        return self._con().execute("PRAGMA journal_mode").fetchone()[0]

    class _Tx:
        def __init__(self, con: sqlite3.Connection):
            self.con = con

        def __enter__(self) -> sqlite3.Connection:
            self.con.execute("BEGIN IMMEDIATE")
            return self.con

        def __exit__(self, et, ev, tb) -> None:
            self.con.execute("COMMIT" if et is None else "ROLLBACK")

    def tx(self) -> "_Tx":
        return JobStore._Tx(self._con())

    # ---- jobs ---------------------------------------------------------------------------------------------
    @staticmethod
    def _row(r: sqlite3.Row | tuple) -> JobRow:
        d = dict(zip(_JOB_COLS, r))
        d["spec"] = SearchSpec.from_dict(json.loads(d["spec"]))
        d["cancel_requested"] = bool(d["cancel_requested"])
        return JobRow(**d)

    _SELECT = "SELECT " + ", ".join(_JOB_COLS) + " FROM jobs"

    def create(self, owner: str, request_id: str, spec: SearchSpec, *, max_queued: int | None = None,
               now: float | None = None) -> tuple[JobRow, bool]:
        """Insert a QUEUED job with its first event; returns (job, created). An existing (owner, request_id)
        with the same spec returns that job (created False); with another spec raises RequestConflict."""
        now = time.time() if now is None else now
        canon = spec.canonical()
        for _ in range(5):
            job_id = uuid.uuid4().hex[:12]
            try:
                with self.tx() as con:
                    if request_id:
                        old = con.execute(self._SELECT + " WHERE owner=? AND request_id=?",
                                          (owner, request_id)).fetchone()
                        if old is not None:
                            row = self._row(old)
                            if row.spec.canonical() != canon:
                                raise RequestConflict(
                                    f"request_id {request_id!r} was already used for a different request "
                                    f"(job {row.job_id})")
                            return row, False
                    if max_queued is not None:
                        n = con.execute("SELECT COUNT(*) FROM jobs WHERE state=?", (QUEUED,)).fetchone()[0]
                        if n >= max_queued:
                            raise QueueFull(f"the queue is full ({n} jobs waiting, limit {max_queued}); "
                                            f"retry later")
                    con.execute(
                        "INSERT INTO jobs (job_id, owner, request_id, spec, state, stage, message, created, qorder,"
                        " next_seq) VALUES (?,?,?,?,?,?,?,?,?,1)",
                        (job_id, owner, request_id, canon, QUEUED, "queued", "waiting for a free slot", now, now))
                    con.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)",
                                (job_id, 0, now, "queued", 0, 0, "waiting for a free slot", QUEUED))
                return self.get(job_id), True
            except sqlite3.IntegrityError:
                continue  # job id collision, or a concurrent submit with the same request_id: look again
        raise RuntimeError("could not allocate a job id")

    def get(self, job_id: str, owner: str | None = None) -> JobRow | None:
        q, args = self._SELECT + " WHERE job_id=?", [job_id]
        if owner is not None:
            q += " AND owner=?"
            args.append(owner)
        r = self._con().execute(q, args).fetchone()
        return self._row(r) if r else None

    def get_by_request(self, owner: str, request_id: str) -> JobRow | None:
        r = self._con().execute(self._SELECT + " WHERE owner=? AND request_id=?", (owner, request_id)).fetchone()
        return self._row(r) if r else None

    def list(self, owner: str | None = None, states: Iterable[str] = (), limit: int = 50,
             after: tuple[float, str] | None = None) -> list[JobRow]:
        """Jobs newest first; `after` = (created, job_id) of the last row of the previous page."""
        where, args = [], []
        if owner is not None:
            where.append("owner=?")
            args.append(owner)
        states = list(states)
        if states:
            where.append("state IN (" + ",".join("?" * len(states)) + ")")
            args += states
        if after is not None:
            where.append("(created < ? OR (created = ? AND job_id < ?))")
            args += [after[0], after[0], after[1]]
        q = self._SELECT + (" WHERE " + " AND ".join(where) if where else "")
        q += " ORDER BY created DESC, job_id DESC LIMIT ?"
        return [self._row(r) for r in self._con().execute(q, args + [int(limit)]).fetchall()]

    def in_state(self, state: str) -> list[JobRow]:
        rows = self._con().execute(self._SELECT + " WHERE state=? ORDER BY qorder, job_id", (state,)).fetchall()
        return [self._row(r) for r in rows]

    def count(self, state: str | None = None) -> int:
        if state is None:
            return self._con().execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return self._con().execute("SELECT COUNT(*) FROM jobs WHERE state=?", (state,)).fetchone()[0]

    def queue_position(self, job: JobRow) -> int:
        if job.state != QUEUED:
            return -1
        return self._con().execute(
            "SELECT COUNT(*) FROM jobs WHERE state=? AND (qorder < ? OR (qorder = ? AND job_id < ?))",
            (QUEUED, job.qorder, job.qorder, job.job_id)).fetchone()[0]

    def update(self, job_id: str, *, expect_state: str | None = None, **fields) -> bool:
        """Set job fields; with `expect_state`, only if the job is in that state. Returns whether it changed."""
        with self.tx() as con:
            return self._update(con, job_id, expect_state, fields)

    @staticmethod
    def _update(con: sqlite3.Connection, job_id: str, expect_state: str | None, fields: dict) -> bool:
        if not fields:
            return True
        sets = ", ".join(f"{k}=?" for k in fields)
        args = [json.dumps(v.to_dict()) if isinstance(v, SearchSpec) else v for v in fields.values()]
        q = f"UPDATE jobs SET {sets} WHERE job_id=?"
        args.append(job_id)
        if expect_state is not None:
            q += " AND state=?"
            args.append(expect_state)
        return con.execute(q, args).rowcount == 1

    def append(self, job_id: str, events: list[dict], *, expect_state: str | None = None, **fields) -> list[Event]:
        """Append events (dicts with stage/done/total/message, optional time and state) and set job fields in
        one transaction. The job's stage/done/total/message follow the last event. With `expect_state`, nothing
        happens (returns []) unless the job is in that state."""
        with self.tx() as con:
            r = con.execute("SELECT next_seq, state FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if r is None or (expect_state is not None and r[1] != expect_state):
                return []
            seq, state = r
            state = fields.get("state", state)
            out = []
            for e in events:
                ev = Event(job_id, seq, float(e.get("time") or time.time()), str(e.get("stage", "")),
                           int(e.get("done") or 0), int(e.get("total") or 0), str(e.get("message", "")),
                           e.get("state", state))
                con.execute("INSERT INTO events VALUES (?,?,?,?,?,?,?,?)",
                            (ev.job_id, ev.seq, ev.time, ev.stage, ev.done, ev.total, ev.message, ev.state))
                out.append(ev)
                seq += 1
            if out:
                last = out[-1]
                fields = {"stage": last.stage, "done": last.done, "total": last.total, "message": last.message,
                          **fields}
            fields["next_seq"] = seq
            self._update(con, job_id, None, fields)
            return out

    def events(self, job_id: str, from_seq: int = 0, limit: int = 1000) -> list[Event]:
        rows = self._con().execute(
            "SELECT job_id, seq, time, stage, done, total, message, state FROM events WHERE job_id=? AND seq>=?"
            " ORDER BY seq LIMIT ?", (job_id, int(from_seq), int(limit))).fetchall()
        return [Event(*r) for r in rows]

    # ---- uploads ------------------------------------------------------------------------------------------
    def put_upload(self, up: Upload) -> None:
        with self.tx() as con:
            con.execute("INSERT OR REPLACE INTO uploads VALUES (?,?,?,?,?,?,?)",
                        (up.owner, up.kind, up.sha256, up.path, up.size, json.dumps(up.info), up.created))

    def get_upload(self, owner: str, kind: str, sha256: str) -> Upload | None:
        r = self._con().execute("SELECT owner, kind, sha256, path, size, info, created FROM uploads"
                                " WHERE owner=? AND kind=? AND sha256=?", (owner, kind, sha256)).fetchone()
        if r is None:
            return None
        return Upload(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6])

    def find_upload(self, kind: str, sha256: str) -> Upload | None:
        """Any client's upload of these bytes (to reuse a stored, already validated file)."""
        r = self._con().execute("SELECT owner, kind, sha256, path, size, info, created FROM uploads"
                                " WHERE kind=? AND sha256=? LIMIT 1", (kind, sha256)).fetchone()
        return None if r is None else Upload(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6])


# ----------------------------------------------------------------------------------------------------------------
# Reading a search's events.jsonl
# ----------------------------------------------------------------------------------------------------------------


def read_search_events(path: Path, offset: int) -> tuple[list[dict], int, dict | None]:
    """New complete events of a search's `events.jsonl` from byte `offset`.

    Returns (events, new_offset, pending_terminal). A terminal event ("done"/"failed") that is the last line is
    returned as `pending_terminal` and *not* consumed (the offset stays before it), so that it is only
    recorded once the process is known to have ended. A terminal line followed by more lines was written by a
    worker that was then resumed: it is skipped. Lines that are not JSON objects (a torn write) are skipped; a
    last line without its newline is left for later.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset, None
    events: list[dict] = []
    pos = 0
    pending = None
    lines = []
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        lines.append((data[pos:nl], pos, nl + 1))
        pos = nl + 1
    consumed = 0
    for i, (raw, start, end) in enumerate(lines):
        try:
            ev = json.loads(raw)
            if not isinstance(ev, dict):
                raise ValueError("not an object")
        except ValueError:
            if raw.strip():
                log.warning("%s: skipping an unreadable event line at byte %d", path, offset + start)
            consumed = end
            continue
        if ev.get("stage") in SEARCH_TERMINAL:
            if i == len(lines) - 1:
                pending = ev
                break
            consumed = end  # stale: the search went on after it (resumed)
            continue
        events.append(ev)
        consumed = end
    return events, offset + consumed, pending


def truncate_partial_line(path: Path) -> None:
    """Cut a torn last line (no trailing newline) left by a killed worker, before a resumed one appends."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------------------------------------
# Backends: where a search process runs
# ----------------------------------------------------------------------------------------------------------------


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
    """Each search is a detached process group (`python -m dass_ray.jobs launch`): it survives the server and
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
        launcher = [sys.executable, "-m", "dass_ray.jobs", "launch", "--exit-file", str(exit_file), "--", *cmd]
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


class RayJobBackend:
    """Each search is a Ray Job on the cluster whose dashboard is at `address` (e.g. http://127.0.0.1:8265):
    the same command a user would `ray job submit`. Ray Jobs outlive the server; when the Ray head itself is
    restarted they are gone, and the runner resubmits them with `--resume`.

    Assumes the server and the job drivers share the file system of the state directory (the server runs on
    the Ray head node, or the state directory is on shared storage).
    """

    name = "ray"

    def __init__(self, address: str, env_vars: dict | None = None, headers: dict | None = None):
        self.address = address
        self.env_vars = dict(env_vars or {})
        self.headers = headers
        self._client = None

    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address, headers=self.headers)
        return self._client

    def _reset(self) -> None:
        self._client = None

    @staticmethod
    def _unreachable(e: Exception) -> bool:
        txt = f"{type(e).__name__}: {e}"
        return isinstance(e, (ConnectionError, TimeoutError, OSError)) or "Failed to connect" in txt \
            or "Connection" in txt or "timed out" in txt.lower()

    def launch(self, job_id: str, cmd: list[str], workdir: Path, attempt: int) -> str:
        workdir.mkdir(parents=True, exist_ok=True)
        sub_id = f"dass-{job_id}-{attempt}"
        runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1", **self.env_vars}}
        try:
            self.client().submit_job(entrypoint=shlex.join(cmd), submission_id=sub_id, runtime_env=runtime_env,
                                     metadata={"dass_ray_job": job_id, "attempt": str(attempt)})
        except Exception as e:
            if "already exists" in str(e):  # a launch whose answer we lost: it is ours
                return sub_id
            self._reset()
            raise
        return sub_id

    def poll(self, handle: str) -> Status:
        try:
            info = self.client().get_job_info(handle)
        except Exception as e:  # noqa: BLE001 - the SDK raises bare RuntimeError for HTTP errors
            txt = str(e)
            if "does not exist" in txt or "404" in txt:
                return Status("lost", detail=f"Ray Job {handle} is unknown to the cluster (was the head restarted?)")
            self._reset()
            return Status("unreachable", detail=f"{type(e).__name__}: {txt[:300]}")
        st = str(info.status)
        st = st.split(".")[-1]
        if st in ("PENDING", "RUNNING"):
            return Status("running")
        if st == "SUCCEEDED":
            return Status("exited", 0)
        if st == "STOPPED":
            return Status("stopped", detail=info.message or "the Ray Job was stopped")
        rc = getattr(info, "driver_exit_code", None)
        if rc is not None:
            return Status("exited", int(rc), detail=info.message or "")
        return Status("lost", detail=f"Ray Job {handle} failed without an exit code: {info.message}")

    def stop(self, handle: str, force: bool = False) -> None:
        try:
            self.client().stop_job(handle)
        except Exception as e:  # noqa: BLE001
            log.warning("stopping Ray Job %s: %s", handle, e)
            self._reset()

    def failure_detail(self, handle: str) -> str:
        try:
            return _last_line(self.client().get_job_logs(handle)[-8192:])
        except Exception:  # noqa: BLE001
            return ""


# ----------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunnerConfig:
    """How the runner schedules: at most `max_running` searches at once, `max_queued` waiting; a search lost
    `max_attempts` times fails; `cancel_grace_s` seconds between SIGTERM and SIGKILL on cancel."""

    max_running: int = 1
    max_queued: int = 100
    max_attempts: int = 3
    poll_s: float = 0.5
    cancel_grace_s: float = 10.0
    search_cmd: list[str] = field(default_factory=default_search_command)
    extra_args: list[str] = field(default_factory=list)  # passed to every search (e.g. --encoders 2)


class JobRunner:
    """Schedules, launches, watches and finalizes jobs; all job-state transitions of running jobs happen on
    its one background thread (`tick`), so no two threads race on them."""

    def __init__(self, state_dir: str | Path, backend: Backend, config: RunnerConfig | None = None,
                 store: JobStore | None = None):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = store or JobStore(self.state_dir / "jobs.sqlite")
        self.backend = backend
        self.config = config or RunnerConfig()
        self._changed = threading.Condition()
        self._version = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._cancel_sent: dict[str, float] = {}
        self._unreachable_logged: set[str] = set()
        self._accepting = True

    # ---- paths --------------------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def output_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "out"

    # ---- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> "JobRunner":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dass-job-runner", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop scheduling and watching. Running searches are left running (they are re-attached by the next
        runner on this state directory); nothing is cancelled."""
        self._accepting = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._notify()

    def drain(self) -> None:
        """Accept no new jobs and start no queued ones (they stay queued for the next server)."""
        self._accepting = False
        self._wake.set()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bad tick must not kill the runner
                log.exception("job runner tick failed")
            self._wake.wait(self.config.poll_s)
            self._wake.clear()

    def _notify(self) -> None:
        with self._changed:
            self._version += 1
            self._changed.notify_all()

    def version(self) -> int:
        return self._version

    def wait_for_change(self, version: int, timeout: float) -> int:
        """Block until something was recorded after `version` (see `version()`) or `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout=timeout)
            return self._version

    # ---- client-facing operations (any thread) ----------------------------------------------------------
    def submit(self, owner: str, request_id: str, spec: SearchSpec) -> tuple[JobRow, bool]:
        spec.validate()
        if not self._accepting:
            raise RuntimeError("the server is shutting down and accepts no new jobs")
        job, created = self.store.create(owner, request_id, spec, max_queued=self.config.max_queued)
        if created:
            self._notify()
            self._wake.set()
        return job, created

    def cancel(self, job_id: str, owner: str | None = None) -> JobRow:
        job = self.store.get(job_id, owner)
        if job is None:
            raise JobNotFound(job_id)
        if job.terminal:
            raise JobFinished(f"job {job_id} already finished ({job.state}); nothing to cancel")
        now = time.time()
        if job.state == QUEUED:
            evs = self.store.append(job_id, [{"stage": "cancelled", "message": "cancelled by the client before it "
                                              "started", "state": CANCELLED, "time": now}],
                                    expect_state=QUEUED, state=CANCELLED, finished=now, cancel_requested=1)
            if evs:
                self._notify()
                return self.store.get(job_id)
        self.store.update(job_id, cancel_requested=1)
        self._wake.set()
        job = self.store.get(job_id)
        if job.terminal and job.state != CANCELLED:
            raise JobFinished(f"job {job_id} already finished ({job.state}); nothing to cancel")
        return job

    # ---- the scheduling pass (runner thread) --------------------------------------------------------------
    def tick(self) -> None:
        for job in self.store.in_state(RUNNING):
            self._watch(job)
        if self._accepting:
            self._schedule()

    def _schedule(self) -> None:
        queued = self.store.in_state(QUEUED)
        running = self.store.count(RUNNING)
        for job in queued:
            if job.spec.dry_run:
                self._finish_dry_run(job)
                continue
            if running >= self.config.max_running:
                continue
            if self._launch(job):
                running += 1

    def _finish_dry_run(self, job: JobRow) -> None:
        now = time.time()
        evs = self.store.append(job.job_id, [
            {"stage": "validate", "done": 1, "total": 1, "message": "dry run: inputs valid", "state": RUNNING,
             "time": now},
            {"stage": "done", "message": "dry run: the search was not started", "state": SUCCEEDED, "time": now},
        ], expect_state=QUEUED, state=SUCCEEDED, started=now, finished=now, backend="dry-run")
        if evs:
            self._notify()

    def _launch(self, job: JobRow) -> bool:
        attempt = job.attempts + 1
        out = self.output_dir(job.job_id)
        out.mkdir(parents=True, exist_ok=True)
        resume = job.attempts > 0 or any(out.iterdir())  # the search refuses a non-empty --output otherwise
        if resume:
            truncate_partial_line(out / "events.jsonl")
        address = "auto" if self.backend.name == "ray" else None
        cmd = list(self.config.search_cmd) + job.spec.search_args(out, resume=resume, address=address,
                                                                  extra=self.config.extra_args)
        now = time.time()
        # Claim the job first (a concurrent cancel of a QUEUED job wins or loses atomically).
        if not self.store.update(job.job_id, expect_state=QUEUED, state=RUNNING, attempts=attempt,
                                 backend=self.backend.name, handle="", started=job.started or now):
            return False
        try:
            handle = self.backend.launch(job.job_id, cmd, self.job_dir(job.job_id), attempt)
        except Exception as e:  # noqa: BLE001
            if RayJobBackend._unreachable(e):
                log.warning("cannot launch job %s now (%s); it stays queued", job.job_id, e)
                self.store.update(job.job_id, expect_state=RUNNING, state=QUEUED, attempts=job.attempts)
                return False
            self._finalize(self.store.get(job.job_id), FAILED, f"could not start the search: {e}")
            return False
        where = "a Ray Job" if self.backend.name == "ray" else "a local process"
        msg = (f"relaunched as {where} with --resume (attempt {attempt}): continues from its last saved stage"
               if resume else f"launched as {where}")
        self.store.append(job.job_id, [{"stage": "resumed" if resume else "started", "message": msg,
                                        "state": RUNNING, "time": now}], handle=handle)
        log.info("job %s: %s, handle %s", job.job_id, msg, handle)
        self._notify()
        return True

    def _ingest(self, job: JobRow) -> dict | None:
        """Copy the search's new events into the log; returns its pending terminal event, if any."""
        path = self.output_dir(job.job_id) / "events.jsonl"
        events, offset, pending = read_search_events(path, job.events_offset)
        if offset != job.events_offset or events:
            recs = [{"stage": e.get("stage", ""), "done": e.get("done", 0), "total": e.get("total", 0),
                     "message": e.get("message", ""), "time": e.get("time"), "state": RUNNING} for e in events]
            self.store.append(job.job_id, recs, expect_state=RUNNING, events_offset=offset)
            if recs:
                self._notify()
        return pending

    def _watch(self, job: JobRow) -> None:
        if job.backend and job.backend != self.backend.name:  # launched by a server with the other backend
            if job.job_id not in self._unreachable_logged:
                log.warning("job %s runs on the %s backend; this server uses %s and leaves it alone", job.job_id,
                            job.backend, self.backend.name)
                self._unreachable_logged.add(job.job_id)
            return
        if not job.handle:  # claimed, but the server died before the launch was recorded: launch again with the
            # same attempt number (a Ray Job submitted meanwhile is then adopted, not duplicated)
            self._requeue(job, "the server stopped while starting the search", attempts=job.attempts - 1)
            return
        pending = self._ingest(job)
        st = self.backend.poll(job.handle)
        if st.kind == "unreachable":
            if job.job_id not in self._unreachable_logged:
                log.warning("job %s: cannot reach its worker (%s); waiting", job.job_id, st.detail)
                self._unreachable_logged.add(job.job_id)
            return
        self._unreachable_logged.discard(job.job_id)
        if st.kind == "running":
            if job.cancel_requested:
                self._send_cancel(job)
            return
        pending = self._ingest(self.store.get(job.job_id)) or pending  # the last lines before it ended
        job = self.store.get(job.job_id)
        self._cancel_sent.pop(job.job_id, None)
        result = self.output_dir(job.job_id) / "result.json"
        if job.cancel_requested:
            self._finalize(job, CANCELLED, "cancelled by the client")
        elif st.kind == "stopped":
            self._finalize(job, CANCELLED, f"stopped outside the service: {st.detail}")
        elif st.kind == "exited" and st.returncode == 0:
            if result.is_file():
                self._finalize(job, SUCCEEDED, (pending or {}).get("message") or "search finished")
            else:
                self._finalize(job, FAILED, "the search exited 0 but wrote no result.json")
        elif st.kind == "exited" and st.returncode is not None and st.returncode > 0:
            reason = ""
            if pending and pending.get("stage") == "failed":
                reason = str(pending.get("message", ""))
            reason = reason or self.backend.failure_detail(job.handle) or st.detail
            self._finalize(job, FAILED, reason or f"the search exited with code {st.returncode}")
        elif pending and pending.get("stage") == "done" and result.is_file():
            # It finished its work and wrote its result; only its process (or Ray Job record) went away.
            self._finalize(job, SUCCEEDED, str(pending.get("message") or "search finished"))
        else:  # lost, or killed by a signal it did not ask for: resume from the saved stage
            why = st.detail or (f"killed by signal {-st.returncode}" if st.returncode else "worker lost")
            if job.attempts >= self.config.max_attempts:
                self._finalize(job, FAILED, f"the search was lost {job.attempts} times; last: {why}")
            else:
                self._requeue(job, why)

    def _requeue(self, job: JobRow, why: str, attempts: int | None = None) -> None:
        log.warning("job %s: %s; it will resume from its last saved stage", job.job_id, why)
        extra = {} if attempts is None else {"attempts": max(0, attempts)}
        self.store.append(job.job_id, [{"stage": job.stage, "done": job.done, "total": job.total,
                                        "message": f"worker lost ({why}); queued to resume", "state": QUEUED}],
                          expect_state=RUNNING, state=QUEUED, handle="", **extra)
        self._notify()

    def _send_cancel(self, job: JobRow) -> None:
        now = time.monotonic()
        first = self._cancel_sent.setdefault(job.job_id, now)
        if first == now:
            self.backend.stop(job.handle)
        elif now - first > self.config.cancel_grace_s:
            self.backend.stop(job.handle, force=True)

    def _finalize(self, job: JobRow, state: str, message: str) -> None:
        stage = {SUCCEEDED: "done", FAILED: "failed", CANCELLED: "cancelled"}[state]
        message = " ".join(str(message).split())[:2000]
        now = time.time()
        done = 1 if state == SUCCEEDED else 0
        evs = self.store.append(job.job_id, [{"stage": stage, "done": done, "total": done, "message": message,
                                              "state": state, "time": now}],
                                expect_state=job.state, state=state, finished=now,
                                error=message if state == FAILED else "")
        if evs:
            log.info("job %s: %s (%s)", job.job_id, state, message)
            self._notify()


# ----------------------------------------------------------------------------------------------------------------
# The detached launcher: `python -m dass_ray.jobs launch --exit-file F -- CMD...`
# ----------------------------------------------------------------------------------------------------------------


def _launch_main(argv: list[str]) -> int:
    """Run CMD, forward SIGTERM/SIGINT to it, then write its exit code to F (atomically)."""
    if len(argv) < 4 or argv[0] != "--exit-file" or argv[2] != "--":
        print("usage: python -m dass_ray.jobs launch --exit-file FILE -- CMD...", file=sys.stderr)
        return 2
    exit_file, cmd = Path(argv[1]), argv[3:]
    child = subprocess.Popen(cmd)

    def forward(sig, _frame):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    tmp = exit_file.with_name(exit_file.name + ".tmp")
    tmp.write_text(json.dumps({"returncode": rc, "time": time.time()}))
    tmp.replace(exit_file)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "launch":
        raise SystemExit(_launch_main(sys.argv[2:]))
    print("usage: python -m dass_ray.jobs launch --exit-file FILE -- CMD...", file=sys.stderr)
    raise SystemExit(2)
