"""The servicer: translates SearchService calls to the job runner and back, and errors to status codes."""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from dass_ray.fileutil import sha256_file
from dass_ray import contract as C
from dass_ray.service import jobs as J
from dass_ray.service.checks import Checker
from dass_ray.service.server.rpc import InFlight, ServiceError, _invalid, _rpc
from dass_ray.service.server.uploads import InputsMixin

try:
    from dass_ray.v1 import search_pb2 as pb
    from dass_ray.v1 import search_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - only on an install that skipped the generator
    raise ImportError(f"the generated gRPC code is missing ({e}); run `make proto` "
                      f"(python scripts/gen_proto.py)") from None

if TYPE_CHECKING:
    from dass_ray.service.server.app import ServerConfig
    from dass_ray.service.server.rpc import TokenFile

log = logging.getLogger("dass_ray.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SearchService"].full_name  # "dass_ray.v1.SearchService"
CHUNK = 1 << 20  # bytes per streamed message
MAX_MESSAGE = 4 << 20  # largest message the server accepts
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_STATE_TO_PB = {J.QUEUED: pb.JOB_STATE_QUEUED, J.RUNNING: pb.JOB_STATE_RUNNING,
                J.SUCCEEDED: pb.JOB_STATE_SUCCEEDED, J.FAILED: pb.JOB_STATE_FAILED,
                J.CANCELLED: pb.JOB_STATE_CANCELLED}
_PB_TO_STATE = {v: k for k, v in _STATE_TO_PB.items()}
_ARTIFACT_FILES = {getattr(pb, f"ARTIFACT_KIND_{kind.upper()}"): name for kind, name in C.ARTIFACTS.items()}
_TABLES = frozenset(name for name in C.ARTIFACTS.values() if name.endswith(".parquet"))  # served scrubbed


# ----------------------------------------------------------------------------------------------------------------
# Conversions
# ----------------------------------------------------------------------------------------------------------------


def _spec_pb(s: J.SearchSpec) -> pb.SearchSpec:
    out = pb.SearchSpec(dataset=s.dataset, teacher=s.teacher, train_teacher=s.train_teacher, dry_run=s.dry_run)
    C.request_to_proto(s.request, out)
    if not s.seed_given:  # "Seed, when one was given"
        out.ClearField("seed")
    return out


def _job_pb(j: J.JobRow, queue_position: int = -1) -> pb.Job:
    if j.spec.kind == "retrain":
        what = dict(kind=pb.JOB_KIND_RETRAIN, retrain=pb.RetrainSpec(episodes=j.spec.episodes, seed=j.spec.seed))
    else:
        what = dict(kind=pb.JOB_KIND_SEARCH, spec=_spec_pb(j.spec))
    return pb.Job(job_id=j.job_id, request_id=j.request_id, state=_STATE_TO_PB[j.state], **what,
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


class SearchServicer(InputsMixin, pb_grpc.SearchServiceServicer):
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
        self.inflight = InFlight()  # calls being served (a draining server waits for them)
        self._validate_slots = threading.BoundedSemaphore(cfg.check_workers)  # decoding is memory-heavy
        self.checker = Checker(cfg.check_workers)
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
            # The server's directories are the operator's business: the message names the client's path only.
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{field_name}: {raw[:200]} is outside the directories this server lets clients "
                               f"name (its --data-root); upload the file instead")
        if not p.exists():
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"{field_name}: {raw[:200]}: no such file or directory")
        return p
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

    def _check_retry(self, old: J.JobRow, request, client: str, spec: J.JobSpec | None = None) -> J.JobRow:
        spec = spec or self._spec(request, client)
        if spec.canonical() != old.spec.canonical():
            raise J.RequestConflict(f"request_id {request.request_id!r} was already used for a different "
                                    f"request (job {old.job_id})")
        return old

    @staticmethod
    def _check_ranges(request) -> None:
        """The bounds of the integer knobs as a client sends them: 0 (the default, where 0 means one) up to the
        search's limit, integers written out."""
        for f in C.REQUEST_FIELDS:
            if f.proto is None or f.type is not int or f.hi is None:
                continue
            if f.name == "seed" and not request.HasField("seed"):
                continue
            v = request
            for part in f.proto.split("."):
                v = getattr(v, part)
            if not 0 <= v <= f.hi:
                raise _invalid(f.proto, f"must be in [0, {int(f.hi)}]" + (f" (0: {f.zero})" if f.zero else "")
                               + f", got {v}")

    def _spec(self, request, client: str) -> J.SearchSpec:
        self._check_ranges(request)
        req = C.request_from_proto(request, dataset="?", teacher="?", defaults=self.cfg.search_defaults)
        req.validate()  # cheap checks first
        self.cfg.caps.check(req)
        if req.predictor not in (C.DEFAULT_PREDICTOR, "latest"):  # never a server path chosen by a client
            raise _invalid("predictor", "must be empty (the shipped predictor) or 'latest' (your newest predictor "
                           "retrained on your own search history)")
        dataset, dataset_path, dinfo = self._resolve(request, client, "dataset")
        teacher, teacher_path, tinfo = self._resolve(request, client, "teacher")
        names = dinfo.get("all_class_names") or dinfo["class_names"]
        picked = range(dinfo["num_classes"])
        if req.classes:
            if len(names) < dinfo["num_classes"]:
                raise _invalid("classes", "this dataset was uploaded before class subsets were supported; "
                               "upload it again")
            picked = C.resolve_classes(req.classes, names)
        counts = dinfo.get("class_counts")  # absent for datasets checked before it was recorded
        for c in picked if counts else ():
            if counts[c] < 2:  # the search splits every class into training and validation images
                raise _invalid("classes" if req.classes else request.WhichOneof("dataset"),
                               f"class {c} ('{names[c]}') has {counts[c]} image{'' if counts[c] == 1 else 's'}; "
                               f"every class searched needs at least 2 (one to train on, one to validate)")
        num_classes = len(req.classes) or dinfo["num_classes"]
        scale = req.scale
        if tinfo is not None:
            field_name = request.WhichOneof("teacher")
            foreign = tinfo.get("kind", "family") != "family"  # TorchScript / ONNX: any classifier, no space
            if tinfo["num_classes"] != num_classes and (tinfo["num_classes"] or not foreign):
                raise _invalid(field_name, f"the teacher's head has {tinfo['num_classes']} classes but the search "
                               f"has {num_classes}" + (" (the classes asked for)" if req.classes else
                                                       " (the dataset's)"))
            want = C.SCALE_SPACES[scale]
            if not foreign and tinfo["space"] != want:
                raise _invalid(field_name, f"the teacher belongs to search space {tinfo['space']!r}; scale "
                               f"{scale!r} searches space {want!r}")
        given = [n for n in ("teacher_image_size", "teacher_mean", "teacher_std") if getattr(req, n)]
        if given and (tinfo is None or tinfo.get("kind", "family") == "family"):
            raise _invalid(given[0], "only for a foreign teacher (a TorchScript or ONNX upload; docs/teachers.md)")
        if req.max_flops or req.max_params:
            self._check_budget(req, num_classes)
        return J.SearchSpec(dataset=dataset, teacher=teacher, dry_run=request.dry_run,
                            request=req.replace(dataset=dataset_path, teacher=teacher_path or "train"),
                            seed_given=request.HasField("seed")).validate()

    def _check_budget(self, req: C.SearchRequest, num_classes: int) -> None:
        """The smallest student of the space must fit the budget (checked by a worker process: it needs torch)."""
        _, err = self.checker.call("budget", scale=req.scale, num_classes=num_classes, max_flops=req.max_flops,
                                   max_params=req.max_params)
        if err:
            raise _invalid("budget", err)

    # ---- jobs ---------------------------------------------------------------------------------------------
    @_rpc("unary")
    def GetJob(self, request, context, client):
        job = self._job(request.job_id, client)
        return _job_pb(job, self.store.queue_position(job))

    @_rpc("unary")
    def ListJobs(self, request, context, client):
        if not 0 <= request.page_size <= 500:
            raise _invalid("page_size", f"must be in [0, 500] (0: 50), got {request.page_size}")
        size = request.page_size or 50
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
        pos = self.store.queue_positions() if any(j.state == J.QUEUED for j in rows) else {}
        return pb.ListJobsResponse(jobs=[_job_pb(j, self.store.queue_position(j, pos)) for j in rows],
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
                # asked past the end of a finished job: nothing more will come; answer how it ended
                yield from (_event_pb(e) for e in self.store.events(job.job_id, job.last_sequence, limit=1))
                return
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
        if job.spec.kind != "search":
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"job {job.job_id} is a {job.spec.kind}, not a "
                               f"search: it has no search result or artifacts (ListPredictors shows the predictor "
                               f"version a retrain wrote)")
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
            res = C.SearchResult.read(out / C.RESULT_FILE)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("job %s: unreadable %s: %r", job.job_id, C.RESULT_FILE, e)
            raise ServiceError(grpc.StatusCode.DATA_LOSS, f"job {job.job_id}: its result is unreadable") from None
        b = res.best
        student = pb.Student(arch_json=b.arch_json, depths=b.depths, measured_acc=b.measured_acc,
                             predicted_acc=b.predicted_acc, flops=b.flops, params=b.params,
                             predicted_rank=b.predicted_rank)
        arts = [pb.ArtifactInfo(kind=kind, filename=name, size_bytes=served.stat().st_size)
                for kind, name in _ARTIFACT_FILES.items() if (served := self._served(job, name)) is not None]
        doc = res.to_dict()  # the client sees its own names for the inputs, not the server's files
        doc["request"].update(dataset=job.spec.dataset, teacher=job.spec.teacher or "train",
                              predictor="latest" if job.spec.request.predictor == "latest" else "")
        doc["predictor_version"] = self.runner.predictor_version(job)  # "shipped" or the client's "vN"
        return pb.SearchResult(job_id=job.job_id, best=student, teacher_acc=res.teacher_acc,
                               timings_s=res.timings_s, candidates=res.candidates, top_k=res.top_k, artifacts=arts,
                               result_json=json.dumps(doc), input_spec=pb.InputSpec(**res.input_spec.to_dict()),
                               class_names=res.class_names, warnings=res.warnings, spec=_spec_pb(job.spec),
                               teacher_kind=res.teacher_kind, proxy_teacher_acc=res.proxy_teacher_acc or 0.0)

    def _served(self, job: J.JobRow, name: str) -> Path | None:
        """The file a client gets for artifact `name` (None: the job has none). Tables are served as a copy whose
        cells name no server file (a trial's checkpoint path becomes relative to the job's output, or empty),
        made once by a check worker (the server process loads no Parquet library)."""
        out = self.runner.output_dir(job.job_id)
        src = out / name
        if not src.is_file():
            return None
        if name not in _TABLES:
            return src
        dst = self.runner.job_dir(job.job_id) / "client" / name
        if not dst.is_file() or dst.stat().st_mtime_ns < src.stat().st_mtime_ns:
            dst.parent.mkdir(parents=True, exist_ok=True)
            _, err = self.checker.call("client_table", src=str(src), dst=str(dst), out_dir=str(out),
                                       hidden=[str(Path(self.cfg.state_dir).resolve()), str(self.cfg.state_dir)])
            if err:
                log.error("job %s: cannot make the client's copy of %s: %s", job.job_id, name, err)
                raise ServiceError(grpc.StatusCode.DATA_LOSS, f"job {job.job_id}: its {name} is unreadable")
        return dst

    @_rpc("stream")
    def DownloadArtifact(self, request, context, client):
        if request.kind not in _ARTIFACT_FILES:
            raise _invalid("kind", f"unknown or unspecified artifact kind {request.kind}")
        job = self._finished(request.job_id, client)
        name = _ARTIFACT_FILES[request.kind]
        path = self._served(job, name)
        if path is None:
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

    # ---- the client's own predictor (retrained on its search history) -------------------------------------
    @_rpc("unary")
    def RetrainPredictor(self, request, context, client):
        self._not_draining()
        if not self.cfg.history:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "this server keeps no search histories "
                               "(started with --no-history), so there is nothing to retrain on")
        rid = request.request_id
        if rid and not _REQUEST_ID_RE.match(rid):
            raise _invalid("request_id", "at most 128 printable ASCII characters, no spaces")
        if not 0 <= request.episodes <= J.RetrainSpec.max_episodes:
            raise _invalid("episodes", f"must be in [0, {J.RetrainSpec.max_episodes}] (0: {J.RetrainSpec.episodes})"
                           f", got {request.episodes}")
        spec = J.RetrainSpec(episodes=request.episodes or J.RetrainSpec.episodes,
                             seed=request.seed if request.HasField("seed") else 0)
        spec.validate()
        if rid:
            old = self.store.get_by_request(client, rid)
            if old is not None:
                job = self._check_retry(old, request, client, spec)
                return _job_pb(job, self.store.queue_position(job))
        hist = self.runner.history_dir(client)
        if not any((hist / "tasks").glob("*.parquet")):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "your search history is empty: it grows with "
                               "every search of yours that distils students; retrain after one has finished")
        job, _ = self.runner.submit(client, rid, spec)
        return _job_pb(job, self.store.queue_position(job))

    @_rpc("unary")
    def ListPredictors(self, request, context, client):
        return pb.ListPredictorsResponse(versions=[_version_pb(m, latest) for m, latest in
                                                   C.predictor_versions(self.runner.history_dir(client))])


def _version_pb(m: dict, latest: bool) -> pb.PredictorVersion:
    b, a = m["val_spearman_before"]["all"], m["val_spearman_after"]["all"]
    shown = {k: v for k, v in m.items() if k not in ("history", "parent", "metadataset", "command")}  # server paths
    v = pb.PredictorVersion(version=m["version"], parent_version=m.get("parent_version", ""), latest=latest,
                            promoted=bool(m["promoted"]), history_tasks=int(m.get("history_tasks", 0)),
                            history_students=int(m.get("history_students", 0)),
                            created_unix_s=float(m.get("created_unix_s", 0.0)), manifest_json=json.dumps(shown))
    if b is not None:
        v.val_spearman_before = b
    if a is not None:
        v.val_spearman_after = a
    return v
