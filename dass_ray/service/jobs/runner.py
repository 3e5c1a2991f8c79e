"""The job runner: schedules, launches, watches and finalizes the searches of the job table."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dass_ray import contract as C
from dass_ray.contract import EVENTS_FILE
from dass_ray.service.jobs.backends import Backend, RayJobBackend
from dass_ray.service.jobs.events import read_search_events, truncate_partial_line
from dass_ray.service.jobs.store import (CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobFinished, JobNotFound,
                                         JobRow, JobSpec, JobStore, fair_order)

log = logging.getLogger("dass_ray.jobs")

ROOT = Path(__file__).resolve().parents[3]


def _command(env: str, script: str, module: str) -> list[str]:
    """`$env` if set, else this interpreter on the repository's scripts/<script>, else `python -m <module>` (an
    installed package without the scripts)."""
    if os.environ.get(env):
        return shlex.split(os.environ[env])
    path = ROOT / "scripts" / script
    if path.is_file():
        return [sys.executable, str(path)]
    return [sys.executable, "-m", module]


def default_search_command() -> list[str]:
    """How to start a search (`$DASS_RAY_SEARCH_CMD` overrides)."""
    return _command("DASS_RAY_SEARCH_CMD", "search.py", "dass_ray.search.cli")


def default_retrain_command() -> list[str]:
    """How to start a retrain of a client's predictor (`$DASS_RAY_RETRAIN_CMD` overrides)."""
    return _command("DASS_RAY_RETRAIN_CMD", "retrain.py", "dass_ray.offline.retrain")


# ----------------------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RunnerConfig:
    """How the runner schedules: at most `max_running` jobs at once, and `max_running_per_client` of one client
    (0: no limit of its own); at most `max_queued` jobs of one client waiting, `max_queued_total` of all; a freed
    slot goes to the client with the fewest running jobs (`store.fair_order`); a search lost `max_attempts` times
    fails; `cancel_grace_s` seconds between SIGTERM and SIGKILL on cancel."""

    max_running: int = 1
    max_queued: int = 100  # per client
    max_running_per_client: int = 0
    max_queued_total: int = 1000
    max_attempts: int = 3
    poll_s: float = 0.5
    cancel_grace_s: float = 10.0
    search_cmd: list[str] = field(default_factory=default_search_command)
    retrain_cmd: list[str] = field(default_factory=default_retrain_command)
    extra_args: list[str] = field(default_factory=list)  # passed to every search (e.g. --encoders 2)
    history: bool = False  # every search appends its students to its client's history (`history_dir`)


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

    def history_dir(self, owner: str) -> Path:
        """The client's own search history: a directory named by a digest of the client name (any characters)."""
        return self.state_dir / "history" / hashlib.sha256(owner.encode()).hexdigest()[:16]

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
    def submit(self, owner: str, request_id: str, spec: JobSpec) -> tuple[JobRow, bool]:
        spec.validate()
        if not self._accepting:
            raise RuntimeError("the server is shutting down and accepts no new jobs")
        job, created = self.store.create(owner, request_id, spec, max_queued=self.config.max_queued_total,
                                         max_queued_per_client=self.config.max_queued)
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
                                    expect_state=QUEUED, state=CANCELLED, finished=now, cancel_requested=0)
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
        pending = []
        for job in self.store.in_state(QUEUED):
            if job.spec.dry_run:
                self._finish_dry_run(job)
            else:
                pending.append(job)
        per = self.store.running_per_owner()
        running = sum(per.values())
        cap = self.config.max_running_per_client or None
        while pending and running < self.config.max_running:
            startable = [j for j in pending if cap is None or per.get(j.owner, 0) < cap]
            if not startable:
                return
            job = fair_order(startable, per)[0]
            pending.remove(job)
            if self._launch(job):
                running += 1
                per[job.owner] = per.get(job.owner, 0) + 1

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
            truncate_partial_line(out / EVENTS_FILE)
        address = "auto" if self.backend.name == "ray" else None
        history = self.history_dir(job.owner) if self.config.history or job.spec.kind == "retrain" else None
        program = self.config.retrain_cmd if job.spec.kind == "retrain" else self.config.search_cmd
        cmd = list(program) + self._pinned(job).job_args(out, resume=resume, address=address, history=history,
                                                         job_id=job.job_id, extra=self.config.extra_args)
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
        msg = (f"relaunched as {where} (attempt {attempt}): continues from its last saved stage"
               if resume else f"launched as {where}")
        self.store.append(job.job_id, [{"stage": "resumed" if resume else "started", "message": msg,
                                        "state": RUNNING, "time": now}], handle=handle)
        log.info("job %s: %s, handle %s", job.job_id, msg, handle)
        self._notify()
        return True

    PREDICTOR_FILE = "predictor.json"  # in the job's directory: the predictor version a "latest" search runs with

    def predictor_version(self, job: JobRow) -> str:
        """The predictor version that ranks (or ranked) a search's candidates: "shipped", or the client's "vN"
        its `predictor: "latest"` stood for when the search was first launched."""
        try:
            return str(json.loads((self.job_dir(job.job_id) / self.PREDICTOR_FILE).read_text())["version"])
        except (OSError, ValueError, KeyError):
            return "shipped"

    def _pinned(self, job: JobRow) -> JobSpec:
        """The spec to launch: a search asking for its client's "latest" predictor runs with the version that is
        latest at its first launch, kept for its resumes (and named in its result), not whatever a retrain made
        latest meanwhile."""
        spec = job.spec
        if spec.kind != "search" or spec.request.predictor != "latest":
            return spec
        hist = self.history_dir(job.owner)
        f = self.job_dir(job.job_id) / self.PREDICTOR_FILE
        if not f.is_file():
            latest = C.latest_predictor(hist) if self.config.history else None
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f.name + ".tmp")
            tmp.write_text(json.dumps({"version": latest.stem if latest else "shipped"}))
            tmp.replace(f)
        version = self.predictor_version(job)
        path = C.DEFAULT_PREDICTOR if version == "shipped" else str(C.versions_dir(hist) / f"{version}.pt")
        return dataclasses.replace(spec, request=spec.request.replace(predictor=path))

    def _ingest(self, job: JobRow) -> dict | None:
        """Copy the search's new events into the log; returns its pending terminal event, if any."""
        path = self.output_dir(job.job_id) / EVENTS_FILE
        events, offset, pending = read_search_events(path, job.events_offset)
        if offset != job.events_offset or events:
            recs = [{"stage": e.get("stage", ""), "done": e.get("done", 0), "total": e.get("total", 0),
                     "message": self._redact(job, str(e.get("message", ""))), "time": e.get("time"),
                     "state": RUNNING} for e in events]
            self.store.append(job.job_id, recs, expect_state=RUNNING, events_offset=offset)
            if recs:
                self._notify()
        return pending

    def _redact(self, job: JobRow, text: str) -> str:
        """A message for the client: the server's files named as the client named them."""
        for path, shown in job.spec.shown_paths() + [(str(self.output_dir(job.job_id)), "<output>"),
                                                     (str(self.state_dir), "<server>")]:
            if path and path != shown:
                text = text.replace(path, shown)
        return text

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
        result = self.output_dir(job.job_id) / job.spec.result_file
        what = job.spec.kind
        if job.cancel_requested:
            self._finalize(job, CANCELLED, "cancelled by the client")
        elif st.kind == "stopped":
            self._finalize(job, CANCELLED, f"stopped outside the service: {st.detail}")
        elif st.kind == "exited" and st.returncode == 0:
            if result.is_file():
                self._finalize(job, SUCCEEDED, (pending or {}).get("message") or f"{what} finished")
            else:
                self._finalize(job, FAILED, f"the {what} exited 0 but wrote no {result.name}")
        elif st.kind == "exited" and st.returncode is not None and st.returncode > 0:
            reason = ""
            if pending and pending.get("stage") == "failed":
                reason = str(pending.get("message", ""))
            reason = reason or self.backend.failure_detail(job.handle) or st.detail
            self._finalize(job, FAILED, reason or f"the {what} exited with code {st.returncode}")
        elif pending and pending.get("stage") == "done" and result.is_file():
            # It finished its work and wrote its result; only its process (or Ray Job record) went away.
            self._finalize(job, SUCCEEDED, str(pending.get("message") or f"{what} finished"))
        else:  # lost, or killed by a signal it did not ask for: resume from the saved stage
            why = st.detail or (f"killed by signal {-st.returncode}" if st.returncode else "worker lost")
            if job.attempts >= self.config.max_attempts:
                self._finalize(job, FAILED, f"the {what} was lost {job.attempts} times; last: {why}")
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
        message = self._redact(job, " ".join(str(message).split()))[:2000]
        now = time.time()
        done = 1 if state == SUCCEEDED else 0
        evs = self.store.append(job.job_id, [{"stage": stage, "done": done, "total": done, "message": message,
                                              "state": state, "time": now}],
                                expect_state=job.state, state=state, finished=now, cancel_requested=0,
                                error=message if state == FAILED else "")
        if evs:
            log.info("job %s: %s (%s)", job.job_id, state, message)
            self._notify()
