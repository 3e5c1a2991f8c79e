"""Python client of the dass_ray search service (proto/dass_ray/v1/search.proto).

    with SearchClient("host:50051", token) as c:
        ds = c.upload_dataset("mnist.parquet")
        job = c.submit(dataset_id=ds.dataset_id, train_teacher=True, max_flops=20_000_000)
        for ev in c.watch(job.job_id):          # reconnects with no gap and no repeat
            print(ev.sequence, ev.stage, ev.done, ev.total)
        res = c.result(job.job_id)
        c.download(job.job_id, "torchscript", "out/")

Every failure is a `ClientError` with a one-line message and the gRPC status code. Needs grpcio and protobuf
only (no Ray, no torch).
"""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dass_ray.fileutil import sha256_file
from dass_ray.contract import ARTIFACTS as CONTRACT_ARTIFACTS
from dass_ray.contract import set_proto_knobs

try:
    from dass_ray.v1 import search_pb2 as pb
    from dass_ray.v1 import search_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover
    raise ImportError(f"the generated gRPC code is missing ({e}); run `make proto` "
                      f"(python scripts/gen_proto.py)") from None

CHUNK = 1 << 20
STATES = {"queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING, "succeeded": pb.JOB_STATE_SUCCEEDED,
          "failed": pb.JOB_STATE_FAILED, "cancelled": pb.JOB_STATE_CANCELLED}
TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
ARTIFACTS = {kind: getattr(pb, f"ARTIFACT_KIND_{kind.upper()}") for kind in CONTRACT_ARTIFACTS}


def state_name(state: int) -> str:
    """"SUCCEEDED" for pb.JOB_STATE_SUCCEEDED, etc."""
    return pb.JobState.Name(state).removeprefix("JOB_STATE_")


class ClientError(Exception):
    """A failed call: `code` is the gRPC status code (None for local errors), str() one line."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


def read_token(path: str | Path) -> str:
    """A client token file holds the token alone, or one `client-name token` line (the server's format)."""
    p = Path(path).expanduser()
    try:
        lines = [ln.split() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise ClientError(f"cannot read the token file {p}: {e.strerror}") from None
    if not lines or len(lines[0]) not in (1, 2):
        raise ClientError(f"{p}: expected a token, or one 'client-name token' line")
    return lines[0][-1]


class SearchClient:
    """A connection to one server. `token` is sent as `authorization: Bearer <token>` on every call; `tls_ca`
    (PEM bytes or a file) turns on TLS checked against that CA; `tls=True` uses the system's roots. `timeout` is
    the deadline of each unary call, in seconds."""

    def __init__(self, target: str, token: str, *, tls: bool = False, tls_ca: bytes | str | Path | None = None,
                 server_name: str | None = None, timeout: float = 60.0):
        self.target, self.timeout = target, timeout
        self._md = (("authorization", f"Bearer {token}"),)
        opts = [("grpc.max_receive_message_length", 4 << 20), ("grpc.max_send_message_length", 4 << 20)]
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        if tls or tls_ca is not None:
            ca = tls_ca
            if isinstance(ca, (str, Path)):
                ca = Path(ca).read_bytes()
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca), opts)
        else:
            self.channel = grpc.insecure_channel(target, opts)
        self.stub = pb_grpc.SearchServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- error translation ----------------------------------------------------------------------------------
    def _error(self, e: grpc.RpcError) -> ClientError:
        code, details = e.code(), (e.details() or "").strip()
        if code == grpc.StatusCode.UNAVAILABLE:
            msg = f"cannot reach the server at {self.target}: {details.splitlines()[0] if details else 'unavailable'}"
        elif code == grpc.StatusCode.UNAUTHENTICATED:
            msg = f"the server rejected the token: {details}"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            msg = f"no answer from {self.target} before the deadline"
        else:
            msg = f"{code.name}: {details}"
        return ClientError(" ".join(msg.split()), code)

    def _call(self, method, request, timeout: float | None = None, retry_unavailable: int = 0):
        for attempt in range(retry_unavailable + 1):
            try:
                return method(request, metadata=self._md, timeout=timeout or self.timeout)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE and attempt < retry_unavailable:
                    time.sleep(min(2.0, 0.2 * 2 ** attempt))
                    continue
                raise self._error(e) from None

    # ---- calls ----------------------------------------------------------------------------------------------
    def health(self, service: str = "dass_ray.v1.SearchService") -> str:
        """"SERVING", "NOT_SERVING", ... (no token needed)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def _upload(self, method, path: str | Path, timeout: float | None):
        p = Path(path)
        try:
            size, digest = p.stat().st_size, sha256_file(p)
        except OSError as e:
            raise ClientError(f"cannot read {p}: {e.strerror}") from None

        def chunks():
            yield pb.UploadChunk(header=pb.UploadHeader(filename=p.name, size_bytes=size, sha256=digest))
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(CHUNK), b""):
                    yield pb.UploadChunk(data=b)

        return self._call(method, chunks(), timeout=timeout or max(self.timeout, 600.0))

    def upload_dataset(self, path: str | Path, timeout: float | None = None) -> pb.DatasetInfo:
        """Upload a .parquet/.npz dataset; the server validates it and answers its id, classes and size."""
        return self._upload(self.stub.UploadDataset, path, timeout)

    def upload_teacher(self, path: str | Path, timeout: float | None = None) -> pb.TeacherInfo:
        """Upload a teacher checkpoint."""
        return self._upload(self.stub.UploadTeacher, path, timeout)

    def submit(self, *, dataset_id: str | None = None, dataset_path: str | None = None,
               teacher_id: str | None = None, teacher_path: str | None = None, train_teacher: bool = False,
               dry_run: bool = False, request_id: str | None = None, **knobs) -> pb.Job:
        """Queue a search. `knobs`: any per-search field of the contract (dass_ray.contract.REQUEST_FIELDS
        with a proto path: candidates, top_k, kd_epochs, seed, scale, remap, readapt, asha, classes, max_flops,
        max_params, max_concurrent, encoders, predictors, batch_size); unset ones take the search's defaults.
        A fresh `request_id` is made when none is given, so the call is retried safely (never two jobs) when the
        server is briefly unavailable."""
        req = pb.SubmitSearchRequest(request_id=request_id or uuid.uuid4().hex, dry_run=dry_run)
        set_proto_knobs(req, **knobs)
        if dataset_id is not None:
            req.dataset_id = dataset_id
        elif dataset_path is not None:
            req.dataset_path = dataset_path
        if teacher_id is not None:
            req.teacher_id = teacher_id
        elif teacher_path is not None:
            req.teacher_path = teacher_path
        elif train_teacher:
            req.train_teacher = True
        return self._call(self.stub.SubmitSearch, req, retry_unavailable=3)

    def get_job(self, job_id: str) -> pb.Job:
        return self._call(self.stub.GetJob, pb.GetJobRequest(job_id=job_id))

    def list_jobs(self, states: tuple[str, ...] = (), page_size: int = 50,
                  limit: int | None = None) -> Iterator[pb.Job]:
        """This client's jobs, newest first, following pages; `states` by name ("running", ...)."""
        try:
            st = [STATES[s.lower()] for s in states]
        except KeyError as e:
            raise ClientError(f"unknown state {e.args[0]!r}; known: {', '.join(STATES)}") from None
        token, n = "", 0
        while True:
            r = self._call(self.stub.ListJobs, pb.ListJobsRequest(page_size=page_size, page_token=token, states=st))
            for j in r.jobs:
                yield j
                n += 1
                if limit is not None and n >= limit:
                    return
            token = r.next_page_token
            if not token:
                return

    def watch(self, job_id: str, from_sequence: int = 0, *, reconnect: bool = True,
              give_up_after_s: float = 300.0) -> Iterator[pb.JobEvent]:
        """Stream a job's events until its terminal one. When the stream breaks (server restarting), reconnect
        from the next sequence number: every event arrives once, in order."""
        seq, lost_since = from_sequence, None
        while True:
            try:
                stream = self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, from_sequence=seq), metadata=self._md)
                for ev in stream:
                    lost_since = None
                    if ev.sequence < seq and ev.state in TERMINAL:  # asked past the end of a finished job:
                        yield ev  # the server answers how it ended
                        return
                    if ev.sequence != seq:
                        raise ClientError(f"event stream out of order: expected {seq}, got {ev.sequence}")
                    seq += 1
                    yield ev
                    if ev.state in TERMINAL:
                        return
                return  # ended without a terminal event (a server from before it answered one past the end)
            except grpc.RpcError as e:
                transient = e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                         grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
                if not (reconnect and transient):
                    raise self._error(e) from None
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > give_up_after_s:
                    raise self._error(e) from None
                time.sleep(0.5)

    def wait(self, job_id: str, timeout_s: float | None = None) -> pb.Job:
        """Block until the job is finished (follows its events); returns the final job."""
        t0 = time.monotonic()
        for _ in self.watch(job_id):
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise ClientError(f"job {job_id} not finished after {timeout_s:.0f} s")
        return self.get_job(job_id)

    def cancel(self, job_id: str) -> pb.Job:
        return self._call(self.stub.CancelJob, pb.CancelJobRequest(job_id=job_id))

    def result(self, job_id: str) -> pb.SearchResult:
        return self._call(self.stub.GetResult, pb.GetResultRequest(job_id=job_id))

    def retrain(self, *, episodes: int = 0, seed: int | None = None, request_id: str | None = None) -> pb.Job:
        """Queue a retrain of this client's predictor on its own search history (a job of kind retrain; watch it
        like a search). Retried safely like `submit`."""
        req = pb.RetrainPredictorRequest(request_id=request_id or uuid.uuid4().hex, episodes=episodes)
        if seed is not None:
            req.seed = seed
        return self._call(self.stub.RetrainPredictor, req, retry_unavailable=3)

    def predictors(self) -> list[pb.PredictorVersion]:
        """This client's retrained predictor versions, newest first."""
        return list(self._call(self.stub.ListPredictors, pb.ListPredictorsRequest()).versions)

    def download(self, job_id: str, kind: str | int, dest: str | Path) -> Path:
        """Download one artifact ("torchscript", "onnx", "torch_export", "weights", "report", "candidates",
        "trials") into directory `dest`; resumes after a broken stream and checks the sha256. Returns the file's path."""
        k = ARTIFACTS.get(kind, kind) if isinstance(kind, str) else kind
        if not isinstance(k, int):
            raise ClientError(f"unknown artifact {kind!r}; known: {', '.join(ARTIFACTS)}")
        dest = Path(dest)
        offset, header, part, retries = 0, None, None, 0
        while True:
            try:
                stream = self.stub.DownloadArtifact(
                    pb.DownloadArtifactRequest(job_id=job_id, kind=k, offset=offset), metadata=self._md)
                for msg in stream:
                    if msg.WhichOneof("part") == "header":
                        header = msg.header
                        dest.mkdir(parents=True, exist_ok=True)
                        part = dest / (Path(header.filename).name + ".part")
                        if offset == 0:
                            part.write_bytes(b"")
                        continue
                    with open(part, "ab") as f:
                        f.write(msg.data)
                    offset += len(msg.data)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or retries >= 5 or header is None:
                    raise self._error(e) from None
                retries += 1
                time.sleep(0.5 * retries)
        if header is None:
            raise ClientError(f"job {job_id}: the server sent no artifact header")
        if offset != header.size_bytes or sha256_file(part) != header.sha256:
            raise ClientError(f"job {job_id}: {header.filename} arrived corrupt ({offset} of {header.size_bytes} "
                              f"bytes or a sha256 mismatch)")
        final = dest / Path(header.filename).name
        os.replace(part, final)
        return final
