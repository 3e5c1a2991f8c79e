"""The shipped cluster configs validate offline; broken copies are rejected; resource mapping is right.

No Ray cluster is started: everything here is YAML + Ray's config helpers (a second or two in all).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from dass_ray import cluster_config as cc
from dass_ray.search.resources import (
    AUTOSCALE_CPU_WORKER_RESOURCE,
    AUTOSCALE_GPU_WORKER_RESOURCE,
    CPU_WORKER_RESOURCE,
    CPU_WORKER_SHARE,
    GPU_WORKER_RESOURCE,
    KINDS,
    cluster_caps,
    ray_options,
    resource_bundle,
    resource_request,
    scaling_config_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "onprem.yaml"]
KUBERAY_FILE = CLUSTER / "kuberay.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _write(tmp_path: Path, doc: dict, name: str = "mutated.yaml") -> Path:
    out = tmp_path / name
    out.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cluster-launcher YAML
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_shipped_launcher_config_validates(name):
    cfg = cc.validate_launcher_config(CLUSTER / name)
    assert cfg["cluster_name"] == "dass-ray"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "cluster_synced_files" in cfg  # provider defaults were merged
    # Project install: pinned torch, then the project itself.
    cmds = " ".join(cfg["setup_commands"])
    assert "torch==2.14.1" in cmds and "torchvision==0.29.1" in cmds
    assert "pip install -e" in cmds
    assert cfg["head_start_ray_commands"] and cfg["worker_start_ray_commands"]


def test_aws_node_types():
    cfg = cc.validate_launcher_config(CLUSTER / "aws.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["max_workers"] == 0
    assert types["cpu_worker"]["resources"] == {CPU_WORKER_RESOURCE: 1}
    assert types["gpu_worker"]["resources"] == {GPU_WORKER_RESOURCE: 1}
    for name in ("cpu_worker", "gpu_worker"):
        assert types[name]["min_workers"] == 0
        assert types[name]["max_workers"] >= 1
    assert cfg["max_workers"] >= types["cpu_worker"]["max_workers"] + types["gpu_worker"]["max_workers"]
    assert types["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance family
    assert cfg["idle_timeout_minutes"] > 0
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


def test_aws_every_choice_line_is_commented():
    for line in (CLUSTER / "aws.yaml").read_text().splitlines():
        stripped = line.strip()
        for key in ("region:", "InstanceType:", "max_workers:", "availability_zone:", "ssh_user:"):
            if stripped.startswith(key):
                assert "#" in line, f"aws.yaml line without a comment: {line!r}"


def test_onprem_is_local_provider_with_placeholders():
    raw = _load(CLUSTER / "onprem.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    text = (CLUSTER / "onprem.yaml").read_text()
    for key in ("head_ip:", "worker_ips:"):
        line = next(line for line in text.splitlines() if line.strip().startswith(key))
        assert "#" in line
    cfg = cc.validate_launcher_config(CLUSTER / "onprem.yaml")
    start = " ".join(cfg["worker_start_ray_commands"])
    assert CPU_WORKER_RESOURCE in start and GPU_WORKER_RESOURCE in start


def _mutations(name: str):
    def unknown_key(cfg):
        cfg["not_a_ray_key"] = 1

    def wrong_head(cfg):
        cfg["head_node_type"] = "no_such_type"

    def min_gt_max_type(cfg):
        key = "cpu_worker"
        cfg["available_node_types"][key]["min_workers"] = 5
        cfg["available_node_types"][key]["max_workers"] = 2

    def min_sum_gt_global(cfg):
        cfg["available_node_types"]["cpu_worker"]["min_workers"] = 3
        cfg["max_workers"] = 2

    def global_min_gt_max(cfg):  # on-prem: min/max workers are global
        cfg["min_workers"] = 2
        cfg["max_workers"] = 1

    def bad_node_type_key(cfg):
        cfg["available_node_types"]["gpu_worker"]["gpus"] = 1

    def fractional_node_resource(cfg):
        cfg["available_node_types"]["cpu_worker"]["resources"] = {CPU_WORKER_RESOURCE: 0.5}

    def no_provider_type(cfg):
        del cfg["provider"]["type"]

    common = [unknown_key, wrong_head, no_provider_type]
    if name == "aws.yaml":
        return common + [min_gt_max_type, min_sum_gt_global, bad_node_type_key, fractional_node_resource]
    return common + [global_min_gt_max]


@pytest.mark.parametrize(
    "name,mutate",
    [(n, m) for n in LAUNCHER_FILES for m in _mutations(n)],
    ids=lambda x: x if isinstance(x, str) else x.__name__,
)
def test_mutated_launcher_config_rejected(tmp_path, name, mutate):
    cfg = _load(CLUSTER / name)
    mutate(cfg)
    bad = _write(tmp_path, cfg)
    with pytest.raises(ValueError) as err:
        cc.validate_launcher_config(bad)
    assert str(bad) in str(err.value)


def test_launcher_error_names_the_problem(tmp_path):
    cfg = _load(CLUSTER / "aws.yaml")
    cfg["available_node_types"]["cpu_worker"]["min_workers"] = 5
    cfg["available_node_types"]["cpu_worker"]["max_workers"] = 2
    with pytest.raises(ValueError, match="min_workers"):
        cc.validate_launcher_config(_write(tmp_path, cfg))
    cfg = _load(CLUSTER / "aws.yaml")
    cfg["bogus_key"] = True
    with pytest.raises(ValueError, match="bogus_key"):
        cc.validate_launcher_config(_write(tmp_path, cfg))


def test_unreadable_or_non_mapping_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        cc.validate_launcher_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        cc.validate_launcher_config(p)
    p.write_text("a: [unclosed\n")
    with pytest.raises(ValueError, match="YAML"):
        cc.validate_launcher_config(p)


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifest
# ---------------------------------------------------------------------------------------------------------------


def test_kuberay_manifest_validates_and_derives_gpu_type():
    derived = cc.validate_kuberay_manifest(KUBERAY_FILE)
    types = derived["available_node_types"]
    assert set(types) == {"headgroup", "cpu-workers", "gpu-workers"}
    assert types["headgroup"]["resources"]["CPU"] == 0
    assert types["gpu-workers"]["resources"]["GPU"] == 1
    assert types["gpu-workers"]["resources"][GPU_WORKER_RESOURCE] == 1
    assert "GPU" not in types["cpu-workers"]["resources"]
    assert types["cpu-workers"]["resources"][CPU_WORKER_RESOURCE] == 1
    assert types["cpu-workers"]["min_workers"] == 0 and types["gpu-workers"]["min_workers"] == 0
    assert types["cpu-workers"]["max_workers"] >= 1 and types["gpu-workers"]["max_workers"] >= 1
    assert derived["idle_timeout_minutes"] > 0


def test_kuberay_manifest_shape():
    cr = _load(KUBERAY_FILE)
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster"
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert {"idleTimeoutSeconds", "upscalingMode"} <= set(spec["autoscalerOptions"])
    images = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]] + [
        g["template"]["spec"]["containers"][0]["image"] for g in spec["workerGroupSpecs"]
    ]
    assert all(img.startswith("rayproject/ray:2.60.0-py311") for img in images)


def _gpu_group(cr):
    return next(g for g in cr["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-workers")


def _cpu_group(cr):
    return next(g for g in cr["spec"]["workerGroupSpecs"] if g["groupName"] == "cpu-workers")


def _k_mutations():
    def no_head(cr):
        del cr["spec"]["headGroupSpec"]

    def min_gt_max(cr):
        _cpu_group(cr)["minReplicas"] = 5
        _cpu_group(cr)["maxReplicas"] = 2
        _cpu_group(cr)["replicas"] = 2

    def gpu_without_limit(cr):
        res = _gpu_group(cr)["template"]["spec"]["containers"][0]["resources"]
        del res["limits"]["nvidia.com/gpu"]

    def gpu_without_any_gpu(cr):
        res = _gpu_group(cr)["template"]["spec"]["containers"][0]["resources"]
        del res["limits"]["nvidia.com/gpu"]
        del res["requests"]["nvidia.com/gpu"]

    def wrong_api_version(cr):
        cr["apiVersion"] = "ray.io/v9"

    def wrong_kind(cr):
        cr["kind"] = "RayJob"

    def no_autoscaling(cr):
        cr["spec"]["enableInTreeAutoscaling"] = False

    def bad_upscaling_mode(cr):
        cr["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"

    def negative_idle(cr):
        cr["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] = -1

    def no_cpu_resources(cr):
        del _cpu_group(cr)["template"]["spec"]["containers"][0]["resources"]

    def bad_custom_resources_json(cr):
        _cpu_group(cr)["rayStartParams"]["resources"] = '"{dass_cpu_worker: one}"'

    def non_string_start_param(cr):
        cr["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0

    def duplicate_group(cr):
        cr["spec"]["workerGroupSpecs"].append(copy.deepcopy(_cpu_group(cr)))

    def no_containers(cr):
        _cpu_group(cr)["template"]["spec"]["containers"] = []

    def request_above_limit(cr):
        _cpu_group(cr)["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "64"

    return [
        no_head, min_gt_max, gpu_without_limit, gpu_without_any_gpu, wrong_api_version, wrong_kind,
        no_autoscaling, bad_upscaling_mode, negative_idle, no_cpu_resources, bad_custom_resources_json,
        non_string_start_param, duplicate_group, no_containers, request_above_limit,
    ]


@pytest.mark.parametrize("mutate", _k_mutations(), ids=lambda m: m.__name__)
def test_mutated_kuberay_manifest_rejected(tmp_path, mutate):
    cr = _load(KUBERAY_FILE)
    mutate(cr)
    bad = _write(tmp_path, cr)
    with pytest.raises(ValueError) as err:
        cc.validate_kuberay_manifest(bad)
    assert str(bad) in str(err.value)


def test_kuberay_errors_name_the_problem(tmp_path):
    cr = _load(KUBERAY_FILE)
    del cr["spec"]["headGroupSpec"]
    with pytest.raises(ValueError, match="headGroupSpec"):
        cc.validate_kuberay_manifest(_write(tmp_path, cr))
    cr = _load(KUBERAY_FILE)
    _cpu_group(cr)["minReplicas"] = 3
    _cpu_group(cr)["maxReplicas"] = 1
    with pytest.raises(ValueError, match="minReplicas"):
        cc.validate_kuberay_manifest(_write(tmp_path, cr))
    cr = _load(KUBERAY_FILE)
    del _gpu_group(cr)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    with pytest.raises(ValueError, match="nvidia.com/gpu"):
        cc.validate_kuberay_manifest(_write(tmp_path, cr))


def test_kuberay_custom_resources_format_is_what_the_autoscaler_parses():
    derived = cc.validate_kuberay_manifest(KUBERAY_FILE)
    head = derived["available_node_types"]["headgroup"]["resources"]
    assert head[AUTOSCALE_CPU_WORKER_RESOURCE] == 128 and head[AUTOSCALE_GPU_WORKER_RESOURCE] == 16


def test_launcher_and_kuberay_are_not_confused(tmp_path):
    with pytest.raises(ValueError, match="Kubernetes manifest"):
        cc.validate_launcher_config(KUBERAY_FILE)
    with pytest.raises(ValueError, match="apiVersion"):
        cc.validate_kuberay_manifest(CLUSTER / "aws.yaml")


def test_cli_prints_one_line_per_file(tmp_path, capsys):
    bad = _load(CLUSTER / "aws.yaml")
    bad["head_node_type"] = "nope"
    bad_path = _write(tmp_path, bad, "bad.yaml")
    files = [str(CLUSTER / n) for n in LAUNCHER_FILES] + [str(KUBERAY_FILE)]
    assert cc.main(files) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all(line.startswith("OK") for line in out)
    assert cc.main(files + [str(bad_path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 4 and out[-1].startswith("FAIL") and "bad.yaml" in out[-1]


# ---------------------------------------------------------------------------------------------------------------
# dass_ray.search.resources
# ---------------------------------------------------------------------------------------------------------------

LAPTOP = {"CPU": 8.0, "memory": 1e10, "object_store_memory": 1e9, "node:127.0.0.1": 1.0}
LAPTOP_GPU = {**LAPTOP, "GPU": 1.0}
# A fresh autoscaling cluster from aws.yaml / kuberay.yaml: only the head is up.
FRESH_AUTOSCALING = {"memory": 1e10, AUTOSCALE_CPU_WORKER_RESOURCE: 1.0, AUTOSCALE_GPU_WORKER_RESOURCE: 1.0}
CPU_ONLY_CLUSTER = {"CPU": 32.0, CPU_WORKER_RESOURCE: 2.0}
FULL_CLUSTER = {"CPU": 36.0, "GPU": 1.0, CPU_WORKER_RESOURCE: 2.0, GPU_WORKER_RESOURCE: 1.0}
PIN = {CPU_WORKER_RESOURCE: CPU_WORKER_SHARE}


def test_kinds_are_known():
    assert set(KINDS) == {"encoder", "predictor", "kd_trial", "teacher_train", "meta_train_worker"}
    with pytest.raises(ValueError, match="unknown work kind"):
        ray_options("nope", LAPTOP)


def test_laptop_without_gpu_asks_for_no_custom_resources():
    for kind in KINDS:
        assert ray_options(kind, LAPTOP) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}


def test_laptop_with_gpu():
    assert ray_options("encoder", LAPTOP_GPU) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}
    for kind in ("predictor", "kd_trial", "teacher_train", "meta_train_worker"):
        assert ray_options(kind, LAPTOP_GPU) == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {}}
    assert ray_options("kd_trial", LAPTOP_GPU, use_gpu=False) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": {}}
    assert ray_options("encoder", LAPTOP_GPU, use_gpu=True)["num_gpus"] == 1.0


def test_cluster_with_cpu_workers_pins_cpu_work():
    assert ray_options("encoder", CPU_ONLY_CLUSTER) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": PIN}
    # No GPU anywhere: the predictor falls back to CPU on a CPU worker.
    assert ray_options("predictor", CPU_ONLY_CLUSTER) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": PIN}
    assert ray_options("kd_trial", CPU_ONLY_CLUSTER) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": PIN}
    with pytest.raises(ValueError, match="no GPU"):
        ray_options("kd_trial", CPU_ONLY_CLUSTER, use_gpu=True)


def test_full_cluster():
    assert ray_options("encoder", FULL_CLUSTER) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": PIN}
    assert ray_options("predictor", FULL_CLUSTER) == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {}}
    assert ray_options("kd_trial", FULL_CLUSTER, use_gpu=False) == {
        "num_cpus": 1.0, "num_gpus": 0.0, "resources": PIN
    }


def test_fresh_autoscaling_cluster_requests_what_can_be_added():
    # No worker is up yet, but the head's markers say both worker types can be autoscaled in.
    caps = cluster_caps(FRESH_AUTOSCALING)
    assert caps.cpu_workers and caps.gpus
    assert ray_options("encoder", FRESH_AUTOSCALING) == {"num_cpus": 1.0, "num_gpus": 0.0, "resources": PIN}
    assert ray_options("predictor", FRESH_AUTOSCALING)["num_gpus"] == 1.0


def test_gpu_workers_marker_alone_counts_as_gpu():
    assert cluster_caps({GPU_WORKER_RESOURCE: 1.0}).gpus
    assert not cluster_caps({"CPU": 4.0, "GPU": 0.0}).gpus


def test_overrides_and_fractional_packing():
    opts = ray_options("encoder", CPU_ONLY_CLUSTER, num_cpus=0.5)
    assert opts["num_cpus"] == 0.5 and opts["resources"] == PIN
    assert ray_options("predictor", LAPTOP_GPU, num_gpus=0.25)["num_gpus"] == 0.25
    with pytest.raises(ValueError):
        ray_options("encoder", LAPTOP, num_cpus=-1)
    with pytest.raises(ValueError):
        ray_options("predictor", LAPTOP_GPU, num_gpus=0)


def test_bundles_and_scaling_config():
    assert resource_bundle("kd_trial", LAPTOP) == {"CPU": 1.0}
    assert resource_bundle("kd_trial", FULL_CLUSTER) == {"CPU": 1.0, "GPU": 1.0}
    assert resource_bundle("kd_trial", CPU_ONLY_CLUSTER) == {"CPU": 1.0, **PIN}
    assert scaling_config_kwargs("meta_train_worker", LAPTOP) == {"use_gpu": False, "resources_per_worker": {"CPU": 1.0}}
    assert scaling_config_kwargs("meta_train_worker", LAPTOP_GPU) == {
        "use_gpu": True, "resources_per_worker": {"CPU": 1.0, "GPU": 1.0}
    }
    req = resource_request("encoder", CPU_ONLY_CLUSTER)
    assert not req.use_gpu and req.kind == "encoder"


def test_scaling_config_kwargs_are_accepted_by_ray_train():
    from ray.train import ScalingConfig

    for res in (LAPTOP, LAPTOP_GPU, CPU_ONLY_CLUSTER):
        sc = ScalingConfig(num_workers=2, **scaling_config_kwargs("meta_train_worker", res))
        assert sc.num_workers == 2


def test_options_inputs_are_not_mutated():
    res = dict(FULL_CLUSTER)
    ray_options("encoder", res)
    assert res == FULL_CLUSTER


# ---------------------------------------------------------------------------------------------------------------
# Capacity markers: concurrency is sized from the CPUs a cluster can grow to (docs/scaling.md B6)
# ---------------------------------------------------------------------------------------------------------------

# vCPUs of the instance types cluster/aws.yaml names (AWS documentation); the launcher detects them at run time.
AWS_VCPUS = {"c6i.4xlarge": 16, "g5.xlarge": 4}


def test_aws_markers_are_the_worker_types_max_cpus():
    cfg = cc.validate_launcher_config(CLUSTER / "aws.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["resources"]
    for marker, name in ((AUTOSCALE_CPU_WORKER_RESOURCE, "cpu_worker"), (AUTOSCALE_GPU_WORKER_RESOURCE, "gpu_worker")):
        t = types[name]
        vcpus = AWS_VCPUS[t["node_config"]["InstanceType"]]
        assert head[marker] == t["max_workers"] * vcpus, (marker, head[marker], t["max_workers"], vcpus)


def test_kuberay_markers_are_the_groups_max_cpus():
    derived = cc.validate_kuberay_manifest(KUBERAY_FILE)
    types = derived["available_node_types"]
    head = types["headgroup"]["resources"]
    for marker, name in ((AUTOSCALE_CPU_WORKER_RESOURCE, "cpu-workers"), (AUTOSCALE_GPU_WORKER_RESOURCE, "gpu-workers")):
        t = types[name]
        assert head[marker] == t["max_workers"] * t["resources"]["CPU"], (marker, head[marker], t)


def test_max_cluster_cpus_counts_what_the_cluster_can_grow_to():
    from dass_ray.search.resources import max_cluster_cpus

    cfg = cc.validate_launcher_config(CLUSTER / "aws.yaml")
    fresh = cfg["available_node_types"][cfg["head_node_type"]]["resources"]  # head only, CPU 0
    assert max_cluster_cpus(fresh) == 256 + 16
    assert max_cluster_cpus({"CPU": 2.0}) == 2  # a laptop: what it has
    assert max_cluster_cpus({"CPU": 300.0, AUTOSCALE_CPU_WORKER_RESOURCE: 256.0}) == 300
    assert max_cluster_cpus({}) == 1
