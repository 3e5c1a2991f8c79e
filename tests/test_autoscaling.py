"""Autoscaling on one machine: Ray's fake multi-node provider launches and terminates worker raylets on demand.

A head with 1 CPU that, like the heads of `cluster/aws.yaml` and `cluster/kuberay.yaml`, advertises
`dass_autoscale_cpu_worker` (so `dass_ray.search.resources` pins encoder actors and CPU predictor replicas to
`dass_cpu_worker` nodes) and one worker type `cpu_worker` (2 CPUs + `dass_cpu_worker: 1`, min 0, max 2,
idle timeout 6 s). Scoring with 2 encoder actors and 1 predictor replica asks for 3 CPUs on `cpu_worker` nodes,
which do not exist yet: the autoscaler must launch them, the scoring must complete with the same scores as an
in-process run, and the idle workers must be terminated afterwards.

Safety: `ray.cluster_utils.AutoscalingCluster.start()/shutdown()` run `ray stop --force`, which kills *every*
Ray process of the user (e.g. a label-generation job running beside the tests). They are not used here: the head
is started in-process by `ray.cluster_utils.Cluster` (with `autoscaling_config`, which makes its monitor run the
autoscaler), under a private `RAY_TMPDIR`/`HOME`, and teardown terminates exactly the processes of that head and
their descendants (the fake worker nodes are children of the head's monitor process) by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time

import numpy as np
import pytest
from raytools import restore_env
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

IDLE_TIMEOUT_MIN = 0.1  # 6 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def fake_cluster_config(gcs_address: str, head_resources: dict, worker_types: dict) -> dict:
    """A complete fake_multinode autoscaler config (the wheel lacks the example.yaml its defaults come from)."""
    types = {"ray.head.default": {"resources": head_resources, "node_config": {}, "max_workers": 0}}
    types.update(worker_types)
    return {
        "cluster_name": "dass-fake",
        "max_workers": sum(t.get("max_workers", 0) for t in worker_types.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalAutoscalingCluster:
    """Head (in-process `Cluster`) + fake-provider autoscaler; stops only its own processes."""

    def __init__(self, tmp: str, head_cpus: int, head_resources: dict, worker_types: dict):
        from ray._private.services import get_node_ip_address
        from ray.cluster_utils import Cluster

        port = _free_port()
        ip = get_node_ip_address()
        cfg = fake_cluster_config(f"{ip}:{port}", {"CPU": head_cpus, **head_resources}, worker_types)
        path = os.path.join(tmp, "autoscaling.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "resources": head_resources, "gcs_server_port": port, "autoscaling_config": path,
            "include_dashboard": False, "object_store_memory": 200 * 1024**2})
        assert self.cluster.address.endswith(f":{port}"), (self.cluster.address, port)

    @property
    def address(self) -> str:
        return self.cluster.address

    def _descendants(self) -> list:
        import psutil

        out = []
        for infos in self.cluster.head_node.all_processes.values():
            for info in infos:
                try:
                    out += psutil.Process(info.process.pid).children(recursive=True)
                except psutil.Error:
                    pass
        return out

    def shutdown(self) -> None:
        import psutil

        kids = self._descendants()  # fake worker nodes (raylets, their workers) started by the monitor
        self.cluster.shutdown()  # the head's own processes
        alive = [p for p in kids if p.is_running()]
        for p in alive:
            try:
                p.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def autoscaling_cluster():
    import ray

    tmp = tempfile.mkdtemp(prefix="ras")  # short: Unix socket paths are limited to ~107 chars
    env = {"RAY_TMPDIR": tmp, "RAY_AUTH_MODE": "disabled", "HOME": os.path.join(tmp, "home"),
           "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.makedirs(env["HOME"], exist_ok=True)
    c = None
    try:
        c = LocalAutoscalingCluster(
            tmp, head_cpus=1, head_resources={"dass_autoscale_cpu_worker": 4},  # = max_workers x CPUs
            worker_types={"cpu_worker": {"resources": {"CPU": 2, "dass_cpu_worker": 1}, "node_config": {},
                                         "min_workers": 0, "max_workers": 2}})
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        restore_env(saved)
        shutil.rmtree(tmp, ignore_errors=True)


def _workers() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("dass_cpu_worker")]


def test_too_few_cpus_on_head_scales_cpu_workers_up_then_down(autoscaling_cluster):
    import ray

    from dass_ray.core.embed import Embedder
    from dass_ray.core.kd import load_teacher
    from dass_ray.core.meta import teacher_support
    from dass_ray.core.meta import make_model
    from dass_ray.core.predictor import PredictorBatch
    from dass_ray.search.resources import ray_options
    from dass_ray.search.scoring import score_candidates
    from dass_ray.search import DEFAULT_TEACHER

    from dass_ray.search.resources import max_cluster_cpus

    assert not _workers()
    assert ray_options("encoder")["resources"] == {"dass_cpu_worker": 0.001}  # pinned to the worker type
    # Concurrency is sized from what the cluster can grow to (2 x 2 worker CPUs), not the head's 1 CPU.
    assert max_cluster_cpus() == 4
    ck = load_teacher(DEFAULT_TEACHER)
    space = ck.space
    archs = space.sample_many(np.random.default_rng(0), 64)
    model = make_model(space, seed=3)
    eng = Embedder(ck.state_dict, space)
    tmap = eng.teacher_embedding().clone()
    sup = teacher_support(tmap, torch.from_numpy(space.encode(space.teacher()).astype(np.float32)), ck.val_acc)
    ref = model.predict(sup, PredictorBatch(eng.embed(archs).clone(), tmap,
                                            torch.from_numpy(space.encode_many(archs)))).numpy()
    seen: list[int] = []
    placed: list[set] = []

    def progress(k):
        seen.append(len(_workers()))
        if len(seen) == 1:
            placed.append({a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                           if a["State"] == "ALIVE" and a["ActorClassName"] in ("EncoderActor", "PredictorActor")})

    t0 = time.time()
    got = score_candidates(ck.state_dict, space, archs, model, ck.val_acc, encoders=2, predictors=1,
                           batch_size=8, on_progress=progress)
    t_score = time.time() - t0
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert max(seen) >= 2, seen  # 3 CPUs of cpu_worker demand -> two 2-CPU workers launched
    worker_ids = {n["NodeID"] for n in _workers()}
    head_id = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("dass_autoscale_cpu_worker"))
    assert placed and head_id not in placed[0] and placed[0] <= worker_ids  # nothing ran on the head
    # idle workers are terminated: 6 s idle timeout + autoscaler updates every 1 s
    deadline = time.time() + 120
    while _workers() and time.time() < deadline:
        time.sleep(1)
    assert not _workers(), f"{len(_workers())} idle worker(s) still up {time.time() - t0 - t_score:.0f}s after"
    print(f"scale-up + scoring {t_score:.1f}s (workers seen: {max(seen)}); back to the head alone "
          f"{time.time() - t0 - t_score:.1f}s after the scoring")
