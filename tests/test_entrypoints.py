"""The commands beside a Ray that already runs on the machine (issue 29, item 4).

A head is started as `ray start --head` would be on a user's machine (from the activated venv), and its address is
put where a bare `ray.init()` finds it (`$RAY_TMPDIR/ray/ray_current_cluster`, i.e. /tmp/ray/... by default). A
command without `--address` must then start a private local Ray of its own -- not join that head (no new driver in
the head's job table), not fail on `--num-cpus` -- while inside a Ray Job it joins the job's cluster.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raytools import RayHead, kill_under

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def machine():
    """(head, env): the running head (`head.gcs_address`: its GCS), and the environment of a command run on that
    machine."""
    h = RayHead()
    # the head started from the activated venv: the `python` of its jobs is the venv's (docs/cluster.md)
    h.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{h.env.get('PATH', '')}"
    root = tempfile.mkdtemp(prefix="ep")  # short: Ray's socket paths are length-limited
    try:
        h.start()
        h.gcs_address = (Path(h.tmp) / "ray_current_cluster").read_text().strip()
        (Path(root) / "ray").mkdir()
        shutil.copy(Path(h.tmp) / "ray_current_cluster", Path(root) / "ray" / "ray_current_cluster")
        (Path(root) / "home").mkdir()
        env = dict(os.environ, RAY_TMPDIR=root, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   HOME=str(Path(root) / "home"))
        env.pop("RAY_ADDRESS", None)
        yield h, env
    finally:
        h.cleanup()
        if getattr(h, "gcs_address", None):  # the head's Ray Client server names no temp dir, only the GCS
            kill_under(f"--address={h.gcs_address}\0")  # /proc cmdline: NUL-separated
        shutil.rmtree(root, ignore_errors=True)


def drivers(h: RayHead) -> list[tuple]:
    """Every driver and job the head has seen (a `ray.init()` that joins it adds a DRIVER entry)."""
    from ray.job_submission import JobSubmissionClient

    return sorted((str(j.type), j.job_id or "", j.submission_id or "")
                  for j in JobSubmissionClient(h.address).list_jobs())


def run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nrc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_the_machine_has_a_cluster_a_bare_ray_init_would_join(machine):
    """The control: this test's setup is the issue's (otherwise the tests below prove nothing)."""
    h, env = machine
    r = run([sys.executable, "-c", "import ray; ray.init(log_to_driver=False); "
             "print(ray.get_runtime_context().gcs_address); ray.shutdown()"], env, timeout=180)
    assert r.stdout.strip().splitlines()[-1] == h.gcs_address


def test_search_without_address_runs_on_a_private_ray_not_the_running_one(machine, tmp_path):
    h, env = machine
    before = drivers(h)
    out = tmp_path / "out"
    # Ray's default auth mode: a private instance must not write ~/.ray/auth_token (it would turn on token auth
    # for every later `ray start --head` of the user)
    env = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    assets = ROOT / "dass_ray" / "assets"
    run([sys.executable, "scripts/search.py", "--scale", "tiny", "--candidates", "16", "--top-k", "1",
         "--encoders", "1", "--teacher", str(assets / "teachers" / "mnist5k_cpu.pt"), "--predictor",
         str(assets / "predictor" / "cpu.pt"), "--output", str(out)], env)
    assert json.loads((out / "result.json").read_text())["best"]["measured_acc"] > 0
    assert drivers(h) == before, "the search joined the Ray that was already running"
    assert not (Path(env["HOME"]) / ".ray").exists()
    assert not list(Path(env["RAY_TMPDIR"]).glob("dass-ray-*")), "the private Ray's temp dir was left behind"


def test_build_metadataset_with_num_cpus_beside_a_running_ray(machine, tmp_path):
    h, env = machine
    plan = tmp_path / "plan.json"  # one task, one student: the smallest real build
    plan.write_text(json.dumps({"groups": [{"role": "train", "source": "mnist5k", "path": "mnist5k.parquet",
                                            "split": None, "num_tasks": 1, "seed": 1, "students": 1}]}))
    before = drivers(h)
    out = tmp_path / "md"
    r = run([sys.executable, "scripts/build_metadataset.py", "--scale", "tiny", "--plan", str(plan), "--output",
             str(out), "--num-cpus", "2"], env)
    assert json.loads(r.stdout.strip().splitlines()[-1])["students"] == 1
    assert drivers(h) == before, "the build joined the Ray that was already running"
    assert not list(Path(env["RAY_TMPDIR"]).glob("dass-ray-*")), "the private Ray's temp dir was left behind"


def test_in_a_ray_job_a_command_joins_the_jobs_cluster(machine):
    """`ray job submit -- python ...` with no --address: the job's cluster, and --num-cpus is no error there."""
    h, env = machine
    code = ("import sys, ray; from dass_ray.search.rayutil import init_ray; init_ray(None, 2); "
            "print('EXE', sys.executable); print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    r = run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", h.address, "--", "python",
             "-c", code], dict(env, RAY_TMPDIR=h.tmp), timeout=300)
    lines = dict(x.split(" ", 1) for x in r.stdout.splitlines() if x.startswith(("EXE ", "GCS ")))
    assert lines["GCS"] == h.gcs_address, r.stdout
    # the venv's python although the entrypoint says `python`: the head was started from the activated venv
    assert Path(lines["EXE"]).parent == Path(sys.executable).parent, r.stdout
