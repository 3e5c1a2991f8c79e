"""The gRPC front door (proto/dass_ray/v1/search.proto): remote clients upload a dataset and a teacher, submit a
search, watch it, fetch the best student and download its artifacts.

The servicer only translates: protobuf -> `dass_ray.jobs.SearchSpec` / uploads -> the job runner and the
project's own validators (`dass_ray.data.load_dataset`, `dass_ray.kd.load_teacher`) -> protobuf, and errors ->
gRPC status codes. Jobs, events and uploads live in the state directory (`dass_ray.jobs`), so a restarted server
carries on where the last one stopped.

`create_server(cfg) -> (server, port)` builds and starts a server (tests bind port 0); `serve(cfg)` runs one
until SIGTERM/SIGINT, then drains: no new work is accepted, in-flight calls get `grace_s` seconds, running
searches are left running for the next server to re-attach.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dass_ray import jobs as J
from dass_ray.fileutil import sha256_file

try:
    from dass_ray.v1 import search_pb2 as pb
    from dass_ray.v1 import search_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - only on an install that skipped the generator
    raise ImportError(f"the generated gRPC code is missing ({e}); run `make proto` "
                      f"(python scripts/gen_proto.py)") from None

log = logging.getLogger("dass_ray.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name  # "dass_ray.v1.SearchService"
CHUNK = 1 << 20  # bytes per streamed message
MAX_MESSAGE = 4 << 20  # largest message the server accepts
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_STATE_TO_PB = {J.QUEUED: pb.JOB_STATE_QUEUED, J.RUNNING: pb.JOB_STATE_RUNNING,
                J.SUCCEEDED: pb.JOB_STATE_SUCCEEDED, J.FAILED: pb.JOB_STATE_FAILED,
                J.CANCELLED: pb.JOB_STATE_CANCELLED}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}
_ARTIFACT_FILES = {pb.ARTIFACT_KIND_TORCHSCRIPT: "student.torchscript.pt", pb.ARTIFACT_KIND_WEIGHTS: "student.pt",
                   pb.ARTIFACT_KIND_REPORT: "report.png", pb.ARTIFACT_KIND_CANDIDATES: "candidates.parquet",
                   pb.ARTIFACT_KIND_TRIALS: "trials.parquet"}
_DATASET_EXTS = (".parquet", ".npz")


def default_data_roots() -> list[Path]:
    """Server-side directories a client may name by path: the package's bundled assets and the shared datasets."""
    from dass_ray.data import shared_datasets_root

    roots = [Path(__file__).resolve().parent / "assets"]
    try:
        shared = shared_datasets_root()
    except Exception:  # noqa: BLE001 - a bad $DASS_DATASETS only removes that root
        shared = None
    if shared is not None:
        roots.append(Path(shared).resolve())
    return roots


@dataclass
class ServerConfig:
    """Everything `dass-ray serve` takes. Sizes in bytes, times in seconds."""

    state_dir: Path
    token_file: Path
    port: int = 50051
    host: str = "[::]"
    address: str | None = None  # Ray dashboard address: run searches as Ray Jobs; None: detached local processes
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_running: int = 1
    max_queued: int = 100
    max_upload_bytes: int = 512 << 20
    workers: int = 64  # server threads (each open WatchJob/DownloadArtifact stream holds one)
    grace_s: float = 10.0
    data_roots: list[Path] = field(default_factory=default_data_roots)
    search_cmd: list[str] | None = None
    search_extra_args: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# Auth
# ----------------------------------------------------------------------------------------------------------------


class TokenFile:
    """`client-name token` per line ('#' comments, blank lines ignored); re-read when the file changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stamp = None
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._load()  # fail at start-up on a bad file

    def _load(self) -> None:
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        tokens: dict[str, str] = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{self.path}:{n}: expected 'client-name token', got {len(parts)} fields")
            name, tok = parts
            if tok in tokens:
                raise ValueError(f"{self.path}:{n}: token of {name!r} is already used by {tokens[tok]!r}")
            if len(tok) < 16:
                log.warning("%s:%d: the token of %r is short (%d characters); use 16 or more", self.path, n,
                            name, len(tok))
            tokens[tok] = name
        if not tokens:
            raise ValueError(f"{self.path}: no 'client-name token' lines")
        self._tokens, self._stamp = tokens, stamp

    def client_for(self, token: str) -> str | None:
        with self._lock:
            try:
                self._load()
            except (OSError, ValueError) as e:
                log.error("token file unusable, keeping the previous tokens: %s", e)
        found = None
        for tok, name in self._tokens.items():  # compare all, in constant time each
            if hmac.compare_digest(tok.encode(), token.encode()):
                found = name
        return found


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _invalid(field_name: str, message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {message}")


def _translate(e: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, ServiceError):
        return e.code, str(e)
    if isinstance(e, J.SpecError):
        msg = str(e)
        return grpc.StatusCode.INVALID_ARGUMENT, msg if msg.startswith(e.field) else f"{e.field}: {msg}"
    if isinstance(e, J.RequestConflict):
        return grpc.StatusCode.INVALID_ARGUMENT, f"request_id: {e}"
    if isinstance(e, J.QueueFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
    if isinstance(e, J.JobFinished):
        return grpc.StatusCode.FAILED_PRECONDITION, str(e)
    if isinstance(e, J.JobNotFound):
        return grpc.StatusCode.NOT_FOUND, f"job {e} not found"
    log.exception("internal error")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}); see the server log"


def _rpc(kind: str):
    """Authenticate (the client's name is passed to the method) and turn exceptions into status codes."""

    def deco(fn):
        if kind == "stream":
            @functools.wraps(fn)
            def wrapper(self, request, context):
                client = self._authenticate(context)
                try:
                    yield from fn(self, request, context, client)
                except Exception as e:  # noqa: BLE001
                    if isinstance(e, grpc.RpcError) or not context.is_active():
                        return
                    code, msg = _translate(e)
                    context.abort(code, msg)
        else:
            @functools.wraps(fn)
            def wrapper(self, request, context):
                client = self._authenticate(context)
                try:
                    return fn(self, request, context, client)
                except Exception as e:  # noqa: BLE001
                    if isinstance(e, grpc.RpcError):
                        raise
                    code, msg = _translate(e)
                    context.abort(code, msg)
        return wrapper

    return deco


# ----------------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------------


def _spec_pb(s: J.SearchSpec) -> pb.SearchSpec:
    out = pb.SearchSpec(dataset=s.dataset, teacher=s.teacher, train_teacher=s.train_teacher,
                        budget=pb.Budget(max_flops=s.max_flops, max_params=s.max_params), candidates=s.candidates,
                        top_k=s.top_k, kd_epochs=s.kd_epochs, scale=s.scale, dry_run=s.dry_run)
    if s.seed is not None:
        out.seed = s.seed
    return out


def _job_pb(j: J.JobRow, queue_position: int = -1) -> pb.Job:
    return pb.Job(job_id=j.job_id, request_id=j.request_id, state=_STATE_TO_PB[j.state], spec=_spec_pb(j.spec),
                  stage=j.stage, done=j.done, total=j.total, message=j.message, error=j.error,
                  created_unix_s=j.created, started_unix_s=j.started, finished_unix_s=j.finished,
                  attempts=j.attempts, last_sequence=j.last_sequence, cancel_requested=j.cancel_requested,
                  queue_position=queue_position)


def _event_pb(e: J.Event) -> pb.JobEvent:
    return pb.JobEvent(sequence=e.seq, time_unix_s=e.time, stage=e.stage, done=e.done, total=e.total,
                       message=e.message, state=_STATE_TO_PB[e.state])


class _Release:
    def __init__(self, sem: threading.BoundedSemaphore):
        self.sem = sem

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.sem.release()


# ----------------------------------------------------------------------------------------------------------------
# The servicer
# ----------------------------------------------------------------------------------------------------------------


class SearchServicer(pb_grpc.SearchServiceServicer):
    """Translates SearchService calls to the job runner and the project's validators."""

    def __init__(self, cfg: ServerConfig, runner: J.JobRunner, tokens: TokenFile):
        self.cfg = cfg
        self.runner = runner
        self.store = runner.store
        self.tokens = tokens
        self.blob_dir = Path(cfg.state_dir) / "blobs"
        self.tmp_dir = Path(cfg.state_dir) / "tmp"
        for d in (self.blob_dir / "datasets", self.blob_dir / "teachers", self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.draining = threading.Event()
        self._validate_slots = threading.BoundedSemaphore(2)  # decoding a dataset is memory-heavy
        self._path_cache: dict[tuple, dict] = {}
        self._sha_cache: dict[tuple, str] = {}
        self._roots = [Path(r).resolve() for r in cfg.data_roots]
        # Open streams hold a server thread each; keep some threads for unary calls.
        self._stream_slots = threading.BoundedSemaphore(max(1, cfg.workers - max(2, cfg.workers // 4)))

    def _stream_slot(self):
        if not self._stream_slots.acquire(blocking=False):
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open streams on this server; "
                               "retry shortly")
        return _Release(self._stream_slots)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _authenticate(self, context) -> str:
        md = dict(context.invocation_metadata())
        auth = md.get("authorization", "")
        if not auth:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "the authorization metadata must be 'Bearer <token>'")
        client = self.tokens.client_for(token.strip())
        if client is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        return client

    def _not_draining(self) -> None:
        if self.draining.is_set() or not self.runner.accepting:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry shortly")

    def _job(self, job_id: str, client: str) -> J.JobRow:
        if not job_id:
            raise _invalid("job_id", "is required")
        job = self.store.get(job_id, owner=client) if len(job_id) <= 64 else None
        if job is None:  # another client's job is indistinguishable from no job
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"job {job_id[:64]} not found")
        return job

    def _under_roots(self, field_name: str, raw: str) -> Path:
        if not raw or not os.path.isabs(raw):
            raise _invalid(field_name, f"must be an absolute path on the cluster, got {raw[:200]!r}")
        p = Path(raw).resolve()
        if not any(p == r or r in p.parents for r in self._roots):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{field_name}: {raw[:200]} is outside the server's data roots "
                               f"({', '.join(map(str, self._roots))})")
        if not p.exists():
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field_name}: {raw[:200]}: no such file or directory")
        return p

    # ---- uploads ------------------------------------------------------------------------------------------
    def _receive(self, it, context, kind: str) -> tuple[str, Path, int, str]:
        """Stream an upload into a temporary file, checking the header (before reading any data), the size cap
        and the sha256. Returns (sha256, tmp_path, size, filename)."""
        first = next(it, None)
        if first is None or first.WhichOneof("part") != "header":
            raise _invalid("header", "the first message of an upload must carry the header")
        h = first.header
        name = os.path.basename(h.filename.replace("\\", "/"))
        if not name or len(h.filename) > 255:
            raise _invalid("header.filename", "a file name of 1..255 characters is required")
        if kind == "dataset" and Path(name).suffix.lower() not in _DATASET_EXTS:
            raise _invalid("header.filename", f"a dataset upload must be a {' or '.join(_DATASET_EXTS)} file, "
                           f"got {name!r}")
        if h.size_bytes <= 0:
            raise _invalid("header.size_bytes", f"must be > 0, got {h.size_bytes}")
        if h.size_bytes > self.cfg.max_upload_bytes:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"header.size_bytes: {h.size_bytes} bytes is over the upload cap of "
                               f"{self.cfg.max_upload_bytes} bytes")
        want = h.sha256.lower()
        if not _SHA_RE.match(want):
            raise _invalid("header.sha256", "must be 64 hex characters (the SHA-256 of the file)")
        fd, tmp = tempfile.mkstemp(prefix=f"{kind}-", suffix=".part", dir=self.tmp_dir)
        tmp = Path(tmp)
        try:
            digest, got = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as f:
                for msg in it:
                    if msg.WhichOneof("part") != "data":
                        raise _invalid("header", "only the first message may carry a header")
                    got += len(msg.data)
                    if got > h.size_bytes:
                        raise _invalid("header.size_bytes", f"received more than the announced "
                                       f"{h.size_bytes} bytes")
                    digest.update(msg.data)
                    f.write(msg.data)
            if not context.is_active():
                raise ServiceError(grpc.StatusCode.CANCELLED, "the client went away")
            if got < h.size_bytes:
                raise _invalid("header.size_bytes", f"upload truncated: received {got} of {h.size_bytes} bytes")
            if digest.hexdigest() != want:
                raise _invalid("header.sha256", f"the bytes received hash to {digest.hexdigest()}, "
                               f"not {want}: the upload is corrupt")
            return want, tmp, got, name
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _store_upload(self, request_iterator, context, client: str, kind: str, validate) -> tuple[J.Upload, bool]:
        self._not_draining()
        sha, tmp, size, name = self._receive(request_iterator, context, kind)
        try:
            mine = self.store.get_upload(client, kind, sha)
            if mine is not None and Path(mine.path).is_file():
                return mine, True
            ext = Path(name).suffix.lower()
            final = self.blob_dir / f"{kind}s" / f"{sha}{ext if kind == 'dataset' else '.pt'}"
            known = self.store.find_upload(kind, sha)
            if known is not None and Path(known.path).is_file():
                info = known.info  # the same bytes were validated for another client
            else:
                typed = tmp.with_suffix(final.suffix)
                tmp.rename(typed)
                tmp = typed
                with self._validate_slots:
                    info = validate(tmp, name)
                os.replace(tmp, final)
            up = J.Upload(client, kind, sha, str(final), size, info, time.time())
            self.store.put_upload(up)
            return up, False
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _dataset_info(path: Path, shown: str) -> dict:
        from dass_ray.data import DatasetError, load_dataset

        try:
            ds = load_dataset(path)
        except DatasetError as e:
            raise _invalid("dataset", str(e).replace(str(path), shown)) from None
        except Exception as e:  # noqa: BLE001 - a hostile file may break a decoder in any way
            raise _invalid("dataset", f"{shown}: unreadable ({type(e).__name__}: {str(e)[:300]})") from None
        if len(ds) == 0:
            raise _invalid("dataset", f"{shown}: no images")
        h, w = ds.image_size
        return {"num_classes": ds.num_classes, "num_images": len(ds), "image_height": h, "image_width": w,
                "class_names": list(ds.class_names[:20])}

    @staticmethod
    def _teacher_info(path: Path, shown: str) -> dict:
        from dass_ray.kd import load_teacher

        try:
            ck = load_teacher(path)
        except ValueError as e:
            raise _invalid("teacher", str(e).replace(str(path), shown)) from None
        except Exception as e:  # noqa: BLE001
            raise _invalid("teacher", f"{shown}: unreadable ({type(e).__name__}: {str(e)[:300]})") from None
        return {"num_classes": int(ck.space.num_classes), "image_size": int(ck.space.image_size),
                "val_acc": float(ck.val_acc), "space": ck.space.name}

    @_rpc("unary")
    def UploadDataset(self, request_iterator, context, client):
        up, present = self._store_upload(request_iterator, context, client, "dataset", self._dataset_info)
        i = up.info
        return pb.DatasetInfo(dataset_id=f"sha256:{up.sha256}", size_bytes=up.size, num_classes=i["num_classes"],
                              num_images=i["num_images"], image_height=i["image_height"],
                              image_width=i["image_width"], class_names=i["class_names"], already_present=present)

    @_rpc("unary")
    def UploadTeacher(self, request_iterator, context, client):
        up, present = self._store_upload(request_iterator, context, client, "teacher", self._teacher_info)
        i = up.info
        return pb.TeacherInfo(teacher_id=f"sha256:{up.sha256}", size_bytes=up.size, num_classes=i["num_classes"],
                              image_size=i["image_size"], val_acc=i["val_acc"], space=i["space"],
                              already_present=present)

    # ---- submit -------------------------------------------------------------------------------------------
    def _cached_info(self, field_name: str, p: Path, fn) -> dict:
        st = p.stat()
        key = (field_name, str(p), st.st_mtime_ns, st.st_size)
        if key not in self._path_cache:
            with self._validate_slots:
                self._path_cache[key] = fn(p, str(p))
        return self._path_cache[key]

    def _resolve(self, request, client: str, which: str) -> tuple[str, str, dict | None]:
        """(as given, file path, info) of the dataset or teacher of a submit; info None for "train one"."""
        kind = request.WhichOneof(which)
        if which == "dataset":
            if kind is None:
                raise _invalid("dataset", "one of dataset_id or dataset_path is required")
            if kind == "dataset_id":
                return self._by_id("dataset_id", "dataset", request.dataset_id, client)
            p = self._under_roots("dataset_path", request.dataset_path)
            return request.dataset_path, str(p), self._cached_info("dataset_path", p, self._dataset_info)
        if kind is None:
            raise _invalid("teacher", "one of teacher_id, teacher_path or train_teacher is required")
        if kind == "train_teacher":
            if not request.train_teacher:
                raise _invalid("train_teacher", "must be true when set (or give teacher_id / teacher_path)")
            return "", "", None
        if kind == "teacher_id":
            return self._by_id("teacher_id", "teacher", request.teacher_id, client)
        p = self._under_roots("teacher_path", request.teacher_path)
        if not p.is_file():
            raise _invalid("teacher_path", f"{request.teacher_path}: not a file")
        return request.teacher_path, str(p), self._cached_info("teacher_path", p, self._teacher_info)

    def _by_id(self, field_name: str, kind: str, ref: str, client: str) -> tuple[str, str, dict]:
        m = _ID_RE.match(ref)
        if not m:
            raise _invalid(field_name, f"expected 'sha256:<64 hex>' as answered by Upload{kind.title()}, "
                           f"got {ref[:80]!r}")
        up = self.store.get_upload(client, kind, m.group(1))
        if up is None or not Path(up.path).is_file():
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field_name}: no uploaded {kind} {ref}")
        return ref, up.path, up.info

    @_rpc("unary")
    def SubmitSearch(self, request, context, client):
        self._not_draining()
        rid = request.request_id
        if rid and not _REQUEST_ID_RE.match(rid):
            raise _invalid("request_id", "at most 128 printable ASCII characters, no spaces")
        if rid:  # a retry of a submit that already succeeded answers with that job
            old = self.store.get_by_request(client, rid)
            if old is not None:
                job = self._check_retry(old, request, client)
                return _job_pb(job, self.store.queue_position(job))
        spec = self._spec(request, client)
        if not context.is_active():  # past the deadline: do not create a job the client will never hear of
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the job was created")
        try:
            job, _ = self.runner.submit(client, rid, spec)
        except RuntimeError as e:
            if isinstance(e, J.QueueFull):
                raise
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        return _job_pb(job, self.store.queue_position(job))

    def _check_retry(self, old: J.JobRow, request, client: str) -> J.JobRow:
        spec = self._spec(request, client)
        if spec.canonical() != old.spec.canonical():
            raise J.RequestConflict(f"request_id {request.request_id!r} was already used for a different "
                                    f"request (job {old.job_id})")
        return old

    def _spec(self, request, client: str) -> J.SearchSpec:
        from dass_ray.config import SCALES

        if request.scale and request.scale not in SCALES:
            raise _invalid("scale", f"unknown scale {request.scale!r}; known: {', '.join(sorted(SCALES))}")
        b = request.budget
        spec = J.SearchSpec(dataset="?", dataset_path="?", max_flops=b.max_flops, max_params=b.max_params,
                            candidates=request.candidates, top_k=request.top_k, kd_epochs=request.kd_epochs,
                            seed=request.seed if request.HasField("seed") else None, scale=request.scale,
                            dry_run=request.dry_run)
        spec.validate()  # cheap checks before touching any file
        dataset, dataset_path, dinfo = self._resolve(request, client, "dataset")
        teacher, teacher_path, tinfo = self._resolve(request, client, "teacher")
        if tinfo is not None:
            from dass_ray.config import get_scale

            field_name = request.WhichOneof("teacher")
            if tinfo["num_classes"] != dinfo["num_classes"]:
                raise _invalid(field_name, f"the teacher's head has {tinfo['num_classes']} classes but the dataset "
                               f"has {dinfo['num_classes']}")
            want = get_scale(spec.scale or "cpu").space
            if tinfo["space"] != want:
                raise _invalid(field_name, f"the teacher belongs to search space {tinfo['space']!r}; scale "
                               f"{spec.scale or 'cpu'!r} searches space {want!r}")
        self._check_budget(spec, tinfo, dinfo)
        import dataclasses

        return dataclasses.replace(spec, dataset=dataset, dataset_path=dataset_path, teacher=teacher,
                                   teacher_path=teacher_path).validate()

    @staticmethod
    def _check_budget(spec: J.SearchSpec, tinfo: dict | None, dinfo: dict) -> None:
        if not (spec.max_flops or spec.max_params):
            return
        from dass_ray.config import get_scale
        from dass_ray.space import get_space

        name = tinfo["space"] if tinfo else get_scale(spec.scale or "cpu").space
        try:
            space = get_space(name, num_classes=dinfo["num_classes"])
            space.check_budget(max_flops=spec.max_flops or None, max_params=spec.max_params or None)
        except ValueError as e:
            raise _invalid("budget", str(e)) from None

    # ---- jobs ---------------------------------------------------------------------------------------------
    @_rpc("unary")
    def GetJob(self, request, context, client):
        job = self._job(request.job_id, client)
        return _job_pb(job, self.store.queue_position(job))

    @_rpc("unary")
    def ListJobs(self, request, context, client):
        if request.page_size < 0:
            raise _invalid("page_size", f"must be >= 0, got {request.page_size}")
        size = min(request.page_size or 50, 500)
        states = []
        for s in request.states:
            if s not in _PB_TO_STATE:
                raise _invalid("states", f"unknown or unspecified state {s}")
            states.append(_PB_TO_STATE[s])
        filt = ",".join(sorted(states))
        after = None
        if request.page_token:
            try:
                tok = json.loads(bytes.fromhex(request.page_token).decode())
                after = (float(tok["c"]), str(tok["j"]))
                if tok["f"] != filt:
                    raise ValueError("filter changed")
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise _invalid("page_token", "not a token from a previous ListJobs with the same states") from None
        rows = self.store.list(owner=client, states=states, limit=size + 1, after=after)
        more = len(rows) > size
        rows = rows[:size]
        nxt = ""
        if more:
            nxt = json.dumps({"c": rows[-1].created, "j": rows[-1].job_id, "f": filt}).encode().hex()
        return pb.ListJobsResponse(jobs=[_job_pb(j, self.store.queue_position(j)) for j in rows],
                                   next_page_token=nxt)

    @_rpc("stream")
    def WatchJob(self, request, context, client):
        job = self._job(request.job_id, client)
        if request.from_sequence < 0:
            raise _invalid("from_sequence", f"must be >= 0, got {request.from_sequence}")
        with self._stream_slot():
            yield from self._watch(job, request.from_sequence, context)

    def _watch(self, job: J.JobRow, seq: int, context):
        while context.is_active():
            version = self.runner.version()
            events = self.store.events(job.job_id, seq, limit=500)
            for e in events:
                yield _event_pb(e)
                seq = e.seq + 1
                if e.terminal:
                    return
            if events:
                continue
            job = self.store.get(job.job_id)
            if job.terminal and seq > job.last_sequence:
                return  # asked past the end of a finished job: nothing more will come
            if self.draining.is_set():
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the server is shutting down; reconnect with "
                                   f"from_sequence={seq}")
            self.runner.wait_for_change(version, timeout=1.0)

    @_rpc("unary")
    def CancelJob(self, request, context, client):
        job = self._job(request.job_id, client)
        job = self.runner.cancel(job.job_id, owner=client)
        return _job_pb(job, self.store.queue_position(job))

    # ---- results ------------------------------------------------------------------------------------------
    def _finished(self, job_id: str, client: str) -> J.JobRow:
        job = self._job(job_id, client)
        if job.state == J.FAILED:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} failed: {job.error}")
        if job.state != J.SUCCEEDED:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"job {job.job_id} is {job.state}; results exist only for SUCCEEDED jobs")
        if job.spec.dry_run:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} was a dry run: no result")
        return job

    @_rpc("unary")
    def GetResult(self, request, context, client):
        job = self._finished(request.job_id, client)
        out = self.runner.output_dir(job.job_id)
        try:
            raw = (out / "result.json").read_text()
            res = json.loads(raw)
            best = res["best"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ServiceError(grpc.StatusCode.DATA_LOSS, f"job {job.job_id}: unreadable result.json ({e})") from None
        arch = best.get("arch") or json.loads(best.get("arch_json") or "{}")
        arch_json = best.get("arch_json") or json.dumps(arch, sort_keys=True, separators=(",", ":"))
        depths = [len(s) for s in arch.get("widths", [])] if isinstance(arch, dict) else []
        student = pb.Student(arch_json=arch_json, depths=depths, measured_acc=float(best.get("measured_acc", 0)),
                             predicted_acc=float(best.get("predicted_acc", 0)), flops=int(best.get("flops", 0)),
                             params=int(best.get("params", 0)))
        arts = []
        for kind, name in _ARTIFACT_FILES.items():
            p = out / name
            if p.is_file():
                arts.append(pb.ArtifactInfo(kind=kind, filename=name, size_bytes=p.stat().st_size))
        timings = {str(k): float(v) for k, v in (res.get("timings") or {}).items()
                   if isinstance(v, (int, float))}
        return pb.SearchResult(job_id=job.job_id, best=student, teacher_acc=float(res.get("teacher_acc", 0)),
                               timings_s=timings, candidates=int(res.get("candidates", 0)),
                               top_k=int(res.get("top_k", 0)), artifacts=arts, result_json=raw)

    @_rpc("stream")
    def DownloadArtifact(self, request, context, client):
        if request.kind not in _ARTIFACT_FILES:
            raise _invalid("kind", f"unknown or unspecified artifact kind {request.kind}")
        job = self._finished(request.job_id, client)
        name = _ARTIFACT_FILES[request.kind]
        path = self.runner.output_dir(job.job_id) / name
        if not path.is_file():
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"job {job.job_id} has no {name}")
        st = path.stat()
        if not 0 <= request.offset <= st.st_size:
            raise _invalid("offset", f"must be in [0, {st.st_size}], got {request.offset}")
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in self._sha_cache:
            self._sha_cache[key] = sha256_file(path)
        with self._stream_slot(), open(path, "rb") as f:
            yield pb.ArtifactChunk(header=pb.ArtifactHeader(filename=name, size_bytes=st.st_size,
                                                            sha256=self._sha_cache[key]))
            f.seek(request.offset)
            while context.is_active():
                b = f.read(CHUNK)
                if not b:
                    return
                yield pb.ArtifactChunk(data=b)


# ----------------------------------------------------------------------------------------------------------------
# Server assembly
# ----------------------------------------------------------------------------------------------------------------


class Service:
    """A running server: the gRPC server, its servicer, the job runner and the health servicer."""

    def __init__(self, cfg: ServerConfig):
        import dass_ray.data  # noqa: F401 - import torch and the validators now, not on the first upload
        import dass_ray.kd  # noqa: F401

        self.cfg = cfg
        self.tokens = TokenFile(cfg.token_file)
        if cfg.address:
            # The searches run as Ray Jobs in the cluster's environment, not this process's: pass the checkpoint
            # storage on (a local subprocess inherits it anyway).
            from dass_ray.rayutil import STORAGE_ENV

            storage = os.environ.get(STORAGE_ENV)
            backend = J.RayJobBackend(cfg.address, env_vars={STORAGE_ENV: storage} if storage else None)
        else:
            backend = J.LocalBackend()
        rcfg = J.RunnerConfig(max_running=cfg.max_running, max_queued=cfg.max_queued,
                              extra_args=list(cfg.search_extra_args))
        if cfg.search_cmd:
            rcfg.search_cmd = list(cfg.search_cmd)
        self.runner = J.JobRunner(cfg.state_dir, backend, rcfg)
        self.servicer = SearchServicer(cfg, self.runner, self.tokens)
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="dass-grpc"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=cfg.workers * 4,
        )
        pb_grpc.add_SearchServiceServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        target = f"{cfg.host}:{cfg.port}"
        if cfg.tls_cert or cfg.tls_key:
            if not (cfg.tls_cert and cfg.tls_key):
                raise ValueError("--tls-cert and --tls-key go together")
            creds = grpc.ssl_server_credentials([(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())])
            self.port = self.server.add_secure_port(target, creds)
        else:
            self.port = self.server.add_insecure_port(target)
            if cfg.host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
                log.warning("serving without TLS on %s: tokens travel in clear text (use --tls-cert/--tls-key)",
                            target)
        if self.port == 0:
            raise OSError(f"cannot bind {target}")
        self._stopped = threading.Event()

    def start(self) -> "Service":
        self.runner.start()
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("dass_ray.v1.SearchService on port %d (state %s, %s backend, at most %d running)", self.port,
                 self.cfg.state_dir, self.runner.backend.name, self.cfg.max_running)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new work, end watches, give in-flight calls `grace` seconds; searches keep running."""
        if self._stopped.is_set():
            return
        grace = self.cfg.grace_s if grace is None else grace
        self.servicer.draining.set()
        self.runner.drain()
        self.health.enter_graceful_shutdown()
        self.runner._notify()  # wake watchers so they end promptly
        self.server.stop(grace).wait()
        self.runner.stop()
        self.runner.store.close()
        self._stopped.set()
        log.info("stopped; running searches continue and will be re-attached by the next server")

    def wait(self) -> None:
        self._stopped.wait()


def create_server(cfg: ServerConfig) -> tuple[Service, int]:
    """Build and start a server; returns (service, bound port). `cfg.port = 0` picks a free port."""
    svc = Service(cfg).start()
    return svc, svc.port


def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT, then drain (see Service.stop)."""
    svc, port = create_server(cfg)
    print(f"dass-ray: serving dass_ray.v1.SearchService on port {port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    print("dass-ray: draining (no new work; running searches continue)", flush=True)
    svc.stop()
    return 0
