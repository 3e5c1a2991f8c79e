"""Offline validation of the cluster configs in `cluster/` (no cloud credentials, no network, no Ray cluster).

* `validate_launcher_config(path)`: a Ray cluster-launcher YAML (`ray up`), checked the way Ray itself does it,
  `validate_config(prepare_config(cfg))` from `ray.autoscaler._private.util` (JSON schema shipped in the wheel,
  provider defaults merged, `head_node_type`, global `max_workers` vs the `min_workers` sum), plus per node
  type `min_workers <= max_workers` and a check that a `local` (on-prem) config carries no node-type keys
  that Ray would abort on or silently override.
* `validate_kuberay_manifest(path)`: a KubeRay `RayCluster` manifest. The wheel ships no CRD schema, so the
  structure is checked here (apiVersion/kind, head group, worker groups, replicas, container resources, GPU
  limits, autoscaler options); then the autoscaler config that the in-tree autoscaler would derive from it
  (`ray.autoscaler._private.kuberay.autoscaling_config._derive_autoscaling_config_from_ray_cr`) is built and
  passed through `validate_config`.

Both raise `ValueError("<path>: <what is wrong>")` and return the prepared / derived autoscaler config dict.

    python -m dass_ray.cluster_config cluster/*.yaml
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from typing import Any, Iterator, Mapping

import yaml

__all__ = [
    "validate_launcher_config",
    "validate_kuberay_manifest",
    "validate_file",
    "is_kuberay_manifest",
    "summarize",
    "main",
]

KUBERAY_API_VERSION = "ray.io/v1"
KUBERAY_KIND = "RayCluster"
UPSCALING_MODES = ("Default", "Aggressive", "Conservative")
GPU_LIMIT_KEY = "nvidia.com/gpu"
GPU_WORKER_RESOURCE = "dass_gpu_worker"  # same name as dass_ray.search.resources.GPU_WORKER_RESOURCE

_NOISY_LOGGERS = (
    "ray.autoscaler._private.util",
    "ray.autoscaler._private.local.config",
    "ray.autoscaler._private.kuberay.autoscaling_config",
    "ray.autoscaler._private.cli_logger",
)


@contextlib.contextmanager
def _quiet_autoscaler_logs() -> Iterator[None]:
    """Ray's config helpers log INFO lines ("setting max workers for ...") that would clutter the CLI."""
    saved = []
    for name in _NOISY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def _load_yaml(path: str | os.PathLike) -> Any:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read file: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None


def _describe_exception(e: BaseException) -> str:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - jsonschema comes with ray[default]
        jsonschema = None
    if jsonschema is not None and isinstance(e, jsonschema.ValidationError):
        where = "/".join(str(p) for p in e.absolute_path) or "<top level>"
        return f"schema violation at {where}: {e.message}"
    # click.ClickException (cli_logger.abort) carries its text in .message / .format_message().
    msg = getattr(e, "message", None) or str(e)
    if not msg:
        return type(e).__name__
    return msg if isinstance(e, ValueError) else f"{type(e).__name__}: {msg}"


# --------------------------------------------------------------------------------------------------------------
# Cluster-launcher YAML
# --------------------------------------------------------------------------------------------------------------


def is_kuberay_manifest(doc: Any) -> bool:
    return isinstance(doc, Mapping) and ("apiVersion" in doc or "kind" in doc)


def _check_launcher_config(cfg: Any, path: str) -> dict:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(cfg).__name__}")
    provider = cfg.get("provider")
    if not isinstance(provider, dict) or not provider.get("type"):
        raise ValueError(f"{path}: missing `provider.type`")
    if provider["type"] == "local":
        for key in ("available_node_types", "head_node_type", "head_node", "worker_nodes"):
            if key in cfg:
                raise ValueError(
                    f"{path}: `{key}` is not supported with provider type `local` (Ray uses a single node type "
                    "built from head_ip/worker_ips; set per-host resources in worker_start_ray_commands)"
                )

    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with _quiet_autoscaler_logs():
            prepared = prepare_config(copy.deepcopy(cfg))
            validate_config(prepared)
    except Exception as e:  # jsonschema.ValidationError, ValueError, RuntimeError, KeyError, click exceptions
        raise ValueError(f"{path}: {_describe_exception(e)}") from None

    node_types = prepared.get("available_node_types") or {}
    for name, node_type in node_types.items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if lo > hi:
            raise ValueError(
                f"{path}: node type {name!r} has min_workers={lo} greater than max_workers={hi}"
            )
    if prepared.get("max_workers", 0) < 0:
        raise ValueError(f"{path}: max_workers must be >= 0")
    return prepared


def validate_launcher_config(path: str | os.PathLike) -> dict:
    """Validate a Ray cluster-launcher YAML; return the prepared config (defaults merged) or raise ValueError."""
    path = os.fspath(path)
    cfg = _load_yaml(path)
    if is_kuberay_manifest(cfg):
        raise ValueError(f"{path}: this is a Kubernetes manifest, not a cluster-launcher config")
    return _check_launcher_config(cfg, path)


# --------------------------------------------------------------------------------------------------------------
# KubeRay RayCluster manifest
# --------------------------------------------------------------------------------------------------------------


def _quantity(value: Any, where: str, path: str):
    from ray.autoscaler._private.kuberay.utils import parse_quantity

    try:
        return parse_quantity(str(value))
    except Exception:
        raise ValueError(f"{path}: {where}: {value!r} is not a Kubernetes resource quantity") from None


def _check_pod_template(group: Mapping, where: str, path: str, *, is_head: bool) -> None:
    template = group.get("template")
    if not isinstance(template, Mapping) or not isinstance(template.get("spec"), Mapping):
        raise ValueError(f"{path}: {where}: missing `template.spec`")
    containers = template["spec"].get("containers")
    if not isinstance(containers, list) or not containers:
        raise ValueError(f"{path}: {where}: `template.spec.containers` must be a non-empty list")
    for i, container in enumerate(containers):
        cwhere = f"{where} container {i}"
        if not isinstance(container, Mapping):
            raise ValueError(f"{path}: {cwhere}: not a mapping")
        if not container.get("image"):
            raise ValueError(f"{path}: {cwhere}: missing `image`")
        resources = container.get("resources") or {}
        if not isinstance(resources, Mapping):
            raise ValueError(f"{path}: {cwhere}: `resources` must be a mapping")
        requests = resources.get("requests") or {}
        limits = resources.get("limits") or {}
        if not isinstance(requests, Mapping) or not isinstance(limits, Mapping):
            raise ValueError(f"{path}: {cwhere}: `resources.requests` / `resources.limits` must be mappings")
        for key in set(requests) | set(limits):
            if key in requests and key in limits:
                req = _quantity(requests[key], f"{cwhere} requests.{key}", path)
                lim = _quantity(limits[key], f"{cwhere} limits.{key}", path)
                if req > lim:
                    raise ValueError(f"{path}: {cwhere}: requests.{key}={requests[key]} exceeds limits.{key}={limits[key]}")
            else:
                value = requests.get(key, limits.get(key))
                _quantity(value, f"{cwhere} resources.{key}", path)
        if GPU_LIMIT_KEY in requests and GPU_LIMIT_KEY not in limits:
            raise ValueError(
                f"{path}: {cwhere}: `{GPU_LIMIT_KEY}` is requested but has no limit (Kubernetes needs the limit "
                "for extended resources, and the Ray autoscaler reads the GPU count from it)"
            )
        if i == 0:  # the Ray container: KubeRay and the autoscaler size the Ray node from it
            for key in ("cpu", "memory"):
                if key not in requests and key not in limits:
                    raise ValueError(f"{path}: {cwhere} (the Ray container): set resources.limits.{key}")


def _gpu_limit(group: Mapping) -> Any:
    try:
        limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {}) or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return limits.get(GPU_LIMIT_KEY)


def _wants_gpu(group: Mapping) -> bool:
    """A worker group meant for GPUs: named so, or advertising dass_gpu_worker / num-gpus."""
    params = group.get("rayStartParams") or {}
    name = str(group.get("groupName", ""))
    return (
        "gpu" in name.lower()
        or GPU_WORKER_RESOURCE in str(params.get("resources", ""))
        or "num-gpus" in params
        or "GPU" in (group.get("resources") or {})
    )


def _check_ray_start_params(group: Mapping, where: str, path: str) -> None:
    params = group.get("rayStartParams", {})
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ValueError(f"{path}: {where}: `rayStartParams` must be a mapping")
    for key, value in params.items():
        if not isinstance(value, str):
            raise ValueError(
                f"{path}: {where}: rayStartParams.{key} must be a string (KubeRay's type is map[string]string), "
                f"got {value!r}"
            )


def _check_kuberay_structure(cr: Any, path: str, *, require_autoscaling: bool) -> None:
    if not isinstance(cr, Mapping):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(cr).__name__}")
    if cr.get("apiVersion") != KUBERAY_API_VERSION:
        raise ValueError(f"{path}: apiVersion must be {KUBERAY_API_VERSION!r}, got {cr.get('apiVersion')!r}")
    if cr.get("kind") != KUBERAY_KIND:
        raise ValueError(f"{path}: kind must be {KUBERAY_KIND!r}, got {cr.get('kind')!r}")
    metadata = cr.get("metadata")
    if not isinstance(metadata, Mapping) or not metadata.get("name"):
        raise ValueError(f"{path}: missing `metadata.name`")
    spec = cr.get("spec")
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: missing `spec`")

    if require_autoscaling and spec.get("enableInTreeAutoscaling") is not True:
        raise ValueError(f"{path}: `spec.enableInTreeAutoscaling` must be true")
    options = spec.get("autoscalerOptions", {})
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise ValueError(f"{path}: `spec.autoscalerOptions` must be a mapping")
    if "idleTimeoutSeconds" in options:
        idle = options["idleTimeoutSeconds"]
        if isinstance(idle, bool) or not isinstance(idle, int) or idle < 0:
            raise ValueError(f"{path}: autoscalerOptions.idleTimeoutSeconds must be an integer >= 0, got {idle!r}")
    if "upscalingMode" in options and options["upscalingMode"] not in UPSCALING_MODES:
        raise ValueError(
            f"{path}: autoscalerOptions.upscalingMode must be one of {UPSCALING_MODES}, got {options['upscalingMode']!r}"
        )

    head = spec.get("headGroupSpec")
    if not isinstance(head, Mapping):
        raise ValueError(f"{path}: missing `spec.headGroupSpec`")
    _check_ray_start_params(head, "headGroupSpec", path)
    _check_pod_template(head, "headGroupSpec", path, is_head=True)

    groups = spec.get("workerGroupSpecs", [])
    if groups is None:
        groups = []
    if not isinstance(groups, list):
        raise ValueError(f"{path}: `spec.workerGroupSpecs` must be a list")
    seen: set[str] = set()
    for i, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise ValueError(f"{path}: workerGroupSpecs[{i}] is not a mapping")
        name = group.get("groupName")
        where = f"worker group {name!r}" if name else f"workerGroupSpecs[{i}]"
        if not name or not isinstance(name, str):
            raise ValueError(f"{path}: {where}: missing `groupName`")
        if name in seen:
            raise ValueError(f"{path}: duplicate worker groupName {name!r}")
        seen.add(name)
        for key in ("minReplicas", "maxReplicas"):
            value = group.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{path}: {where}: `{key}` must be an integer >= 0, got {value!r}")
        lo, hi = group["minReplicas"], group["maxReplicas"]
        if lo > hi:
            raise ValueError(f"{path}: {where}: minReplicas={lo} is greater than maxReplicas={hi}")
        if "replicas" in group:
            replicas = group["replicas"]
            if isinstance(replicas, bool) or not isinstance(replicas, int) or not lo <= replicas <= hi:
                raise ValueError(f"{path}: {where}: replicas={replicas!r} must lie in [minReplicas, maxReplicas]")
        _check_ray_start_params(group, where, path)
        _check_pod_template(group, where, path, is_head=False)
        if _wants_gpu(group):
            limit = _gpu_limit(group)
            if limit is None or _quantity(limit, f"{where} limits.{GPU_LIMIT_KEY}", path) <= 0:
                raise ValueError(
                    f"{path}: {where} is a GPU group but its Ray container has no `{GPU_LIMIT_KEY}` limit"
                )


def validate_kuberay_manifest(path: str | os.PathLike, *, require_autoscaling: bool = True) -> dict:
    """Validate a KubeRay RayCluster manifest; return the derived autoscaler config or raise ValueError."""
    path = os.fspath(path)
    cr = _load_yaml(path)
    _check_kuberay_structure(cr, path, require_autoscaling=require_autoscaling)

    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
    from ray.autoscaler._private.util import validate_config

    cr = copy.deepcopy(cr)
    # A manifest usually leaves the namespace to `kubectl -n`; the API server fills it in for the autoscaler.
    cr["metadata"].setdefault("namespace", "default")
    try:
        with _quiet_autoscaler_logs():
            derived = _derive_autoscaling_config_from_ray_cr(cr)
            validate_config(derived)
    except Exception as e:
        hint = ""
        if isinstance(e, (json.JSONDecodeError, AssertionError)):
            hint = (
                " (rayStartParams.resources must be a quoted JSON object of integer amounts, written in YAML as "
                """'"{\\"my_resource\\": 1}"')"""
            )
        raise ValueError(f"{path}: derived autoscaler config is invalid: {_describe_exception(e)}{hint}") from None
    return derived


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def validate_file(path: str | os.PathLike) -> tuple[str, dict]:
    """Validate either kind of file; return ("kuberay" | "launcher", config)."""
    doc = _load_yaml(path)
    if is_kuberay_manifest(doc):
        return "kuberay", validate_kuberay_manifest(path)
    return "launcher", validate_launcher_config(path)


def summarize(config: Mapping) -> str:
    """One line: provider, node types with their resources and worker bounds."""
    parts = []
    head = config.get("head_node_type")
    for name, node_type in (config.get("available_node_types") or {}).items():
        res = ",".join(f"{k}={v}" for k, v in (node_type.get("resources") or {}).items() if k != "memory")
        bounds = f"[{node_type.get('min_workers', 0)}..{node_type.get('max_workers', 0)}]"
        if name == head:
            # On-prem (`local`) clusters use one node type for the head and the workers.
            bounds = bounds if node_type.get("max_workers", 0) else ""
            parts.append(f"{name}{bounds}(head{': ' + res if res else ''})")
        else:
            parts.append(f"{name}{bounds}{'(' + res + ')' if res else ''}")
    provider = (config.get("provider") or {}).get("type", "?")
    return f"provider={provider} max_workers={config.get('max_workers')} node_types: {' '.join(parts)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print("usage: python -m dass_ray.cluster_config CONFIG.yaml [CONFIG.yaml ...]", file=sys.stderr)
        return 0 if args else 2
    failed = 0
    for path in args:
        try:
            kind, config = validate_file(path)
        except ValueError as e:
            failed += 1
            print(f"FAIL {e}")
        else:
            print(f"OK   {path}: {kind}, {summarize(config)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
