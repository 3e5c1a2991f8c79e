"""The gRPC front door (proto/dass_ray/v1/search.proto): remote clients upload a dataset and a teacher, submit a
search, watch it, fetch the best student and download its artifacts.

The servicer only translates: protobuf -> `dass_ray.service.jobs.SearchSpec` / uploads -> the job runner and the
project's own validators (run in check worker processes, `dass_ray.service.checks`) -> protobuf, and errors ->
gRPC status codes. Jobs, events and uploads live in the state directory (`dass_ray.service.jobs`), so a restarted server
carries on where the last one stopped.

`create_server(cfg) -> (server, port)` builds and starts a server (tests bind port 0); `serve(cfg)` runs one
until SIGTERM/SIGINT, then drains: no new work is accepted, in-flight calls get `grace_s` seconds, running
searches are left running for the next server to re-attach.
"""
from dass_ray.service.server.app import Service, ServerConfig, create_server, default_data_roots, serve
from dass_ray.service.server.rpc import ServiceError, TokenFile
from dass_ray.service.server.servicer import SERVICE_NAME, SearchServicer

__all__ = ["Service", "ServerConfig", "create_server", "default_data_roots", "serve", "ServiceError", "TokenFile",
           "SERVICE_NAME", "SearchServicer"]
