"""The gRPC front door on a real server bound to a loopback port.

Fast tests talk to a `dass-ray serve` subprocess that never starts Ray (they validate, dry-run and queue). Slow
tests start a Ray head (private temp dir and ports; stopped by killing only the processes it started) and a
`dass-ray serve --address <that head's dashboard>`, which they kill and restart, and run the real
scripts/search.py at the tiny scale as Ray Jobs; one runs searches on the local head a server starts itself.
"""
from __future__ import annotations

import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import grpc
import pytest

from dass_ray.service.client import TERMINAL, ClientError, SearchClient, sha256_file, state_name
from dass_ray.core.data import bundled_path
from dass_ray.v1 import search_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "dass_ray" / "assets" / "teachers" / "mnist5k_cpu.pt"
MNIST = bundled_path("mnist5k")
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef",
          "carol": "carol-token-0123456789abcdef"}
UPLOAD_CAP_MB = 8
TINY = dict(scale="tiny", candidates=24, top_k=2, kd_epochs=1)


# ----------------------------------------------------------------------------------------------------------------
# Processes this module starts (and only those are ever killed)
# ----------------------------------------------------------------------------------------------------------------


from raytools import free_ports, kill_ray, wait_serving, with_env  # noqa: E402  (ray_head: tests/conftest.py)


class Server:
    """`python -m dass_ray.service.cli serve` as a subprocess on a fixed port and state dir (restartable)."""

    def __init__(self, state_dir: Path, token_file: Path, address: str | None, env: dict, extra: tuple = ()):
        self.state_dir, self.token_file, self.address, self.env = state_dir, token_file, address, env
        self.extra = list(extra)  # more `serve` options (a repeated one overrides the default above)
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None
        self.log = state_dir.parent / "server.log"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "dass_ray.service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--state-dir", str(self.state_dir), "--token-file", str(self.token_file), "--grace", "3",
               "--max-upload-mb", str(UPLOAD_CAP_MB), "--encoders", "1", "--predictors", "1", "-v"]
        if self.address:
            cmd += ["--address", self.address]
        cmd += self.extra
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     cwd=str(ROOT))
        wait_serving(f"127.0.0.1:{self.port}", self.proc, self.log)

    def signal(self, sig: int, wait: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=wait)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("auth") / "tokens.txt"
    p.write_text("# client-name token\n" + "".join(f"{k} {v}\n" for k, v in TOKENS.items()))
    return p


@pytest.fixture(scope="module")
def server(token_file, tmp_path_factory):
    """A server without --address: it would start its own local Ray head on the first search, but the fast tests
    here only validate, dry-run and queue, so no head is ever started."""
    state = tmp_path_factory.mktemp("svc") / "state"
    tmp = tempfile.mkdtemp(prefix="dsv")
    srv = Server(state, token_file, None, dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled"))
    srv.start()
    yield srv
    srv.stop()
    kill_ray(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    assert not (state / "ray_head.json").exists(), "a fast test started a Ray head"


@pytest.fixture(scope="module")
def ray_server(ray_head, token_file, tmp_path_factory):
    """A server whose searches run as Ray Jobs on this module's head (`--address`)."""
    state = tmp_path_factory.mktemp("rsvc") / "state"
    srv = Server(state, token_file, ray_head.address, ray_head.env)
    srv.start()
    yield srv
    srv.stop()


def client(srv: Server, who: str = "alice", **kw) -> SearchClient:
    return SearchClient(f"127.0.0.1:{srv.port}", TOKENS.get(who, who), **kw)


@pytest.fixture
def alice(server):
    with client(server, "alice") as c:
        yield c


@pytest.fixture
def ray_alice(ray_server):
    with client(ray_server, "alice") as c:
        yield c


@pytest.fixture
def bob(server):
    with client(server, "bob") as c:
        yield c


def code_of(fn, *a, **kw) -> grpc.StatusCode:
    with pytest.raises(ClientError) as e:
        r = fn(*a, **kw)
        if hasattr(r, "__next__"):
            list(r)
    return e.value.code


def expect(code: grpc.StatusCode, fn, *a, contains: str = "", **kw) -> str:
    with pytest.raises(ClientError) as e:
        r = fn(*a, **kw)
        if hasattr(r, "__next__"):
            list(r)
    assert e.value.code == code, f"expected {code}, got {e.value.code}: {e.value}"
    assert contains in str(e.value), f"{contains!r} not in {e.value}"
    return str(e.value)


def wait_job(c: SearchClient, job_id: str, pred, timeout: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        j = c.get_job(job_id)
        if pred(j):
            return j
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; job: {c.get_job(job_id)}")


def raw_upload(c: SearchClient, messages, method="UploadDataset", timeout=30):
    try:
        return getattr(c.stub, method)(iter(messages), metadata=c._md, timeout=timeout)
    except grpc.RpcError as e:
        raise c._error(e) from None


def header(data: bytes, name="d.parquet", size=None, sha=None) -> pb.UploadChunk:
    import hashlib

    return pb.UploadChunk(header=pb.UploadHeader(filename=name, size_bytes=len(data) if size is None else size,
                                                 sha256=sha or hashlib.sha256(data).hexdigest()))


def small_parquet(rows: int = 30, classes: int = 10, corrupt_row: int | None = None) -> bytes:
    import pyarrow.parquet as pq

    t = pq.read_table(MNIST)
    keep = [i for i in range(t.num_rows) if t["label"][i].as_py() < classes]
    step = max(1, len(keep) // rows)
    t = t.take(keep[::step][:rows])
    if corrupt_row is not None:
        import pyarrow as pa

        imgs = t["image"].to_pylist()
        imgs[corrupt_row] = b"definitely not a PNG"
        t = t.set_column(t.schema.get_field_index("image"), "image", pa.array(imgs, type=t.schema.field("image").type))
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Fast: the service itself
# ----------------------------------------------------------------------------------------------------------------


def test_health_and_reflection_answer_without_a_token(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    hs = health_pb2_grpc.HealthStub(ch)
    for svc in ("", "dass_ray.v1.SearchService"):
        assert hs.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"dass_ray.v1.SearchService", "grpc.health.v1.Health"} <= names
    stub = __import__("dass_ray.v1.search_pb2_grpc", fromlist=["x"]).SearchServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:
        stub.ListJobs(pb.ListJobsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_auth_tokens_and_job_ownership(server, alice, bob, tmp_path):
    for bad in ("wrong-token-0123456789", ""):
        with client(server, bad) as c:
            assert code_of(c.get_job, "abc") == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda: c.watch("abc")) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(c.upload_dataset, MNIST) == grpc.StatusCode.UNAUTHENTICATED
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = __import__("dass_ray.v1.search_pb2_grpc", fromlist=["x"]).SearchServiceStub(ch)
    with pytest.raises(grpc.RpcError) as e:  # a token without the Bearer scheme
        stub.ListJobs(pb.ListJobsRequest(), metadata=(("authorization", TOKENS["alice"]),), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()

    job = alice.submit(dataset_path=str(MNIST), teacher_path=str(TEACHER), dry_run=True, **TINY)
    alice.wait(job.job_id, timeout_s=30)
    for call in (lambda: bob.get_job(job.job_id), lambda: bob.watch(job.job_id), lambda: bob.cancel(job.job_id),
                 lambda: bob.result(job.job_id), lambda: bob.download(job.job_id, "torchscript", tmp_path)):
        assert code_of(call) == grpc.StatusCode.NOT_FOUND
    assert job.job_id not in {j.job_id for j in bob.list_jobs()}
    assert job.job_id in {j.job_id for j in alice.list_jobs()}


def test_uploads_are_validated_and_content_addressed(alice, bob):
    ds = alice.upload_dataset(MNIST)
    assert ds.dataset_id == f"sha256:{sha256_file(MNIST)}"
    assert (ds.num_classes, ds.num_images, ds.image_height, ds.image_width) == (10, 5000, 28, 28)
    assert alice.upload_dataset(MNIST).already_present
    assert not bob.upload_dataset(MNIST).already_present  # ids are per client, storage is shared
    t = alice.upload_teacher(TEACHER)
    assert t.num_classes == 10 and t.space == "cpu" and 0 < t.val_acc <= 1
    # Another client cannot use alice's ids without uploading the bytes itself.
    expect(grpc.StatusCode.NOT_FOUND, SearchClient.submit, bob, dataset_id=ds.dataset_id, teacher_id=t.teacher_id,
           **TINY, contains="teacher_id")


def test_hostile_uploads_answer_the_right_status_and_leave_the_server_healthy(server, alice):
    good = small_parquet()
    cap = UPLOAD_CAP_MB << 20
    chunks = [pb.UploadChunk(data=good[i:i + 4096]) for i in range(0, len(good), 4096)]
    IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    expect(IA, raw_upload, alice, [header(good, sha="0" * 64)] + chunks, contains="sha256")
    expect(IA, raw_upload, alice, [header(good, sha="nothex")] + chunks, contains="sha256")
    expect(RE, raw_upload, alice, [header(good, size=cap + 1)] + chunks, contains="cap")
    expect(IA, raw_upload, alice, [header(good)] + chunks[:-1], contains="truncated")
    expect(IA, raw_upload, alice, [header(good, size=len(good) - 1)] + chunks, contains="more than")
    expect(IA, raw_upload, alice, chunks, contains="header")
    expect(IA, raw_upload, alice, [], contains="header")
    expect(IA, raw_upload, alice, [header(good), header(good)] + chunks, contains="header")
    expect(IA, raw_upload, alice, [header(good, size=0)], contains="size_bytes")
    expect(IA, raw_upload, alice, [header(good, name="d.csv")] + chunks, contains="filename")
    bad = small_parquet(corrupt_row=7)
    msg = expect(IA, raw_upload, alice, [header(bad), pb.UploadChunk(data=bad)], contains="row 7")
    assert "image" in msg and "d.parquet" in msg
    junk = os.urandom(5000)
    for name, method, words in [("t.pt", "UploadTeacher", "t.pt: not a readable teacher checkpoint"),
                                ("d.npz", "UploadDataset", "d.npz: not a readable .npz file (expected a NumPy archive"),
                                ("d.parquet", "UploadDataset", "d.parquet: not a readable Parquet file (expected")]:
        msg = expect(IA, raw_upload, alice, [header(junk, name=name), pb.UploadChunk(data=junk)], method=method,
                     contains=words)  # one line a user understands: no exception text, no server path
        assert "\n" not in msg and "Error" not in msg and str(server.state_dir) not in msg, msg
    # A client that gives up mid-stream: the server drops the partial file (which existed meanwhile).
    gate = threading.Event()

    def slow():
        yield header(good)
        yield chunks[0]
        gate.wait(10)

    tmp = server.state_dir / "tmp"
    assert list(tmp.iterdir()) == []
    fut = alice.stub.UploadDataset.future(slow(), metadata=alice._md, timeout=30)
    t0 = time.monotonic()
    while not list(tmp.iterdir()):  # the server is receiving it into a part file
        assert time.monotonic() - t0 < 30 and not fut.done(), "the partial upload never reached the server"
        time.sleep(0.05)
    fut.cancel()
    gate.set()
    t0 = time.monotonic()
    while list(tmp.iterdir()):  # nothing half-written is left behind
        assert time.monotonic() - t0 < 30, f"partial upload left behind: {list(tmp.iterdir())}"
        time.sleep(0.05)
    assert alice.health() == "SERVING"
    assert alice.upload_dataset(MNIST).num_images == 5000
    assert list(tmp.iterdir()) == []


def test_submit_validation(alice, tmp_path):
    IA, NF, PD = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED
    ok = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER), dry_run=True)
    cases = [
        (dict(teacher_path=str(TEACHER)), IA, "dataset"),
        (dict(dataset_path=str(MNIST)), IA, "teacher"),
        (dict(ok, max_flops=-1), IA, "budget.max_flops"),
        (dict(ok, max_params=-1), IA, "budget.max_params"),
        (dict(ok, candidates=-3), IA, "candidates"),
        (dict(ok, candidates=5, top_k=6), IA, "top_k"),
        (dict(ok, kd_epochs=-1), IA, "kd_epochs"),
        (dict(ok, scale="huge"), IA, "scale"),
        (dict(ok, max_flops=10), IA, "budget"),  # no student is that small
        (dict(ok, request_id="has space"), IA, "request_id"),
        (dict(ok, dataset_path=None, dataset_id="sha256:" + "0" * 64), NF, "dataset_id"),
        (dict(ok, dataset_path=None, dataset_id="nonsense"), IA, "dataset_id"),
        (dict(ok, dataset_path="relative/path.parquet"), IA, "dataset_path"),
        (dict(ok, dataset_path="/etc/passwd"), PD, "dataset_path"),
        (dict(ok, dataset_path=str(MNIST.parent / "../../../../etc/passwd")), PD, "dataset_path"),
        (dict(ok, dataset_path=str(MNIST.parent / "nope.parquet")), NF, "dataset_path"),
        (dict(ok, teacher_path=None, teacher_id="sha256:" + "1" * 64), NF, "teacher_id"),
    ]
    for kw, code, field in cases:
        expect(code, alice.submit, contains=field, **kw)
    # A teacher whose head does not match the dataset's classes is refused at submit.
    three = small_parquet(rows=30, classes=3)
    p = tmp_path / "three.parquet"
    p.write_bytes(three)
    ds = alice.upload_dataset(p)
    assert ds.num_classes == 3
    expect(IA, alice.submit, dataset_id=ds.dataset_id, teacher_path=str(TEACHER), dry_run=True,
           contains="10 classes but the search has 3")
    assert alice.health() == "SERVING"


def test_dry_run_jobs_request_ids_and_listing(alice):
    kw = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER), dry_run=True, **TINY)
    j1 = alice.submit(request_id="dup-1", **kw)
    j2 = alice.submit(request_id="dup-1", **kw)
    assert j1.job_id == j2.job_id  # a retried submit gives the same job
    expect(grpc.StatusCode.INVALID_ARGUMENT, alice.submit, request_id="dup-1", **dict(kw, candidates=30),
           contains="request_id")
    evs = list(alice.watch(j1.job_id))
    assert [e.sequence for e in evs] == list(range(len(evs)))
    assert evs[0].stage == "queued" and evs[-1].state == pb.JOB_STATE_SUCCEEDED
    assert [e.state in TERMINAL for e in evs].count(True) == 1
    assert list(alice.watch(j1.job_id, from_sequence=len(evs) - 1)) == evs[-1:]
    assert list(alice.watch(j1.job_id, from_sequence=len(evs) + 5)) == evs[-1:]  # past the end: how it ended
    expect(grpc.StatusCode.FAILED_PRECONDITION, alice.result, j1.job_id, contains="dry run")
    expect(grpc.StatusCode.FAILED_PRECONDITION, alice.cancel, j1.job_id, contains="finished")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: alice.watch(j1.job_id, from_sequence=-1))
    expect(grpc.StatusCode.INVALID_ARGUMENT, alice.get_job, "", contains="job_id")
    expect(grpc.StatusCode.NOT_FOUND, alice.get_job, "x" * 5000)
    # Listing: newest first, in pages, by state.
    made = [alice.submit(**kw).job_id for _ in range(5)]
    for j in made:
        alice.wait(j, timeout_s=30)
    listed = [j.job_id for j in alice.list_jobs(page_size=2)]
    assert listed[:5] == made[::-1] and len(listed) == len(set(listed))
    pages, token = [], ""  # pages hold page_size jobs each (the last one the rest), more jobs than one page
    while True:
        r = alice._call(alice.stub.ListJobs, pb.ListJobsRequest(page_size=2, page_token=token))
        pages.append([j.job_id for j in r.jobs])
        token = r.next_page_token
        if not token:
            break
    assert len(pages) >= 3 and all(len(p) == 2 for p in pages[:-1]) and len(pages[-1]) in (1, 2), pages
    assert sum(pages, []) == listed
    succeeded = [j for j in alice.list_jobs(states=("succeeded",))]  # (cancelled: the queue test below)
    assert set(made) | {j1.job_id} <= {j.job_id for j in succeeded}
    assert all(state_name(j.state) == "SUCCEEDED" for j in succeeded)
    assert [j.job_id for j in alice.list_jobs(states=("running", "failed", "cancelled"))] == []  # dry runs
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: alice._call(alice.stub.ListJobs,
           pb.ListJobsRequest(page_token="zz")), contains="page_token")
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: alice._call(alice.stub.ListJobs,
           pb.ListJobsRequest(page_size=-1)), contains="page_size")


def test_cli_session_and_one_line_errors(server, tmp_path, capsys):
    from dass_ray.service.cli import main

    tok = tmp_path / "alice.token"
    tok.write_text(TOKENS["alice"] + "\n")
    srv = ["--server", f"127.0.0.1:{server.port}", "--token-file", str(tok)]
    assert main(["submit", *srv, "--dataset", str(MNIST), "--teacher", str(TEACHER), "--dry-run", "--scale", "tiny",
                 "--watch"]) == 0
    out, err = capsys.readouterr()
    job_id = out.split()[0]
    assert "dataset sha256:" in err and "[0] queued" in err and f"job {job_id} succeeded" in out
    assert main(["jobs", *srv]) == 0 and job_id in capsys.readouterr().out
    assert main(["result", job_id, *srv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "FAILED_PRECONDITION" in err and "dry run" in err
    bad = tmp_path / "bad.token"
    bad.write_text("not-a-valid-token-at-all\n")
    for argv, words in [(["jobs", "--server", f"127.0.0.1:{server.port}", "--token-file", str(bad)],
                         "rejected the token"),
                        (["jobs", "--server", f"127.0.0.1:{free_ports(1)[0]}", "--token-file", str(tok),
                          "--timeout", "5"], "cannot reach the server"),
                        (["watch", "0123456789ab", *srv], "NOT_FOUND")]:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dass-ray: error:") and words in err, err


def test_server_process_loads_neither_torch_nor_ray_and_stays_small(server, alice):
    """Uploads are decoded by check worker processes; searches are Ray Jobs submitted over HTTP: the server's own
    process maps no libtorch and no Ray library, even after validating an upload and a teacher."""
    alice.upload_dataset(MNIST)
    alice.upload_teacher(TEACHER)
    pid = server.proc.pid
    libs = {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if ".so" in line}
    heavy = sorted(x for x in libs if "libtorch" in x or "_raylet" in x or "/ray/" in x)
    assert not heavy, heavy
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    assert rss_kb < 300 * 1024, f"server resident size {rss_kb / 1024:.0f} MB"


def test_client_server_and_contract_import_neither_torch_nor_ray():
    code = ("import sys, dass_ray.service.client, dass_ray.service.cli, dass_ray.contract, "
            "dass_ray.service.server; print(','.join(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported: {out}"


def test_every_knob_of_the_contract_is_a_proto_field():
    from dass_ray import contract as C

    sub, spec = pb.SubmitSearchRequest.DESCRIPTOR.fields_by_name, pb.SearchSpec.DESCRIPTOR.fields_by_name
    assert {"readapt", "asha", "remap", "classes", "max_concurrent", "seed", "candidates", "top_k",
            "kd_epochs"} <= set(sub)
    for path in C.proto_fields():
        top = path.split(".")[0]
        assert top in sub and top in spec, path
    req = C.SearchRequest(dataset="d", teacher="t", candidates=50, top_k=3, readapt=True, asha=True, remap="uniform",
                          classes=("a", "b"), max_flops=10**7, seed=7, kd_epochs=2, max_concurrent=3, order="dass")
    m = pb.SubmitSearchRequest()
    C.request_to_proto(req, m)
    assert C.request_from_proto(pb.SubmitSearchRequest.FromString(m.SerializeToString()), dataset="d",
                                teacher="t") == req


def test_limits_unknown_classes_and_undecodable_requests(alice):
    IA, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER), dry_run=True)
    for kw, code, words in [(dict(candidates=2**31 - 1), IA, "candidates"), (dict(kd_epochs=2**31 - 1), IA, "kd_epochs"),
                            (dict(candidates=200_000), RE, "--max-candidates"), (dict(kd_epochs=51), RE, "kd_epochs"),
                            (dict(max_concurrent=300), RE, "max_concurrent"), (dict(remap="nope"), IA, "remap"),
                            (dict(classes=["0", "1", "2"]), IA, "10 classes but the search has 3"),
                            (dict(classes=["zzz", "0"]), IA, "no class 'zzz'"), (dict(classes=["1", "1"]), IA, "twice"),
                            (dict(predictor=str(TEACHER)), IA, "predictor: must be empty")]:
        expect(code, alice.submit, contains=words, **ok, **kw)
    job = alice.submit(**ok, readapt=True, asha=True, remap="uniform", kd_epochs=2, predictor="latest")
    assert (job.spec.readapt, job.spec.asha, job.spec.remap, job.spec.kd_epochs) == (True, True, "uniform", 2)
    assert job.spec.predictor == "latest"
    # Bytes that are no valid message (a string field that is not UTF-8) answer INVALID_ARGUMENT, not INTERNAL.
    raw = alice.channel.unary_unary("/dass_ray.v1.SearchService/SubmitSearch")
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\x0a\x02\xff\xfe", metadata=alice._md, timeout=10)  # field 1 (request_id) = bytes ff fe
    assert e.value.code() == IA and "not a valid dass_ray.v1.SubmitSearchRequest" in e.value.details()
    up = alice.channel.stream_unary("/dass_ray.v1.SearchService/UploadDataset")
    with pytest.raises(grpc.RpcError) as e:  # header.filename = bytes ff fe
        up(iter([b"\x0a\x04\x0a\x02\xff\xfe"]), metadata=alice._md, timeout=10)
    assert e.value.code() == IA and "UploadChunk" in e.value.details()
    assert alice.health() == "SERVING"


def test_retrain_refusals_and_an_empty_predictor_list(alice, bob):
    """What RetrainPredictor refuses before any job exists (the retrain itself runs in the slow test below and in
    test_jobs.py): an empty history, episodes out of range, a bad request id; and no versions yet."""
    FP, IA = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT
    expect(FP, bob.retrain, contains="your search history is empty")
    expect(IA, alice.retrain, episodes=-1, contains="episodes")
    expect(IA, alice.retrain, episodes=100_001, contains="episodes")
    expect(IA, alice.retrain, request_id="has space", contains="request_id")
    assert alice.predictors() == [] and bob.predictors() == []


# ----------------------------------------------------------------------------------------------------------------
# In-process servers (no Ray): queue, deadlines, drain, TLS
# ----------------------------------------------------------------------------------------------------------------


def _inproc(tmp_path, token_file, **kw):
    from dass_ray.service.server import ServerConfig, create_server

    cfg = ServerConfig(state_dir=tmp_path / "state", token_file=token_file, port=0, host="127.0.0.1", **kw)
    return create_server(cfg)


def test_queue_cap_order_deadline_cancel_and_drain(tmp_path, token_file):
    svc, port = _inproc(tmp_path, token_file, max_running=0, max_queued=2, grace_s=2)  # a paused service
    c = SearchClient(f"127.0.0.1:{port}", TOKENS["alice"])
    try:
        kw = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER), **TINY)
        j1, j2 = c.submit(**kw), c.submit(**kw)
        assert (j1.queue_position, j2.queue_position) == (0, 1)
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, c.submit, contains="queue", **kw)
        # Deadlines are honoured: a watch of a job that is not moving ends at the client's deadline.
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(c.stub.WatchJob(pb.WatchJobRequest(job_id=j1.job_id), metadata=c._md, timeout=1.0))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - t0 < 5
        # Cancelling a queued job is immediate and frees its place.
        done = c.cancel(j1.job_id)
        assert state_name(done.state) == "CANCELLED"
        assert [e.stage for e in c.watch(j1.job_id)][-1] == "cancelled"
        assert c.get_job(j2.job_id).queue_position == 0
        j3 = c.submit(**kw)
        # The state filter, on a queue that holds jobs in two states.
        assert [j.job_id for j in c.list_jobs(states=("cancelled",))] == [j1.job_id]
        assert [j.job_id for j in c.list_jobs(states=("queued",))] == [j3.job_id, j2.job_id]
        assert [j.job_id for j in c.list_jobs(states=("queued", "cancelled"))] == [j3.job_id, j2.job_id, j1.job_id]
        assert [j.job_id for j in c.list_jobs(states=("succeeded", "running"))] == []
        # Drain: an open watcher is told to come back, new work is refused, queued jobs are kept.
        errs, seen = [], []

        def watcher():
            try:
                for ev in c.watch(j2.job_id, reconnect=False):
                    seen.append(ev)
            except ClientError as e:
                errs.append(e.code)

        th = threading.Thread(target=watcher)
        th.start()
        t0 = time.monotonic()
        while not seen:  # the watch is open: it has streamed the job's first event
            assert time.monotonic() - t0 < 30 and th.is_alive(), "the watch did not start"
            time.sleep(0.05)
        svc.servicer.draining.set()
        svc.runner.drain()
        expect(grpc.StatusCode.UNAVAILABLE, c.upload_dataset, MNIST, contains="shutting down")
        t0 = time.monotonic()
        svc.stop()
        th.join(10)
        assert errs == [grpc.StatusCode.UNAVAILABLE] and time.monotonic() - t0 < 10
    finally:
        c.close()
        svc.stop()
    svc2, port2 = _inproc(tmp_path, token_file, max_running=0)
    try:
        with SearchClient(f"127.0.0.1:{port2}", TOKENS["alice"]) as c2:
            assert [state_name(c2.get_job(j.job_id).state) for j in (j1, j2, j3)] == ["CANCELLED", "QUEUED",
                                                                                     "QUEUED"]
    finally:
        svc2.stop()


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    kp, cp = tmp_path / "key.pem", tmp_path / "cert.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cp, kp


def test_tls_with_a_self_signed_certificate(tmp_path, token_file):
    pytest.importorskip("cryptography")
    cert, key = _self_signed(tmp_path)
    svc, port = _inproc(tmp_path, token_file, tls_cert=cert, tls_key=key)
    try:
        with SearchClient(f"localhost:{port}", TOKENS["alice"], tls_ca=cert) as c:
            assert c.health() == "SERVING"
            job = c.submit(dataset_path=str(MNIST), teacher_path=str(TEACHER), dry_run=True)
            assert state_name(c.wait(job.job_id, timeout_s=30).state) == "SUCCEEDED"
        with SearchClient(f"localhost:{port}", TOKENS["alice"], timeout=3) as plain:  # no TLS: refused
            assert code_of(plain.get_job, job.job_id) == grpc.StatusCode.UNAVAILABLE
    finally:
        svc.stop()


# ----------------------------------------------------------------------------------------------------------------
# What a client can see and learn (issue 29, items 9-12)
# ----------------------------------------------------------------------------------------------------------------


def test_contract_details_as_a_client_sees_them(alice):
    IA = grpc.StatusCode.INVALID_ARGUMENT
    ok = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER), dry_run=True)
    # SearchSpec.seed is set only when the submit gave one (0 included).
    assert not alice.submit(**ok).spec.HasField("seed")
    j0 = alice.submit(**ok, seed=0)
    assert j0.spec.HasField("seed") and j0.spec.seed == 0
    got = alice.get_job(j0.job_id).spec
    assert got.HasField("seed") and got.seed == 0
    assert alice.submit(**ok, seed=7).spec.seed == 7
    # Range messages give the bounds a client may send (0: the default) and write integers out.
    for kw, field, bounds in [(dict(candidates=-3), "candidates", "[0, 1000000] (0: default)"),
                              (dict(top_k=-1), "top_k", "[0, 10000] (0: default)"),
                              (dict(seed=2**32), "seed", "[0, 4294967295]"),
                              (dict(max_flops=-1), "budget.max_flops", "[0, 1000000000000000] (0: no limit)")]:
        msg = expect(IA, alice.submit, **ok, **kw, contains=field)
        assert bounds in msg and "e+" not in msg, msg
    msg = expect(IA, alice.retrain, episodes=-1, contains="episodes")
    assert "[0, 100000] (0: 100)" in msg, msg
    from dass_ray import contract as C  # the same bounds from the command line (scripts/search.py --seed)

    with pytest.raises(C.RequestError, match=r"seed must be in \[0, 4294967295\], got 4294967296"):
        C.SearchRequest(dataset="d", teacher="t", seed=2**32).validate()
    # ListJobs: a page_size over the .proto's bound (500) is refused, not clamped.
    msg = expect(IA, lambda: alice._call(alice.stub.ListJobs, pb.ListJobsRequest(page_size=501)),
                 contains="page_size")
    assert "[0, 500]" in msg, msg
    assert len(alice._call(alice.stub.ListJobs, pb.ListJobsRequest(page_size=500)).jobs) >= 3
    # WatchJob from past the end of a finished job answers its terminal event (how it ended), not nothing.
    alice.wait(j0.job_id, timeout_s=30)
    evs = list(alice.watch(j0.job_id))
    assert evs[-1].state == pb.JOB_STATE_SUCCEEDED
    raw = list(alice.stub.WatchJob(pb.WatchJobRequest(job_id=j0.job_id, from_sequence=len(evs) + 5),
                                   metadata=alice._md, timeout=10))
    assert raw == evs[-1:]
    assert list(alice.watch(j0.job_id, from_sequence=len(evs) + 5)) == evs[-1:]


def test_a_class_with_one_image_is_refused_before_any_search_runs(alice, tmp_path):
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(small_parquet(rows=30, classes=3)))
    labels = t["label"].to_pylist()
    lonely = t["label_name"][labels.index(2)].as_py()
    p = tmp_path / "lonely.parquet"
    pq.write_table(t.take(sorted([i for i, y in enumerate(labels) if y != 2] + [labels.index(2)])), p)
    ds = alice.upload_dataset(p)  # a subset of its classes can still be searched
    assert ds.num_classes == 3 and ds.num_images == labels.count(0) + labels.count(1) + 1
    msg = expect(grpc.StatusCode.INVALID_ARGUMENT, alice.submit, dataset_id=ds.dataset_id, train_teacher=True,
                 dry_run=True, contains="1 image")
    assert f"'{lonely}'" in msg and "at least 2" in msg, msg
    expect(grpc.StatusCode.INVALID_ARGUMENT, alice.submit, dataset_id=ds.dataset_id, train_teacher=True,
           dry_run=True, classes=["0", "2"], contains="1 image")
    job = alice.submit(dataset_id=ds.dataset_id, train_teacher=True, dry_run=True, classes=["0", "1"])
    assert state_name(alice.wait(job.job_id, timeout_s=30).state) == "SUCCEEDED"


def test_an_upload_is_judged_by_its_own_name_whoever_sent_the_bytes_first(server, alice, bob, tmp_path):
    data = small_parquet(rows=40)  # bytes no other test uploads
    p = tmp_path / "d.parquet"
    p.write_bytes(data)

    def as_npz(c: SearchClient) -> str:
        return expect(grpc.StatusCode.INVALID_ARGUMENT, raw_upload, c,
                      [header(data, name="d.npz"), pb.UploadChunk(data=data)], contains="d.npz")

    with client(server, "carol") as carol:
        first = as_npz(carol)  # nobody has these bytes yet: Parquet bytes are no .npz
        assert not alice.upload_dataset(p).already_present  # alice uploads them as what they are
        assert as_npz(bob) == first  # bob cannot learn that alice has them
        assert as_npz(alice) == first  # and alice's own copy does not make them an .npz either
        assert as_npz(carol) == first
        assert alice.upload_dataset(p).already_present and not bob.upload_dataset(p).already_present


def test_permission_denied_names_no_server_directory(alice):
    from dass_ray.service.server import default_data_roots

    msg = expect(grpc.StatusCode.PERMISSION_DENIED, alice.submit, dataset_path="/etc/passwd",
                 teacher_path=str(TEACHER), dry_run=True, contains="dataset_path: /etc/passwd")
    for root in default_data_roots():
        assert str(root) not in msg, msg
    assert "--data-root" in msg or "allowed" in msg, msg


def _finished_search(svc, owner: str, files: dict[str, bytes]) -> str:
    """A SUCCEEDED search job with these output files, recorded straight in the server's job table (a real search
    writes the same files: tests/test_search.py)."""
    from dass_ray import contract as C
    from dass_ray.service import jobs as J

    req = C.SearchRequest(dataset=str(MNIST), teacher=str(TEACHER), scale="tiny")
    job, _ = svc.runner.store.create(owner, "", J.SearchSpec(dataset=str(MNIST), request=req, teacher=str(TEACHER)))
    out = svc.runner.output_dir(job.job_id)
    out.mkdir(parents=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    assert svc.runner.store.append(job.job_id, [{"stage": "done", "message": "search finished",
                                                 "state": J.SUCCEEDED}], state=J.SUCCEEDED, finished=time.time())
    return job.job_id


def test_downloaded_tables_carry_no_server_path(tmp_path, token_file):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dass_ray import contract as C

    svc, port = _inproc(tmp_path, token_file, max_running=0)
    try:
        out_of = lambda j: svc.runner.output_dir(j)  # noqa: E731
        job_id = _finished_search(svc, "alice", {})
        out = out_of(job_id)
        ck = str(out / "tune" / "kd" / "kd_trainable_ab12_1_index=4" / "checkpoint_000000")
        trials = pa.Table.from_pylist([
            {"index": 4, "arch_json": "{}", "measured_acc": 0.7, "status": "ok", "trial_id": "ab12", "checkpoint": ck},
            {"index": 5, "arch_json": "{}", "measured_acc": None, "status": "failed", "trial_id": "cd34",
             "checkpoint": "/elsewhere/on/the/server/checkpoint_000001"},
            {"index": 6, "arch_json": "{}", "measured_acc": None, "status": "failed", "trial_id": "ef56",
             "checkpoint": None}])
        buf = io.BytesIO()
        pq.write_table(trials, buf)
        (out / "trials.parquet").write_bytes(buf.getvalue())
        best = C.StudentResult(arch={"widths": [[8]]}, arch_json='{"widths":[[8]]}', measured_acc=0.7,
                               predicted_acc=0.6, flops=10, params=5, index=4, predicted_rank=0)
        C.SearchResult(best=best, teacher_acc=0.9, teacher_flops=100, teacher_params=50, candidates=8, top_k=2,
                       trials=[], request=C.SearchRequest(dataset=str(MNIST), teacher=str(TEACHER)).to_dict(),
                       input_spec=C.InputSpec(28, 28, 1, 32), class_names=["a", "b"]).write(out / C.RESULT_FILE)
        with SearchClient(f"127.0.0.1:{port}", TOKENS["alice"]) as c:
            path = c.download(job_id, "trials", tmp_path / "dl")
            got = pq.read_table(path)
            assert got.column_names == trials.column_names and got.num_rows == 3
            assert got["checkpoint"].to_pylist() == ["tune/kd/kd_trainable_ab12_1_index=4/checkpoint_000000", "",
                                                     None]
            for col in ("index", "arch_json", "measured_acc", "status", "trial_id"):
                assert got[col].to_pylist() == trials[col].to_pylist()
            text = json.dumps(got.to_pylist())
            assert str(tmp_path) not in text and "/elsewhere" not in text, text
            # The listing announces the size of the file the client gets.
            (art,) = [a for a in c.result(job_id).artifacts if a.filename == "trials.parquet"]
            assert art.size_bytes == path.stat().st_size
        assert (out / "trials.parquet").read_bytes() == buf.getvalue()  # the search's own file is untouched
    finally:
        svc.stop()


class FakeRayJobs:
    """The Ray Jobs REST API of a head (submit, status, stop, logs) on loopback, whose jobs run until stopped: for
    tests of the server's own scheduling, where no search needs to run."""

    def __init__(self):
        import http.server
        import json

        self.jobs: dict[str, str] = {}  # submission id -> status
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                parts = self.path.strip("/").split("/")
                if parts == ["api", "version"]:
                    return self._send(200, {"version": "fake"})
                st = fake.jobs.get(parts[2]) if len(parts) >= 3 else None
                if st is None:
                    return self._send(404, {"error": "no such job"})
                self._send(200, {"logs": ""} if parts[-1] == "logs" else {"status": st})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                parts = self.path.strip("/").split("/")
                if parts == ["api", "jobs"]:
                    fake.jobs[body["submission_id"]] = "RUNNING"
                    return self._send(200, {"submission_id": body["submission_id"]})
                if len(parts) == 4 and parts[3] == "stop" and parts[2] in fake.jobs:
                    fake.jobs[parts[2]] = "STOPPED"
                    return self._send(200, {"stopped": True})
                self._send(404, {"error": "unknown"})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def test_per_client_queue_and_running_limits_and_fair_order(tmp_path, token_file):
    """`--max-queued` and `--max-running-per-client` hold per client: one client's queue cannot lock the others
    out, and a freed slot goes to the client with the fewest running jobs (then the longest waiting)."""
    ray = FakeRayJobs()
    svc, port = _inproc(tmp_path, token_file, address=ray.address, max_running=2, max_running_per_client=1,
                        max_queued=2)
    a, b, c = (SearchClient(f"127.0.0.1:{port}", TOKENS[w]) for w in ("alice", "bob", "carol"))
    try:
        kw = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER), **TINY)
        running = lambda j: state_name(j.state) == "RUNNING"  # noqa: E731
        a1 = a.submit(**kw).job_id
        wait_job(a, a1, running, 30, "alice's first job to start")
        a2, a3 = a.submit(**kw).job_id, a.submit(**kw).job_id
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, a.submit, **kw, contains="your queue")  # her own limit
        b1 = b.submit(**kw).job_id  # alice's full queue does not lock bob or carol out
        c1 = c.submit(**kw).job_id
        wait_job(b, b1, running, 30, "bob's job to take the free slot")
        # alice runs her one job: the free slot went to bob, though her jobs were queued first
        assert [state_name(a.get_job(j).state) for j in (a1, a2, a3)] == ["RUNNING", "QUEUED", "QUEUED"]
        # fair order: carol, who runs nothing, is next; then alice's jobs, in her order
        assert [x.get_job(j).queue_position for x, j in ((c, c1), (a, a2), (a, a3))] == [0, 1, 2]
        b.cancel(b1)
        wait_job(c, c1, running, 30, "carol's job to take bob's slot")
        assert state_name(a.get_job(a2).state) == "QUEUED" and a.get_job(a2).queue_position == 0
        a.cancel(a1)
        wait_job(a, a2, running, 30, "alice's next job once her first one ended")
        assert sorted(k for k, v in ray.jobs.items() if v == "RUNNING") == sorted(
            f"dass-{j}-1" for j in (c1, a2))
    finally:
        for x in (a, b, c):
            x.close()
        svc.stop()
        ray.close()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_ray_head_is_stopped_whole(tmp_path, monkeypatch):
    """The local head a server starts (and any head this module starts) is stopped with nothing left running: the
    Ray Client server of a head (`ray.util.client.server --address=...`, re-parented to init when `ray start`
    exits) names no directory of the head, so stopping by command line alone left it behind."""
    from dass_ray.service.jobs.rayhead import LocalRayHead

    tmp = tempfile.mkdtemp(prefix="dh")  # short: Ray's socket paths are length-limited
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "state").mkdir()
    head = LocalRayHead(tmp_path / "state", num_cpus=1)
    try:
        try:
            assert head.address().startswith("http://127.0.0.1:")
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{e}\n{head.log_file.read_text()[-3000:] if head.log_file.exists() else ''}")
        started = list(with_env(f"RAY_TMPDIR={tmp}").values())
        assert any("gcs_server" in c for c in started) and any("ray.util.client.server" in c for c in started)
        kill_ray(tmp)
        left = with_env(f"RAY_TMPDIR={tmp}")
        assert left == {}, f"left running: {left}"
    finally:
        for pid in with_env(f"RAY_TMPDIR={tmp}"):  # whatever happened above
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def test_sigterm_keeps_the_port_and_answers_the_drain_status(token_file, tmp_path):
    """After SIGTERM the server keeps its port while in-flight calls finish: new calls are answered UNAVAILABLE
    ("shutting down", health NOT_SERVING), not refused by a closed port; then it exits 0."""
    srv = Server(tmp_path / "state", token_file, None, dict(os.environ, RAY_AUTH_MODE="disabled"),
                 extra=("--grace", "60"))
    srv.start()
    data = small_parquet(rows=30)
    gate = threading.Event()

    def slow():
        yield header(data)
        yield pb.UploadChunk(data=data[:1000])
        gate.wait(60)
        yield pb.UploadChunk(data=data[1000:])

    try:
        with client(srv) as c, client(srv, timeout=5) as c2:
            fut = c.stub.UploadDataset.future(slow(), metadata=c._md, timeout=90)
            t0 = time.monotonic()
            while not list((srv.state_dir / "tmp").iterdir()):  # the upload is in flight: its part file exists
                assert time.monotonic() - t0 < 30 and not fut.done(), "the upload never started"
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            while True:
                try:
                    status = c2.health()
                except ClientError as e:
                    pytest.fail(f"the port closed while a call was in flight: {e}")
                if status != "SERVING":
                    break
                assert time.monotonic() - t0 < 30, "SIGTERM was not acted on"
            assert status == "NOT_SERVING"
            expect(grpc.StatusCode.UNAVAILABLE, c2.submit, dataset_path=str(MNIST), teacher_path=str(TEACHER),
                   dry_run=True, contains="shutting down")
            expect(grpc.StatusCode.UNAVAILABLE, c2.upload_dataset, MNIST, contains="shutting down")
            assert srv.proc.poll() is None
            gate.set()
            assert fut.result(timeout=60).num_images == 30  # the call in flight finished normally
        assert srv.proc.wait(timeout=60) == 0
    finally:
        gate.set()
        srv.stop()


# ----------------------------------------------------------------------------------------------------------------
# Slow: real searches as Ray Jobs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_end_to_end_across_server_restarts(ray_server, ray_head, ray_alice, tmp_path):
    server, alice = ray_server, ray_alice
    """upload -> submit -> watch (SIGTERM drain, then SIGKILL, each followed by a restart, while a reconnecting
    watcher follows) -> result -> download a TorchScript student that runs with plain torch."""
    ds = alice.upload_dataset(MNIST)
    t = alice.upload_teacher(TEACHER)
    job = alice.submit(dataset_id=ds.dataset_id, teacher_id=t.teacher_id, request_id="e2e-1", **TINY)
    assert alice.submit(dataset_id=ds.dataset_id, teacher_id=t.teacher_id, request_id="e2e-1", **TINY).job_id \
        == job.job_id
    got, errors = [], []

    def follow():
        try:
            with client(server, "alice") as c:
                for ev in c.watch(job.job_id, give_up_after_s=180):
                    got.append(ev)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=follow)
    th.start()
    j = wait_job(alice, job.job_id, lambda j: j.stage in ("validate", "embed", "score", "kd") or
                 j.state in TERMINAL, 300, "the search to report progress")
    # SIGKILL mid-job: nothing is lost, the restarted server re-attaches to the running Ray Job.
    assert state_name(j.state) == "RUNNING", j.error
    server.signal(signal.SIGKILL)
    assert ray_head.job_status(f"dass-{job.job_id}-1") in ("RUNNING", "SUCCEEDED")
    server.start()
    seen = alice.get_job(job.job_id).last_sequence
    j = wait_job(alice, job.job_id, lambda j: j.last_sequence > seen or j.state in TERMINAL, 120, "more progress")
    # SIGTERM: the server drains and exits cleanly; the Ray Job keeps running.
    assert server.signal(signal.SIGTERM) == 0
    if j.state not in TERMINAL:
        assert ray_head.job_status(f"dass-{job.job_id}-1") in ("RUNNING", "SUCCEEDED")
    server.start()
    th.join(300)
    assert not errors, errors
    assert [e.sequence for e in got] == list(range(len(got)))  # no gap, no repeat across the restarts
    assert got[-1].stage == "done" and got[-1].state == pb.JOB_STATE_SUCCEEDED
    stages = [e.stage for e in got]
    assert stages.index("validate") < stages.index("score") < stages.index("kd") < stages.index("export")
    # A fresh watcher from the middle gets exactly the rest.
    mid = len(got) // 2
    assert [e.sequence for e in alice.watch(job.job_id, from_sequence=mid)] == list(range(mid, len(got)))
    final = alice.get_job(job.job_id)
    assert state_name(final.state) == "SUCCEEDED" and final.attempts == 1  # re-attached, never relaunched
    r = alice.result(job.job_id)
    assert 0 <= r.best.measured_acc <= 1 and math.isfinite(r.best.predicted_acc) and r.best.flops > 0
    assert r.best.params > 0 and len(r.best.depths) == 4 and r.top_k == 2 and r.candidates == 24
    assert 0 < r.teacher_acc <= 1 and r.timings_s
    assert {a.filename for a in r.artifacts} >= {"student.torchscript.pt", "student.pt", "report.png",
                                                  "candidates.parquet", "trials.parquet"}
    path = alice.download(job.job_id, "torchscript", tmp_path)
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch suggests torch.export; TorchScript is the contract
        model = torch.jit.load(str(path))
    out = model(torch.zeros(2, 28, 28, 1, dtype=torch.uint8))  # mnist5k images at their native size
    assert out.shape == (2, 10)
    assert alice.download(job.job_id, "report", tmp_path).read_bytes()[:4] == b"\x89PNG"


def _search_running(c, job_id):
    return wait_job(c, job_id, lambda j: j.stage in ("embed", "score", "kd") or j.state in TERMINAL, 300,
                    "the search to start")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_cancel_a_running_search(ray_server, ray_head, ray_alice, capsys, monkeypatch):
    server, alice = ray_server, ray_alice
    job = alice.submit(dataset_path=str(MNIST), teacher_path=str(TEACHER), **dict(TINY, top_k=4, kd_epochs=3))
    j = _search_running(alice, job.job_id)
    assert state_name(j.state) == "RUNNING", j.error
    c = alice.cancel(job.job_id)
    assert c.cancel_requested or state_name(c.state) == "CANCELLED"
    final = alice.wait(job.job_id, timeout_s=120)
    assert state_name(final.state) == "CANCELLED"
    evs = list(alice.watch(job.job_id))
    assert evs[-1].stage == "cancelled" and [e.state in TERMINAL for e in evs].count(True) == 1
    assert ray_head.job_status(f"dass-{job.job_id}-{final.attempts}") in ("STOPPED", "FAILED")
    expect(grpc.StatusCode.FAILED_PRECONDITION, alice.cancel, job.job_id)
    expect(grpc.StatusCode.FAILED_PRECONDITION, alice.result, job.job_id, contains="CANCELLED")
    from dass_ray.service.cli import main  # the CLI states how the job ended, in one line, and exits 1

    monkeypatch.setenv("DASS_RAY_TOKEN", TOKENS["alice"])
    monkeypatch.delenv("DASS_RAY_TOKEN_FILE", raising=False)
    capsys.readouterr()
    assert main(["watch", job.job_id, "--server", f"127.0.0.1:{server.port}"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"dass-ray: job {job.job_id} cancelled: cancelled by the client", err[-1]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ray_head_restart_resumes_from_the_saved_stage(ray_server, ray_head, ray_alice, tmp_path):
    alice = ray_alice
    job = alice.submit(dataset_path=str(MNIST), teacher_path=str(TEACHER), **TINY)
    wait_job(alice, job.job_id, lambda j: j.stage == "kd" or j.state in TERMINAL, 300, "the KD stage")
    j = alice.get_job(job.job_id)
    assert state_name(j.state) == "RUNNING", f"ended before the head could be killed: {j.error}"
    ray_head.kill()  # the head node is lost, with its in-flight Ray Jobs
    ray_head.start()
    final = alice.wait(job.job_id, timeout_s=400)
    assert state_name(final.state) == "SUCCEEDED", final.error
    assert final.attempts == 2
    evs = list(alice.watch(job.job_id))
    stages = [e.stage for e in evs]
    assert [e.sequence for e in evs] == list(range(len(evs)))
    i = stages.index("resumed")
    assert "kd" in stages[:i] and "embed" not in stages[i + 1:], stages  # scored candidates were kept
    best = alice.result(job.job_id).best
    import pyarrow.parquet as pq

    trials = pq.read_table(alice.download(job.job_id, "trials", tmp_path)).to_pylist()
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)  # top_k, each measured once
    assert best.measured_acc == max(t["measured_acc"] for t in trials) > 0.1  # 10 classes: chance 0.1
    for t in trials:  # a real search's checkpoints, named relative to its output (no server path)
        assert t["checkpoint"] and not t["checkpoint"].startswith("/") and "://" not in t["checkpoint"], t
        assert str(ray_server.state_dir) not in str(t), t


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_server_without_address_runs_searches_as_ray_jobs_on_its_own_head(token_file, tmp_path):
    """Re-adaptation and ASHA, set through the proto, reach the search; both searches run as Ray Jobs on the one
    local head the server started on its first search (the second reuses it). Then a retrain of the client's
    history, whose one task leaves none held out: the version is written but never promoted ("latest" stays the
    shipped predictor), and the job leaves no actor of Ray Train's on the head."""
    import json

    tmp = tempfile.mkdtemp(prefix="dlh")
    srv = Server(tmp_path / "state", token_file, None,
                 dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0"))
    srv.start()
    try:
        with client(srv) as c:
            kw = dict(dataset_path=str(MNIST), teacher_path=str(TEACHER))
            j1 = c.submit(**kw, **dict(TINY, top_k=3), readapt=True, predictor="latest")  # none retrained yet
            j2 = c.submit(**kw, **dict(TINY, kd_epochs=2), asha=True, seed=1)
            for j, words in ((j1, "re-ranking the rest after each"), (j2, "ASHA early stopping")):
                final = c.wait(j.job_id, timeout_s=900)
                assert state_name(final.state) == "SUCCEEDED", final.error
                evs = list(c.watch(j.job_id))
                assert any(words in e.message for e in evs), [e.message for e in evs]
                r = c.result(j.job_id)
                assert (r.spec.readapt, r.spec.asha) == ((True, False) if j is j1 else (False, True))
                assert (r.input_spec.height, r.input_spec.width, r.input_spec.channels) == (28, 28, 1)
                assert len(r.class_names) == 10 and set(r.timings_s) <= {"teacher", "score", "kd", "export"}
                doc = json.loads(r.result_json)
                assert doc["request"]["readapt"] == (j is j1) and doc["request"]["dataset"] == str(MNIST)
                # which predictor version ranked the candidates: alice has none retrained, so the shipped one
                assert (doc["request"]["predictor"], doc["predictor_version"]) == (
                    ("latest" if j is j1 else ""), "shipped")
                for text in [r.result_json] + [e.message for e in evs]:  # no server path reaches the client
                    assert str(srv.state_dir) not in text, text
        # Each search appended its students to alice's own history (one task: same data, teacher and classes,
        # though the two searches' seeds, and so the images they drew, differ).
        import hashlib

        from dass_ray.offline.metadataset import load_history

        (hdir,) = (srv.state_dir / "history").iterdir()
        assert hdir.name == hashlib.sha256(b"alice").hexdigest()[:16]
        (task,) = load_history(hdir)
        assert len(task.acc) >= 3 and task.role == "history"
        # Alice retrains her predictor on that history (a Ray Job on the same head); Bob, with no history, cannot,
        # and never sees her versions.
        with client(srv) as c, client(srv, "bob") as b:
            rj = c.retrain(episodes=4, request_id="rt-1")
            assert rj.kind == pb.JOB_KIND_RETRAIN and rj.retrain.episodes == 4
            assert c.retrain(episodes=4, request_id="rt-1").job_id == rj.job_id  # idempotent
            final = c.wait(rj.job_id, timeout_s=900)
            assert state_name(final.state) == "SUCCEEDED", final.error
            evs = list(c.watch(rj.job_id))
            assert [e.done for e in evs if e.stage == "retrain"][-1] == 4 and evs[-1].stage == "done"
            expect(grpc.StatusCode.FAILED_PRECONDITION, c.result, rj.job_id, contains="not a search")
            (v,) = c.predictors()
            assert v.version == "v1" and v.parent_version == "shipped" and v.history_tasks == 1
            assert v.history_students == len(task.acc)
            assert not v.promoted and not v.latest  # one task: none held out to judge it on, never promoted
            assert "no held-out task" in json.loads(v.manifest_json)["promotion"]
            assert str(srv.state_dir) not in v.manifest_json
            expect(grpc.StatusCode.FAILED_PRECONDITION, b.retrain, contains="history is empty")
            assert b.predictors() == []
            expect(grpc.StatusCode.NOT_FOUND, b.get_job, rj.job_id)
        head = json.loads((srv.state_dir / "ray_head.json").read_text())
        from ray.job_submission import JobSubmissionClient

        ids = {x.submission_id for x in JobSubmissionClient(head["dashboard"]).list_jobs()}
        assert {f"dass-{j1.job_id}-1", f"dass-{j2.job_id}-1", f"dass-{rj.job_id}-1"} <= ids
        # the retrain job left no actor of Ray Train's on the head
        from ray.util.state import list_actors

        alive = [a.class_name for a in list_actors(address=head["dashboard"], filters=[("state", "=", "ALIVE")])]
        if {"_AutoscalingCoordinatorActor", "TrainController"} & set(alive):
            logs = JobSubmissionClient(head["dashboard"]).get_job_logs(f"dass-{rj.job_id}-1")
            pytest.fail(f"left on the head after the retrain job: {alive}; the job's log ends:\n{logs[-3000:]}")
    finally:
        srv.stop()
        kill_ray(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _uncommented(lines: list[str]) -> list[str]:
    import re

    decl = re.compile(r"^\s*(rpc\s+\w+|(optional\s+|repeated\s+)?[\w.<>, ]+\s+\w+\s*=\s*\d+;|[A-Z0-9_]+\s*=\s*\d+;)")
    return [f"{i + 1}: {line.strip()}" for i, line in enumerate(lines)
            if decl.match(line) and "UNSPECIFIED" not in line
            and not (i > 0 and lines[i - 1].strip().startswith("//"))]


def test_every_rpc_and_field_of_the_proto_is_commented():
    """The .proto is the contract for clients in other languages: every RPC, message field and enum value
    carries a comment on the line above it."""
    assert _uncommented(["message A {", "  // ok", "  int64 a = 1;", "  string b = 2;", "  C c = 3;",
                         "  X_ONE = 1;"]) == ["4: string b = 2;", "5: C c = 3;", "6: X_ONE = 1;"]
    lines = (ROOT / "proto" / "dass_ray" / "v1" / "search.proto").read_text().splitlines()
    bare = _uncommented(lines)
    assert not bare, "uncommented declarations:\n" + "\n".join(bare)
