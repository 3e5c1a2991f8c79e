"""Server assembly: `ServerConfig`, the running `Service` (gRPC server, servicer, job runner, health), `serve`."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dass_ray import contract as C
from dass_ray.fileutil import STORAGE_ENV, shared_datasets_root
from dass_ray.service import jobs as J
from dass_ray.service.jobs.rayhead import LocalRayHead
from dass_ray.service.server.rpc import TokenFile, add_servicer
from dass_ray.service.server.servicer import MAX_MESSAGE, SERVICE_NAME, SearchServicer, pb

log = logging.getLogger("dass_ray.server")


def default_data_roots() -> list[Path]:
    """Server-side directories a client may name by path: the package's bundled assets and the shared datasets."""
    roots = [Path(__file__).resolve().parents[2] / "assets"]
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
    address: str | None = None  # Ray dashboard address of the cluster the searches run on; None: a local head
    ray_num_cpus: int | None = None  # CPUs of the local head (None: all)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_running: int = 1
    max_queued: int = 100  # per client
    max_running_per_client: int = 0  # 0: up to max_running
    max_queued_total: int = 1000
    max_upload_bytes: int = 512 << 20
    workers: int = 64  # server threads (each open WatchJob/DownloadArtifact stream holds one)
    grace_s: float = 10.0
    data_roots: list[Path] = field(default_factory=default_data_roots)
    search_cmd: list[str] | None = None
    search_extra_args: list[str] = field(default_factory=list)
    search_defaults: dict = field(default_factory=dict)  # knob -> value for searches that leave it unset
    history: bool = True  # each client's searches append to that client's history (state_dir/history/...)
    caps: C.Caps = field(default_factory=C.Caps)  # per-search limits (over one: RESOURCE_EXHAUSTED)
    check_workers: int = 2  # processes that decode uploads (torch lives there, not in the server)


# ----------------------------------------------------------------------------------------------------------------
# Server assembly
# ----------------------------------------------------------------------------------------------------------------


class Service:
    """A running server: the gRPC server, its servicer, the job runner and the health servicer."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.tokens = TokenFile(cfg.token_file)
        # Every search is a Ray Job: on the cluster at `address`, else on one local head this server starts on
        # its first search (and the next server re-attaches). The jobs run in the cluster's environment, not this
        # process's: the checkpoint storage is passed on.
        storage = os.environ.get(STORAGE_ENV)
        self.ray_head = None if cfg.address else LocalRayHead(cfg.state_dir, cfg.ray_num_cpus)
        backend = J.RayJobBackend(cfg.address or self.ray_head.address,
                                  env_vars={STORAGE_ENV: storage} if storage else None)
        rcfg = J.RunnerConfig(max_running=cfg.max_running, max_queued=cfg.max_queued,
                              max_running_per_client=cfg.max_running_per_client,
                              max_queued_total=cfg.max_queued_total,
                              extra_args=list(cfg.search_extra_args), history=cfg.history)
        if cfg.search_cmd:
            rcfg.search_cmd = list(cfg.search_cmd)
        self.runner = J.JobRunner(cfg.state_dir, backend, rcfg)
        self.servicer = SearchServicer(cfg, self.runner, self.tokens)
        self.health = health.HealthServicer()
        self._executor = futures.ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="dass-grpc")
        self.server = grpc.server(
            self._executor,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=cfg.workers * 4,
        )
        add_servicer(self.servicer, self.server, pb.DESCRIPTOR.services_by_name["SearchService"], pb)
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
        self.servicer.checker.warm()  # the check workers import torch while the server already answers
        self.runner.start()
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("dass_ray.v1.SearchService on port %d (state %s, %s backend, at most %d running)", self.port,
                 self.cfg.state_dir, self.runner.backend.name, self.cfg.max_running)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new work, end watches, give in-flight calls `grace` seconds; searches keep running.
        Until the calls in flight have finished (or `grace` is up) the port stays open: a new call is answered
        (UNAVAILABLE "shutting down" for new work, health NOT_SERVING), not refused."""
        if self._stopped.is_set():
            return
        grace = self.cfg.grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        self.servicer.draining.set()
        self.runner.drain()
        self.health.enter_graceful_shutdown()
        self.runner._notify()  # wake watchers so they end promptly
        self.servicer.inflight.wait_idle(deadline - time.monotonic())
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.runner.stop()
        self.runner.store.close()
        self.servicer.checker.close()
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
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the port opens: a SIGTERM from then on drains
        signal.signal(sig, lambda *_: stop.set())
    svc, port = create_server(cfg)
    print(f"dass-ray: serving dass_ray.v1.SearchService on port {port}", flush=True)
    while not stop.wait(3600):
        pass
    print("dass-ray: draining (no new work; running searches continue)", flush=True)
    svc.stop()
    return 0
