"""The job runner (dass_ray.service.jobs): the SQLite job table / event log, reading a search's events.jsonl, and real
searches run as detached local processes (re-attach after a restart, resume after the process is lost, bounded
concurrency). The gRPC layer and Ray Jobs are covered in test_server.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dass_ray.service import jobs as J
from dass_ray.core.data import bundled_path
from dass_ray.contract import RequestError, SearchRequest, request_from_args

TEACHER = Path(__file__).resolve().parents[1] / "dass_ray" / "assets" / "teachers" / "mnist5k_cpu.pt"


def spec(dataset_path: str | None = None, teacher_path: str = "", dry_run: bool = False, **kw) -> J.SearchSpec:
    """A submitted search: `kw` are SearchRequest knobs; no teacher path means "train one"."""
    req = SearchRequest(dataset=dataset_path or str(bundled_path("mnist5k")), teacher=teacher_path or "train", **kw)
    return J.SearchSpec(dataset_path or "mnist5k", req, teacher_path, dry_run)


def wait_for(pred, timeout: float, what: str, step: float = 0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ----------------------------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------------------------


def test_store_uses_wal_and_survives_reopen(tmp_path):
    st = J.JobStore(tmp_path / "jobs.sqlite")
    assert st.journal_mode().lower() == "wal"
    job, created = st.create("alice", "", spec())
    assert created and job.state == J.QUEUED and job.last_sequence == 0
    st.append(job.job_id, [{"stage": "validate", "done": 1, "total": 1, "message": "ok"}])
    st.close()
    st2 = J.JobStore(tmp_path / "jobs.sqlite")  # a new process would see the same
    again = st2.get(job.job_id)
    assert again.spec == job.spec and again.stage == "validate" and again.last_sequence == 1
    assert [e.stage for e in st2.events(job.job_id)] == ["queued", "validate"]
    assert st2.get(job.job_id, owner="bob") is None  # owner-scoped lookups
    # Another connection (another process) reads while this one holds a write transaction: WAL.
    other = sqlite3.connect(tmp_path / "jobs.sqlite")
    with st2.tx() as con:
        con.execute("UPDATE jobs SET message='x' WHERE job_id=?", (job.job_id,))
        assert other.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1
    other.close()


def test_request_id_gives_one_job_and_refuses_a_different_request(tmp_path):
    st = J.JobStore(tmp_path / "j.sqlite")
    a, c1 = st.create("alice", "req-1", spec(candidates=10, top_k=2))
    b, c2 = st.create("alice", "req-1", spec(candidates=10, top_k=2))
    assert c1 and not c2 and a.job_id == b.job_id
    c, c3 = st.create("bob", "req-1", spec(candidates=10, top_k=2))  # keys are per client
    assert c3 and c.job_id != a.job_id
    with pytest.raises(J.RequestConflict):
        st.create("alice", "req-1", spec(candidates=11, top_k=2))
    assert st.count() == 2


def test_concurrent_submits_with_one_request_id_make_one_job(tmp_path):
    st = J.JobStore(tmp_path / "j.sqlite")
    ids, errors = [], []

    def go():
        try:
            ids.append(st.create("alice", "same", spec())[0].job_id)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=go) for _ in range(8)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and len(set(ids)) == 1 and st.count() == 1


def test_queue_cap(tmp_path):
    st = J.JobStore(tmp_path / "j.sqlite")
    for _ in range(3):
        st.create("alice", "", spec(), max_queued=3)
    with pytest.raises(J.QueueFull):
        st.create("alice", "", spec(), max_queued=3)


def test_event_sequence_is_gapless_under_concurrent_writers(tmp_path):
    st = J.JobStore(tmp_path / "j.sqlite")
    job, _ = st.create("alice", "", spec())

    def writer(k):
        for i in range(25):
            st.append(job.job_id, [{"stage": "kd", "done": i, "total": 25, "message": f"w{k}"}])

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    seqs = [e.seq for e in st.events(job.job_id)]
    assert seqs == list(range(101))
    assert st.get(job.job_id).last_sequence == 100


def test_list_is_newest_first_and_pages_by_key(tmp_path):
    st = J.JobStore(tmp_path / "j.sqlite")
    made = [st.create("alice", "", spec(), now=1000.0 + i)[0].job_id for i in range(7)]
    st.create("bob", "", spec(), now=2000.0)
    page1 = st.list(owner="alice", limit=3)
    page2 = st.list(owner="alice", limit=3, after=(page1[-1].created, page1[-1].job_id))
    page3 = st.list(owner="alice", limit=3, after=(page2[-1].created, page2[-1].job_id))
    got = [j.job_id for j in page1 + page2 + page3]
    assert got == made[::-1]
    assert st.list(owner="alice", states=[J.RUNNING]) == []


# ----------------------------------------------------------------------------------------------------------------
# The search contract, without running it
# ----------------------------------------------------------------------------------------------------------------


def test_spec_validation_names_the_field():
    for kw, field in [(dict(max_flops=-1), "max_flops"), (dict(max_params=-5), "max_params"),
                      (dict(candidates=-1), "candidates"), (dict(candidates=5, top_k=6), "top_k"),
                      (dict(kd_epochs=-2), "kd_epochs"), (dict(seed=-1), "seed"), (dict(candidates=2**31 - 1), "candidates"),
                      (dict(kd_epochs=2**31 - 1), "kd_epochs"), (dict(remap="nope"), "remap")]:
        with pytest.raises(RequestError) as e:
            spec(**kw).validate()
        assert e.value.field == field
    spec(candidates=5, top_k=5).validate()


def test_job_args_follow_the_contract(tmp_path):
    s = spec(teacher_path="/t.pt", max_flops=1000, candidates=20, top_k=2, kd_epochs=1, seed=3, scale="tiny",
             readapt=True, asha=True)
    a = s.job_args(tmp_path, resume=True, address="auto", extra=["--num-cpus", "1"])
    assert a[:4] == ["--dataset", s.request.dataset, "--teacher", "/t.pt"]
    for flag, v in [("--max-flops", "1000"), ("--candidates", "20"), ("--top-k", "2"), ("--kd-epochs", "1"),
                    ("--seed", "3"), ("--scale", "tiny"), ("--address", "auto"), ("--num-cpus", "1"),
                    ("--output", str(tmp_path))]:
        assert a[a.index(flag) + 1] == v
    assert "--readapt" in a and "--asha" in a
    assert a[-1] == "--resume" and "--max-params" not in a
    assert spec().job_args(tmp_path, resume=False)[3] == "train"
    assert J.SearchSpec.from_dict(json.loads(s.canonical())) == s
    # what search.py parses from that argv is the same request
    from dass_ray.search.cli import parser

    ns = parser().parse_args(a)
    assert request_from_args(ns) == s.request


def test_the_contracts_torch_free_lists_match_the_code():
    """The contract lists remapping schemes, scales and search orders without importing torch; they must match the
    code's."""
    from dass_ray.core.config import SCALES
    from dass_ray.core.remap import schemes
    from dass_ray import contract as C

    assert set(C.REMAP_SCHEMES) == set(schemes())
    assert C.SCALE_SPACES == {name: s.space for name, s in SCALES.items()}
    from dass_ray.core import ranking

    assert C.ORDERS == ranking.ORDERS and C.DEFAULT_ORDER == ranking.DEFAULT_ORDER


def test_jobs_recorded_before_the_contract_still_load():
    old = {"dataset": "sha256:" + "a" * 64, "dataset_path": "/state/blobs/d.parquet", "teacher": "", "teacher_path": "",
           "max_flops": 0, "max_params": 0, "candidates": 24, "top_k": 0, "kd_epochs": 1, "seed": None, "scale": "tiny",
           "dry_run": False}
    s = J.SearchSpec.from_dict(old)
    assert s.train_teacher and s.request.candidates == 24 and s.request.top_k == 5 and s.request.scale == "tiny"
    assert s.request.dataset == "/state/blobs/d.parquet" and s.dataset == old["dataset"]


def _write(path: Path, events: list[dict], tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in events) + tail)


def test_reading_events_holds_back_the_terminal_one(tmp_path):
    p = tmp_path / "events.jsonl"
    assert J.read_search_events(p, 0) == ([], 0, None)
    evs = [{"seq": i, "stage": s, "done": 0, "total": 0, "message": ""} for i, s in enumerate(["validate", "embed"])]
    _write(p, evs, tail=b'{"seq": 2, "sta')  # a line still being written
    got, off, pending = J.read_search_events(p, 0)
    assert [e["stage"] for e in got] == ["validate", "embed"] and pending is None
    assert off == len(p.read_bytes()) - len(b'{"seq": 2, "sta')
    _write(p, evs + [{"seq": 2, "stage": "failed", "message": "boom"}])
    got, off2, pending = J.read_search_events(p, off)
    assert got == [] and off2 == off and pending["message"] == "boom"  # not consumed
    # The search was resumed after that "failed": it is stale and skipped; a torn line is skipped too.
    _write(p, evs + [{"seq": 2, "stage": "failed", "message": "boom"}], tail=b"garbage\n" + json.dumps(
        {"seq": 3, "stage": "kd", "done": 1, "total": 2, "message": ""}).encode() + b"\n")
    got, off3, pending = J.read_search_events(p, off)
    assert [e["stage"] for e in got] == ["kd"] and pending is None and off3 == len(p.read_bytes())


def test_truncate_partial_line(tmp_path):
    p = tmp_path / "events.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b"')
    J.truncate_partial_line(p)
    assert p.read_bytes() == b'{"a": 1}\n'
    J.truncate_partial_line(tmp_path / "missing")  # no error


# ----------------------------------------------------------------------------------------------------------------
# Real searches as detached local processes
# ----------------------------------------------------------------------------------------------------------------


def _procs_with(marker: str, environ: bool = False) -> list[int]:
    """Processes whose command line (or, with `environ`, environment) mentions `marker`."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace") or (
                        environ and marker.encode() in (d / "environ").read_bytes()):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _kill_all(marker: str, environ: bool = False) -> None:
    for pid in _procs_with(marker, environ):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def local_env(monkeypatch):
    """A private Ray temp dir (short: Ray's socket paths are length-limited) so the searches' own local Ray
    instances never touch another Ray on this machine; everything started under it is killed at the end."""
    tmp = tempfile.mkdtemp(prefix="djt")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield tmp
    # everything the searches started: their local Ray's processes name the temp dir on their command lines, but
    # its idle workers ("ray::IDLE") do not -- they carry it in their environment (RAY_TMPDIR), as every process
    # started under this fixture does
    t0 = time.monotonic()
    while _procs_with(tmp, environ=True) and time.monotonic() - t0 < 15:
        _kill_all(tmp, environ=True)
        time.sleep(0.2)
    shutil.rmtree(tmp, ignore_errors=True)


def _runner(state: Path, **kw) -> J.JobRunner:
    extra = ["--encoders", "1", "--predictors", "1"]
    cfg = J.RunnerConfig(poll_s=0.2, extra_args=extra, **kw)
    return J.JobRunner(state, J.LocalBackend(), cfg)


# The search as the runner starts it (scripts/search.py), except that it loses its machine at the named moments:
# each attempt that reaches the next point of $DASS_TEST_KILL_PLAN (a file, one point a line) crosses it off and
# SIGKILLs its whole process group (launcher included, so no exit status is recorded: as a lost worker).
#   between-the-history-files: the history's students file is written, its task file not yet
#   after-the-history-event:   both are written and the "history: ... appended" event is logged; "done" is not
_KILLING_SEARCH = """
import os, signal, sys
from pathlib import Path

from dass_ray.search import history, run
from dass_ray.search.cli import main

plan = Path(os.environ["DASS_TEST_KILL_PLAN"])


def reached(point):
    todo = plan.read_text().split()
    if todo[:1] == [point]:
        plan.write_text("".join(t + "\\n" for t in todo[1:]))
        os.killpg(os.getpgrp(), signal.SIGKILL)


_write = history._write


def write(path, rows, schema):
    _write(path, rows, schema)
    if path.parent.name == "students":
        reached("between-the-history-files")


history._write = write
_emit = run.EventLog.emit


def emit(self, stage, done=0, total=0, message=""):
    _emit(self, stage, done, total, message)
    if message.startswith("history:"):
        reached("after-the-history-event")


run.EventLog.emit = emit
sys.exit(main(sys.argv[1:]))
"""


def _raw_history(hist: Path) -> dict[str, dict[str, list[dict]]]:
    """Every file of a history directory with its rows, read raw: {"students": {file name: rows}, "tasks": ...,
    "other": {...}} -- not through `load_history`, which counts a student recorded twice once."""
    out: dict[str, dict[str, list[dict]]] = {"students": {}, "tasks": {}, "other": {}}
    for f in sorted(p for p in hist.rglob("*") if p.is_file()):
        kind = f.parent.name if f.parent.parent == hist and f.suffix == ".parquet" else "other"
        out.setdefault(kind, {})[str(f.relative_to(hist))] = pq.read_table(f).to_pylist() if kind != "other" else []
    return out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bad_input_fails_with_its_reason_and_jobs_run_one_at_a_time(tmp_path, local_env):
    r = _runner(tmp_path, max_running=1)
    ids = [r.submit("alice", "", spec(dataset_path=str(tmp_path / f"missing-{i}.parquet"), scale="tiny"))[0].job_id
           for i in range(2)]
    most = [0]

    def all_done():
        most[0] = max(most[0], r.store.count(J.RUNNING))
        return all(r.store.get(i).terminal for i in ids)

    r.start()
    try:
        wait_for(all_done, 120, "two failing searches", step=0.05)
    finally:
        r.stop()
    jobs = [r.store.get(i) for i in ids]
    assert most[0] == 1
    assert [j.state for j in jobs] == [J.FAILED] * 2
    assert all("missing-" in j.error and "--dataset" in j.error for j in jobs), [j.error for j in jobs]
    assert jobs[0].finished <= jobs[1].started  # one at a time, in submission order
    for j in jobs:  # every log ends with exactly one terminal event
        evs = r.store.events(j.job_id)
        assert [e.seq for e in evs] == list(range(len(evs)))
        assert [e.terminal for e in evs].count(True) == 1 and evs[-1].stage == "failed"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_search_survives_its_runner_and_resumes_after_being_lost(tmp_path, local_env, monkeypatch):
    """Runner A starts a real tiny search and goes away (a server restart); runner B re-attaches to the still
    running process, which is then killed without an exit status (machine/worker loss) at the risky moments of its
    history append -- right after the students file is written (before the task file), and, relaunched, right after
    the "history ... appended" event (before "done"): each time B launches it again with --resume and it continues
    from its saved stage (the scored candidates and the KD trials are kept), and the client's history still holds
    its students exactly once, counted on disk. (A loss in the middle of KD and the resume from it: the Ray Job
    backend in test_server.py's head-restart test; a lost worker node in test_multinode.py.)"""
    s = spec(teacher_path=str(TEACHER), scale="tiny", candidates=24, top_k=2, kd_epochs=1)
    killing = tmp_path / "killing_search.py"
    killing.write_text(_KILLING_SEARCH)
    plan = tmp_path / "kill-plan"
    plan.write_text("between-the-history-files\nafter-the-history-event\n")
    monkeypatch.setenv("DASS_TEST_KILL_PLAN", str(plan))
    kw = dict(history=True, max_attempts=3, search_cmd=[sys.executable, str(killing)])
    a = _runner(tmp_path, **kw).start()
    job, _ = a.submit("alice", "", s)
    wait_for(lambda: (j := a.store.get(job.job_id)).stage in ("embed", "score", "kd") or j.terminal, 180,
             "the search to start")
    a.stop()
    assert not a.store.get(job.job_id).terminal, a.store.get(job.job_id).error
    b = _runner(tmp_path, **kw).start()
    try:
        j = b.store.get(job.job_id)
        assert j.state == J.RUNNING and j.attempts == 1 and b.backend.poll(j.handle).kind == "running"
        # B keeps recording the re-attached search's events, through its losses, to the end.
        final = wait_for(lambda: (j := b.store.get(job.job_id)).terminal and j, 600, "the resumed search")
    finally:
        b.stop()
    assert final.state == J.SUCCEEDED, final.error
    assert plan.read_text() == "", "a kill point of the history append was never reached"
    assert final.attempts == 3  # killed between the history files, after the history event; then done
    evs = b.store.events(job.job_id)
    assert [e.seq for e in evs] == list(range(len(evs)))
    assert evs[-1].stage == "done" and [e.terminal for e in evs].count(True) == 1
    stages = [e.stage for e in evs]
    i = stages.index("resumed")
    assert "kd" in stages[:i] and "embed" not in stages[i + 1:], stages  # candidates were not scored again
    kd_after = [e.done for e in evs[i:] if e.stage == "kd"]
    assert kd_after and set(kd_after) == {2}, stages  # nor a KD trial run again (top_k 2, both already done)
    out = b.output_dir(job.job_id)
    res = json.loads((out / "result.json").read_text())
    trials = pq.read_table(out / "trials.parquet").to_pylist()
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)  # top_k, each measured once
    assert res["best"]["measured_acc"] == max(t["measured_acc"] for t in trials) > 0.1  # 10 classes: chance 0.1
    assert (out / "student.torchscript.pt").is_file()
    # The client's history got the search's students exactly once, though the search was lost twice in the middle
    # of appending them: one students file and one task file, both named by the run id the search keeps in its
    # state, with one row per measured student and one task row -- counted on disk, file by file.
    run_id = json.loads((out / "state.json").read_text())["run_id"]
    raw = _raw_history(b.history_dir("alice"))
    assert raw["other"] == {}, raw["other"]  # no half-written (.tmp) file left behind
    assert list(raw["students"]) == [f"students/{run_id}.parquet"] and list(raw["tasks"]) == [f"tasks/{run_id}.parquet"]
    (rows,), ((task_row,),) = raw["students"].values(), raw["tasks"].values()
    assert sorted((r["arch_json"], r["best_acc"]) for r in rows) == sorted((t["arch_json"], t["measured_acc"])
                                                                          for t in trials)
    assert {r["job_id"] for r in rows} == {task_row["job_id"]} == {job.job_id}
    from dass_ray.offline.metadataset import load_history

    (task,) = load_history(b.history_dir("alice"))
    assert sorted(task.acc.tolist()) == pytest.approx(sorted(t["measured_acc"] for t in trials))
    appended = [e.message for e in evs if e.stage == "export" and e.message.startswith("history:")]
    assert len(appended) == 2, appended  # the attempt lost right after its event, and the last one
    # The search's own sequence numbers continue across the resume, with no gap.
    seqs = [json.loads(line)["seq"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert seqs == list(range(len(seqs)))


def test_retrain_spec_round_trip_and_arguments(tmp_path):
    r = J.RetrainSpec(episodes=7, seed=3).validate()
    store = J.JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.create("alice", "r1", r)
    assert store.get(job.job_id).spec == r and store.get(job.job_id).spec.kind == "retrain"
    with pytest.raises(J.RequestConflict):  # the same request id for a search is another request
        store.create("alice", "r1", spec())
    a = r.job_args(tmp_path / "out", resume=True, address="auto", history=tmp_path / "h", extra=["--encoders", "1"])
    assert a == ["--history", str(tmp_path / "h"), "--episodes", "7", "--seed", "3", "--output",
                 str(tmp_path / "out"), "--address", "auto"]  # a rerun resumes by itself; search knobs stay out
    from dass_ray.offline.retrain import parser

    ns = parser().parse_args(a)  # what retrain.py reads from that argv
    assert (ns.history, ns.episodes, ns.seed, ns.output, ns.address) == (str(tmp_path / "h"), 7, 3,
                                                                         str(tmp_path / "out"), "auto")
    for bad, field in ((dict(episodes=0), "episodes"), (dict(seed=-1), "seed")):
        with pytest.raises(RequestError) as e:
            J.RetrainSpec(**bad).validate()
        assert e.value.field == field
    store.close()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_retrain_job_whose_ray_head_is_lost_resumes_from_its_checkpoint(tmp_path, ray_head):
    """A retrain of alice's predictor on her history (real rows of two shipped test tasks), run by the runner as a
    Ray Job (`RayJobBackend`, what the server uses): the head node is lost with the job after its first checkpoint
    and comes back; the runner relaunches the job, which continues from that checkpoint, writes v1 once, and its
    events count the episodes without a gap."""
    from dass_ray.offline.retrain import history_from_metadataset

    meta = Path(__file__).resolve().parents[1] / "artifacts" / "metadataset"
    r = J.JobRunner(tmp_path, J.RayJobBackend(ray_head.address), J.RunnerConfig(poll_s=0.2, history=True)).start()
    try:
        hist = r.history_dir("alice")
        history_from_metadataset(meta, ["test-mnist5k-s31-000", "test-omniglot_small-s32-000"], hist, students=20)
        job, _ = r.submit("alice", "", J.RetrainSpec(episodes=8, seed=0))
        j = wait_for(lambda: (j := r.store.get(job.job_id)).terminal and j or (j.stage == "retrain" and j.done >= 3
                                                                               and j), 600, "the first checkpoint")
        assert not j.terminal and j.done < 8, f"the retrain ended before it could be interrupted: {j.error}"
        assert j.backend == "ray" and j.handle == f"dass-{job.job_id}-1"
        ray_head.kill()  # the head node is lost, with the Ray Job's driver and its Ray Train workers
        ray_head.start()
        final = wait_for(lambda: (j := r.store.get(job.job_id)).terminal and j, 600, "the resumed retrain")
    finally:
        r.stop()
    assert final.state == J.SUCCEEDED and final.attempts == 2, final.error
    assert ray_head.job_status(f"dass-{job.job_id}-2") == "SUCCEEDED"
    out = json.loads((r.output_dir(job.job_id) / "retrain.json").read_text())
    assert out["version"] == "v1" and out["resumed_from_episode"] >= 3 and out["config"]["episodes"] == 8
    versions = sorted(p.name for p in (hist / "predictors").glob("v*.pt"))
    assert versions == ["v1.pt"]
    assert json.loads((hist / "predictors" / "v1.json").read_text()) == out
    evs = r.store.events(job.job_id)
    assert [e.seq for e in evs] == list(range(len(evs))) and [e.terminal for e in evs].count(True) == 1
    stages = [e.stage for e in evs]
    i = stages.index("resumed")
    assert "Ray Job" in evs[i].message
    progress_after = [e.done for e in evs[i:] if e.stage == "retrain"]
    assert progress_after and progress_after[0] > 3 and progress_after[-1] == 8  # no episode redone from 0
    assert evs[-1].stage == "done" and "v1" in evs[-1].message
