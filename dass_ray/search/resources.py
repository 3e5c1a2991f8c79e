"""The one place that maps dass_ray work kinds to Ray resource requests.

Every Ray layer (encoder actors, predictor replicas, Tune KD trials, Ray Train workers) asks this module what to
request, so that the same code runs on a laptop (`ray.init()`, no custom resources, maybe no GPU) and on the
autoscaling clusters of `cluster/` (see `cluster/README.md` for which work goes on which worker type).

The decision is made from the cluster's resources *at call time* (`ray.cluster_resources()`), passed in as a
plain dict so that the functions here are pure and testable without Ray:

* ``dass_cpu_worker`` / ``dass_gpu_worker`` -- one unit on every node of the `cpu_worker` / `gpu_worker` type
  of our cluster configs.
* ``dass_autoscale_cpu_worker`` / ``dass_autoscale_gpu_worker`` -- advertised by the *head* of our autoscaling
  clusters: "nodes of that type can be added on demand", because with ``min_workers: 0`` a fresh cluster
  shows neither worker resources nor GPUs yet, but a request for them makes the autoscaler launch one.
* ``GPU`` -- any GPU (a laptop's, or an on-prem node's).

Custom resources are hard constraints in Ray, so they are only requested when the cluster has (or can add)
nodes that carry them; otherwise a request would never be scheduled. Work pinned to CPU workers asks for a
tiny fraction (``CPU_WORKER_SHARE``) of the per-node ``dass_cpu_worker`` unit, so the node's CPUs, not the
marker, limit how many actors share a node.

Kinds (see ``KINDS``)::

    encoder            1 CPU on a CPU worker; GPU only if asked (use_gpu=True)
    predictor          1 GPU when the cluster has/can add GPUs, else 1 CPU on a CPU worker
    kd_trial           1 GPU (+1 CPU) when available, else 1 CPU on a CPU worker
    teacher_train      like kd_trial (teacher training / soft-label generation)
    meta_train_worker  like kd_trial (one Ray Train data-parallel meta-training worker)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "CPU_WORKER_RESOURCE",
    "GPU_WORKER_RESOURCE",
    "AUTOSCALE_CPU_WORKER_RESOURCE",
    "AUTOSCALE_GPU_WORKER_RESOURCE",
    "CPU_WORKER_SHARE",
    "KINDS",
    "KindSpec",
    "ClusterCaps",
    "ResourceRequest",
    "cluster_caps",
    "resource_request",
    "ray_options",
    "resource_bundle",
    "scaling_config_kwargs",
]

CPU_WORKER_RESOURCE = "dass_cpu_worker"
GPU_WORKER_RESOURCE = "dass_gpu_worker"
AUTOSCALE_CPU_WORKER_RESOURCE = "dass_autoscale_cpu_worker"
AUTOSCALE_GPU_WORKER_RESOURCE = "dass_autoscale_gpu_worker"

# Share of the per-node `dass_cpu_worker` unit one piece of work asks for: up to 1000 per node, so CPUs are the
# real limit. (Ray keeps resource amounts to 1e-4.)
CPU_WORKER_SHARE = 0.001


@dataclass(frozen=True)
class KindSpec:
    """Default request of one kind of work."""

    name: str
    num_cpus: float  # CPUs per unit of work (also when it runs on a GPU: data loading, host side)
    gpu_by_default: bool  # use a GPU when the cluster has (or can add) one and the caller does not say
    num_gpus: float = 1.0  # GPUs per unit of work when on GPU
    description: str = ""


KINDS: dict[str, KindSpec] = {
    spec.name: spec
    for spec in (
        KindSpec("encoder", 1.0, False, description="encoder actor: teacher + data shards -> embeddings"),
        KindSpec("predictor", 1.0, True, description="predictor replica: scores embeddings"),
        KindSpec("kd_trial", 1.0, True, description="one Tune trial = one real KD run"),
        KindSpec("teacher_train", 1.0, True, description="teacher training / soft-label generation"),
        KindSpec("meta_train_worker", 1.0, True, description="one Ray Train meta-training worker"),
    )
}


@dataclass(frozen=True)
class ClusterCaps:
    """What a cluster has or can add, read from its resources."""

    cpu_workers: bool  # nodes of type `cpu_worker` exist or can be autoscaled in
    gpus: bool  # GPUs exist or GPU workers can be autoscaled in


def _positive(resources: Mapping[str, Any], key: str) -> bool:
    try:
        return float(resources.get(key, 0) or 0) > 0
    except (TypeError, ValueError):
        return False


def cluster_caps(cluster_resources: Mapping[str, Any]) -> ClusterCaps:
    """Read a `ray.cluster_resources()`-style dict."""
    r = cluster_resources
    return ClusterCaps(
        cpu_workers=_positive(r, CPU_WORKER_RESOURCE) or _positive(r, AUTOSCALE_CPU_WORKER_RESOURCE),
        gpus=_positive(r, "GPU") or _positive(r, GPU_WORKER_RESOURCE) or _positive(r, AUTOSCALE_GPU_WORKER_RESOURCE),
    )


@dataclass(frozen=True)
class ResourceRequest:
    """A resolved request; convert with `to_options`, `to_bundle` or `to_scaling_config_kwargs`."""

    kind: str
    num_cpus: float
    num_gpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)  # custom resources only

    @property
    def use_gpu(self) -> bool:
        return self.num_gpus > 0

    def to_options(self) -> dict[str, Any]:
        """Keyword arguments for ``remote_fn.options(...)`` / ``ActorClass.options(...)``."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}

    def to_bundle(self) -> dict[str, float]:
        """One placement-group bundle (``{"CPU": .., "GPU": .., custom..}``), zero entries left out.

        Fits ``tune.PlacementGroupFactory([bundle])``, ``tune.with_resources(..., resources=bundle)`` and
        Ray Train's ``resources_per_worker``.
        """
        bundle: dict[str, float] = {}
        if self.num_cpus > 0:
            bundle["CPU"] = self.num_cpus
        if self.num_gpus > 0:
            bundle["GPU"] = self.num_gpus
        bundle.update({k: v for k, v in self.resources.items() if v > 0})
        return bundle

    def to_scaling_config_kwargs(self) -> dict[str, Any]:
        """``use_gpu`` and ``resources_per_worker`` for ``ray.train.ScalingConfig(num_workers=.., **kw)``."""
        return {"use_gpu": self.use_gpu, "resources_per_worker": self.to_bundle()}


def max_cluster_cpus(cluster_resources: Mapping[str, Any] | None = None) -> int:
    """CPUs the running cluster has now, or can grow to under its autoscaler, whichever is more (at least 1).

    Concurrency limits (KD trials in flight, label-generation runs in flight) must come from this, not from the
    CPUs up at start: the heads of our autoscaling configs have `CPU: 0`, so on a fresh cluster "the CPUs now"
    is 0, the work never asks for more, and the autoscaler never adds a node (docs/scaling.md B6).

    The growth comes from the head's markers: in `cluster/*.yaml`, `dass_autoscale_cpu_worker` and
    `dass_autoscale_gpu_worker` carry the CPUs that worker type has at its `max_workers` (a test checks each
    config's arithmetic). When the autoscaler published its config to the GCS (autoscaler v2), its maximum is
    used as well.
    """
    import sys

    res = cluster_resources if cluster_resources is not None else _current_cluster_resources()
    now = float(res.get("CPU", 0) or 0)
    markers = sum(float(res.get(k, 0) or 0) for k in (AUTOSCALE_CPU_WORKER_RESOURCE, AUTOSCALE_GPU_WORKER_RESOURCE))
    published = 0.0
    if cluster_resources is None:
        try:
            from ray._private.state import state  # what Ray Data reads for the same purpose; private, so guarded

            published = float((state.get_max_resources_from_cluster_config() or {}).get("CPU", 0) or 0)
        except Exception:
            published = 0.0
        if published >= sys.maxsize:
            published = 0.0
    return max(1, int(max(now, markers, published)))


def _current_cluster_resources() -> dict[str, float]:
    import ray  # only when the caller did not pass the resources in

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialized: call ray.init() first or pass cluster_resources explicitly")
    return dict(ray.cluster_resources())


def resource_request(
    kind: str,
    cluster_resources: Mapping[str, Any] | None = None,
    *,
    use_gpu: bool | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> ResourceRequest:
    """Resolve the request of one unit of `kind` on a cluster with `cluster_resources`.

    Args:
        kind: one of ``KINDS``.
        cluster_resources: ``ray.cluster_resources()`` (fetched from the running Ray when None).
        use_gpu: None = the kind's default (GPU when the cluster has or can add one, encoders stay on CPU);
            True = demand a GPU (ValueError when the cluster has none and cannot add one, since the work
            could never be scheduled); False = CPU only.
        num_cpus: override the kind's CPUs per unit (fractions are fine, e.g. 0.5 to pack encoder actors).
        num_gpus: override the GPUs per unit when on GPU (e.g. 0.25 to share a GPU between predictor replicas).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown work kind {kind!r}; known: {sorted(KINDS)}")
    spec = KINDS[kind]
    if cluster_resources is None:
        cluster_resources = _current_cluster_resources()
    caps = cluster_caps(cluster_resources)

    cpus = spec.num_cpus if num_cpus is None else float(num_cpus)
    if cpus < 0:
        raise ValueError(f"num_cpus must be >= 0, got {cpus}")

    if use_gpu is None:
        on_gpu = spec.gpu_by_default and caps.gpus
    elif use_gpu:
        if not caps.gpus:
            raise ValueError(
                f"use_gpu=True for {kind!r} but the cluster has no GPU and cannot add one "
                f"(cluster resources: {dict(cluster_resources)})"
            )
        on_gpu = True
    else:
        on_gpu = False

    if on_gpu:
        gpus = spec.num_gpus if num_gpus is None else float(num_gpus)
        if gpus <= 0:
            raise ValueError(f"num_gpus must be > 0 for work on a GPU, got {gpus}")
        # GPU work: the GPU itself pins it to GPU nodes; no custom resource needed.
        return ResourceRequest(kind=kind, num_cpus=cpus, num_gpus=gpus, resources={})

    custom = {CPU_WORKER_RESOURCE: CPU_WORKER_SHARE} if caps.cpu_workers else {}
    return ResourceRequest(kind=kind, num_cpus=cpus, num_gpus=0.0, resources=custom)


def ray_options(
    kind: str,
    cluster_resources: Mapping[str, Any] | None = None,
    *,
    use_gpu: bool | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``.options(...)`` of a task or actor of `kind` (see `resource_request`).

    >>> ray_options("encoder", {"CPU": 8.0})
    {'num_cpus': 1.0, 'num_gpus': 0.0, 'resources': {}}
    >>> ray_options("predictor", {"CPU": 8.0, "GPU": 1.0})
    {'num_cpus': 1.0, 'num_gpus': 1.0, 'resources': {}}
    >>> ray_options("encoder", {"CPU": 16.0, "dass_cpu_worker": 2.0})
    {'num_cpus': 1.0, 'num_gpus': 0.0, 'resources': {'dass_cpu_worker': 0.001}}
    """
    return resource_request(
        kind, cluster_resources, use_gpu=use_gpu, num_cpus=num_cpus, num_gpus=num_gpus
    ).to_options()


def resource_bundle(
    kind: str,
    cluster_resources: Mapping[str, Any] | None = None,
    *,
    use_gpu: bool | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> dict[str, float]:
    """A placement-group bundle for `kind` (Tune trial resources, Train ``resources_per_worker``)."""
    return resource_request(
        kind, cluster_resources, use_gpu=use_gpu, num_cpus=num_cpus, num_gpus=num_gpus
    ).to_bundle()


def scaling_config_kwargs(
    kind: str = "meta_train_worker",
    cluster_resources: Mapping[str, Any] | None = None,
    *,
    use_gpu: bool | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> dict[str, Any]:
    """``use_gpu`` + ``resources_per_worker`` for ``ray.train.ScalingConfig``."""
    return resource_request(
        kind, cluster_resources, use_gpu=use_gpu, num_cpus=num_cpus, num_gpus=num_gpus
    ).to_scaling_config_kwargs()
