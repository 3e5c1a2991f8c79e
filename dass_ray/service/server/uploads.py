"""Uploads and the inputs of a submit: streamed into the state directory, checked (sha256, size cap, then decoded
by a check worker process), stored content-addressed per client; paths under the server's data roots."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

import grpc

from dass_ray.service import jobs as J
from dass_ray.service.server.rpc import ServiceError, _invalid, _rpc

try:
    from dass_ray.v1 import search_pb2 as pb
except ImportError as e:  # pragma: no cover - only on an install that skipped the generator
    raise ImportError(f"the generated gRPC code is missing ({e}); run `make proto` "
                      f"(python scripts/gen_proto.py)") from None

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_DATASET_EXTS = (".parquet", ".npz")


class InputsMixin:
    """The upload RPCs and the resolution of a submit's dataset/teacher (part of `SearchServicer`)."""

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
            ext = Path(name).suffix.lower()
            final = self.blob_dir / f"{kind}s" / f"{sha}{ext if kind == 'dataset' else '.pt'}"
            mine = self.store.get_upload(client, kind, sha)
            if mine is not None and Path(mine.path).is_file() and Path(mine.path).suffix == final.suffix:
                return mine, True  # this client already sent these bytes, in this format
            # Validated for this client and format, whoever else sent the same bytes before: the answer (and
            # how long it takes) tells nobody what another client uploaded. The stored file is shared.
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

    def _dataset_info(self, path: Path, shown: str) -> dict:
        info, err = self.checker.call("dataset", path=str(path), shown=shown)
        if err:
            raise _invalid("dataset", err)
        return info

    def _teacher_info(self, path: Path, shown: str) -> dict:
        info, err = self.checker.call("teacher", path=str(path), shown=shown)
        if err:
            raise _invalid("teacher", err)
        return info

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
                              already_present=present, kind=i.get("kind", "family"))

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
