"""The durable job table, event log and uploads table (SQLite in WAL mode under the state directory), and what a
job runs: a search (`SearchSpec`) or a retrain of its client's predictor (`RetrainSpec`). They survive a restart
of the server."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from dass_ray.contract import RESULT_FILE, RETRAIN_FILE, RequestError, SearchRequest

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})


# ----------------------------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpec:
    """One submitted search: the `SearchRequest` it runs (its dataset/teacher resolved to files the workers read;
    teacher "train" when one is trained) and the dataset/teacher as the client named them ("sha256:<hex>" or a
    path; teacher "" when trained)."""

    dataset: str
    request: SearchRequest
    teacher: str = ""
    dry_run: bool = False
    seed_given: bool = False  # the client set `seed` (SearchSpec.seed is shown only then, 0 included)

    kind = "search"
    result_file = RESULT_FILE

    def shown_paths(self) -> list[tuple[str, str]]:
        """(server path, the client's name for it) pairs: messages to the client name its own inputs."""
        return [(self.request.dataset, self.dataset), (self.request.teacher, self.teacher or "train")]

    @property
    def train_teacher(self) -> bool:
        return self.request.teacher == "train"

    def validate(self) -> "SearchSpec":
        """Raise RequestError (naming the request field) for values no search can run with."""
        self.request.validate()
        return self

    def to_dict(self) -> dict:
        d = {"dataset": self.dataset, "teacher": self.teacher, "dry_run": self.dry_run,
             "request": self.request.to_dict()}
        if self.seed_given:  # only then: the canonical form of earlier jobs stays what it was
            d["seed_given"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpec":
        if "request" not in d:  # a job recorded before the search contract (dataset_path, 0 = default, ...)
            req = {"dataset": d["dataset_path"], "teacher": d.get("teacher_path") or "train"}
            for k in ("max_flops", "max_params", "candidates", "top_k", "kd_epochs", "seed", "scale"):
                if d.get(k):
                    req[k] = d[k]
            return cls(d["dataset"], SearchRequest(**req), d.get("teacher", ""), bool(d.get("dry_run")))
        return cls(d["dataset"], SearchRequest.from_dict(d["request"]), d.get("teacher", ""), bool(d["dry_run"]),
                   bool(d.get("seed_given", False)))

    def canonical(self) -> str:
        """Canonical JSON: equal requests give equal strings (for idempotent submits)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def job_args(self, output: Path, *, resume: bool, address: str | None = None, history: Path | None = None,
                 job_id: str = "", extra: Iterable[str] = ()) -> list[str]:
        """The search job contract's command-line arguments (after the program)."""
        a = self.request.to_argv() + ["--output", str(output)]
        if address:
            a += ["--address", address]
        a += list(extra)
        if job_id:
            a += ["--job-id", job_id]
        if history is not None:
            a += ["--history", str(history)]
        if resume:
            a.append("--resume")
        return a


@dataclass(frozen=True)
class RetrainSpec:
    """One submitted retrain of a client's predictor on its own search history (`scripts/retrain.py`); the
    history is always the job owner's own (the runner fills it in), never named by the client."""

    episodes: int = 100
    seed: int = 0
    max_episodes = 100_000

    kind = "retrain"
    result_file = RETRAIN_FILE
    dry_run = False

    def shown_paths(self) -> list[tuple[str, str]]:
        return []

    def validate(self) -> "RetrainSpec":
        if not 1 <= self.episodes <= self.max_episodes:
            raise RequestError("episodes", f"must be in [1, {self.max_episodes}], got {self.episodes}")
        if not 0 <= self.seed < 2**31:
            raise RequestError("seed", f"must be in [0, 2^31), got {self.seed}")
        return self

    def to_dict(self) -> dict:
        return {"kind": self.kind, "episodes": self.episodes, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> "RetrainSpec":
        return cls(int(d["episodes"]), int(d["seed"]))

    def canonical(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def job_args(self, output: Path, *, resume: bool, address: str | None = None, history: Path | None = None,
                 job_id: str = "", extra: Iterable[str] = ()) -> list[str]:
        """`scripts/retrain.py`'s arguments; a rerun resumes by itself (its Ray Train checkpoint), so `resume`
        adds nothing."""
        if history is None:
            raise ValueError("a retrain job needs its client's history directory")
        a = ["--history", str(history), "--episodes", str(self.episodes), "--seed", str(self.seed),
             "--output", str(output)]
        if address:
            a += ["--address", address]
        return a


JobSpec = SearchSpec | RetrainSpec


def spec_from_dict(d: dict) -> JobSpec:
    return RetrainSpec.from_dict(d) if d.get("kind") == "retrain" else SearchSpec.from_dict(d)


# ----------------------------------------------------------------------------------------------------------------
# The durable store
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """One row of the job table."""

    job_id: str
    owner: str
    request_id: str
    spec: JobSpec
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


def fair_order(queued: list[JobRow], running: dict[str, int]) -> list[JobRow]:
    """The order queued jobs start in when no job ends meanwhile: each next slot goes to the client with the
    fewest jobs running (`running`: owner -> count) or already placed, ties to the one whose next job has waited
    longest; each client's own jobs keep their submission order."""
    heads: dict[str, list[JobRow]] = {}
    for j in sorted(queued, key=lambda j: (j.qorder, j.job_id)):
        heads.setdefault(j.owner, []).append(j)
    load = dict(running)
    out: list[JobRow] = []
    while heads:
        owner = min(heads, key=lambda o: (load.get(o, 0), heads[o][0].qorder, heads[o][0].job_id))
        out.append(heads[owner].pop(0))
        load[owner] = load.get(owner, 0) + 1
        if not heads[owner]:
            del heads[owner]
    return out


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
        d["spec"] = spec_from_dict(json.loads(d["spec"]))
        d["cancel_requested"] = bool(d["cancel_requested"])
        return JobRow(**d)

    _SELECT = "SELECT " + ", ".join(_JOB_COLS) + " FROM jobs"

    def create(self, owner: str, request_id: str, spec: JobSpec, *, max_queued: int | None = None,
               max_queued_per_client: int | None = None, now: float | None = None) -> tuple[JobRow, bool]:
        """Insert a QUEUED job with its first event; returns (job, created). An existing (owner, request_id)
        with the same spec returns that job (created False); with another spec raises RequestConflict. QueueFull
        when `owner` already has `max_queued_per_client` jobs queued, or the server `max_queued` in all."""
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
                    if max_queued_per_client is not None:
                        n = con.execute("SELECT COUNT(*) FROM jobs WHERE state=? AND owner=?",
                                        (QUEUED, owner)).fetchone()[0]
                        if n >= max_queued_per_client:
                            raise QueueFull(f"your queue is full ({n} of your jobs waiting, limit "
                                            f"{max_queued_per_client} per client); retry when one has started")
                    if max_queued is not None:
                        n = con.execute("SELECT COUNT(*) FROM jobs WHERE state=?", (QUEUED,)).fetchone()[0]
                        if n >= max_queued:
                            raise QueueFull(f"the server's queue is full ({n} jobs waiting, limit {max_queued}); "
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

    def running_per_owner(self) -> dict[str, int]:
        rows = self._con().execute("SELECT owner, COUNT(*) FROM jobs WHERE state=? GROUP BY owner", (RUNNING,))
        return {o: n for o, n in rows.fetchall()}

    def queue_positions(self) -> dict[str, int]:
        """job id -> place in the start order (0: next) of every QUEUED job (`fair_order`)."""
        return {j.job_id: i for i, j in enumerate(fair_order(self.in_state(QUEUED), self.running_per_owner()))}

    def queue_position(self, job: JobRow, positions: dict[str, int] | None = None) -> int:
        if job.state != QUEUED:
            return -1
        return (self.queue_positions() if positions is None else positions).get(job.job_id, -1)

    def update(self, job_id: str, *, expect_state: str | None = None, **fields) -> bool:
        """Set job fields; with `expect_state`, only if the job is in that state. Returns whether it changed."""
        with self.tx() as con:
            return self._update(con, job_id, expect_state, fields)

    @staticmethod
    def _update(con: sqlite3.Connection, job_id: str, expect_state: str | None, fields: dict) -> bool:
        if not fields:
            return True
        sets = ", ".join(f"{k}=?" for k in fields)
        args = [json.dumps(v.to_dict()) if isinstance(v, (SearchSpec, RetrainSpec)) else v
                for v in fields.values()]
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
