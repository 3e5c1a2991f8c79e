"""The search service's job runner: a durable job table and event log, and the workers that run the searches.

Every job is one run of the search job contract (`scripts/search.py --dataset ... --output DIR`, its options
derived from `dass_ray.contract.SearchRequest`), which writes `DIR/events.jsonl` (progress),
`DIR/result.json` and the artifacts; or a retrain of its client's predictor on the client's own search history
(`scripts/retrain.py --history <the client's> --output DIR`: `DIR/events.jsonl` and `DIR/retrain.json`). The runner

- keeps the job table, the uploads table and each job's event log in SQLite (WAL mode) under the state
  directory, so they survive a restart of the server (`store`);
- runs each search as a **Ray Job** (`backends.RayJobBackend`, over the Ray Jobs REST API: no Ray library in
  the server) on the cluster given, or on one local head the server starts (`rayhead`), at most `max_running`
  at once (and `max_running_per_client` of one client), the rest queued per client and started in a fair order
  between clients (`store.fair_order`, `runner`); `LocalBackend` runs a search as a detached local
  process instead (tests of the runner itself);
- copies the search's events into the job's event log with the runner's own gapless sequence numbers (`events`);
  the search's terminal event ("done"/"failed") is held back until its process is known to have ended, so a
  client's stream ends with exactly one terminal event even when a worker dies and the search is resumed;
- after a restart re-attaches to the searches still running, and when a search's Ray Job is gone without an exit
  status (the Ray head was restarted) launches it again with `--resume`, so it continues from its last saved stage.

No gRPC here: `dass_ray.service.server` translates between protobuf and this package.
"""
from dass_ray.service.jobs.backends import Backend, LocalBackend, RayJobBackend, Status
from dass_ray.service.jobs.events import read_search_events, truncate_partial_line
from dass_ray.service.jobs.runner import JobRunner, RunnerConfig, default_retrain_command, default_search_command
from dass_ray.service.jobs.store import (CANCELLED, FAILED, QUEUED, RUNNING, STATES, SUCCEEDED, TERMINAL, Event,
                                         JobFinished, JobNotFound, JobRow, JobSpec, JobStore, QueueFull,
                                         RequestConflict, RetrainSpec, SearchSpec, Upload)

__all__ = ["Backend", "LocalBackend", "RayJobBackend", "Status", "read_search_events", "truncate_partial_line",
           "JobRunner", "RunnerConfig", "default_retrain_command", "default_search_command", "CANCELLED", "FAILED", "QUEUED", "RUNNING",
           "STATES", "SUCCEEDED", "TERMINAL", "Event", "JobFinished", "JobNotFound", "JobRow", "JobStore",
           "JobSpec", "QueueFull", "RequestConflict", "RetrainSpec", "SearchSpec", "Upload"]
