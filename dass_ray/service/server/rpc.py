"""Around every call: who is calling (a token file of `client-name token` lines), requests that do not decode
(INVALID_ARGUMENT, not grpc's INTERNAL "Exception deserializing request!"), and failures as gRPC status codes."""
from __future__ import annotations

import functools
import hmac
import logging
import threading
from pathlib import Path

import grpc

from dass_ray import contract as C
from dass_ray.service import jobs as J

log = logging.getLogger("dass_ray.server")

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
    if isinstance(e, C.RequestError):  # named by its proto field (budget.max_flops, not max_flops)
        f = C.FIELDS_BY_NAME.get(e.field)
        name = (f.proto if f is not None and f.proto else e.field)
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if e.over_cap else grpc.StatusCode.INVALID_ARGUMENT
        return code, f"{name}: {e}"
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


class Undecodable:
    """Stands for a request message that did not parse (e.g. invalid UTF-8 in a string field)."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def error(self) -> ServiceError:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {self.type_name} message "
                            f"(corrupt bytes, or a string field that is not UTF-8)")


def lenient(message_cls):
    """A request deserializer that answers `Undecodable` instead of raising (which grpc turns into INTERNAL)."""
    name = message_cls.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError, or anything a hostile payload provokes
            return Undecodable(name)

    return parse


def add_servicer(servicer, server, service_descriptor, messages) -> None:
    """Register `servicer` for every method of `service_descriptor` (as the generated `add_..._to_server` does),
    with lenient request deserializers. `messages`: the generated module holding the message classes."""
    handlers = {}
    for m in service_descriptor.methods:
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(m.client_streaming, m.server_streaming)]
        handlers[m.name] = make(getattr(servicer, m.name),
                                request_deserializer=lenient(getattr(messages, m.input_type.name)),
                                response_serializer=getattr(messages, m.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_descriptor.full_name, handlers),))


def _each(messages):
    for m in messages:
        if isinstance(m, Undecodable):
            raise m.error()
        yield m


def _checked(request):
    """The request, or (client streams) an iterator over it, with undecodable messages raised as errors."""
    if isinstance(request, Undecodable):
        raise request.error()
    return _each(request) if hasattr(request, "__next__") else request


class InFlight:
    """Counts the calls being served, so that a draining server keeps its port open until they have finished."""

    def __init__(self):
        self._n = 0
        self._cond = threading.Condition()

    def __enter__(self) -> "InFlight":
        with self._cond:
            self._n += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._n -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no call is in flight, at most `timeout` seconds; whether that happened."""
        with self._cond:
            return self._cond.wait_for(lambda: self._n == 0, timeout=max(0.0, timeout))


def _rpc(kind: str):
    """Authenticate (the client's name is passed to the method), count the call in flight (`self.inflight`) and
    turn exceptions into status codes."""

    def deco(fn):
        if kind == "stream":
            @functools.wraps(fn)
            def wrapper(self, request, context):
                client = self._authenticate(context)
                with self.inflight:
                    try:
                        yield from fn(self, _checked(request), context, client)
                    except Exception as e:  # noqa: BLE001
                        if isinstance(e, grpc.RpcError) or not context.is_active():
                            return
                        code, msg = _translate(e)
                        context.abort(code, msg)
        else:
            @functools.wraps(fn)
            def wrapper(self, request, context):
                client = self._authenticate(context)
                with self.inflight:
                    try:
                        return fn(self, _checked(request), context, client)
                    except Exception as e:  # noqa: BLE001
                        if isinstance(e, grpc.RpcError):
                            raise
                        code, msg = _translate(e)
                        context.abort(code, msg)
        return wrapper

    return deco
