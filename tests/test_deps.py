"""An entry point run by an interpreter without the project's dependencies answers with one line that names the fix
(issue 29, item 5): the python of the venv's base installation stands for the system python a Ray Job gets when its
head was started outside the project's environment."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = getattr(sys, "_base_executable", "") or ""
ENTRY = ["scripts/search.py", "scripts/build_metadataset.py", "scripts/meta_train.py", "scripts/retrain.py",
         "scripts/train_teacher.py", "scripts/evaluate.py", "scripts/fit_order.py", "scripts/fit_posterior.py", "scripts/sweep_meta.py",
         "benchmarks/bench_distributed.py", "benchmarks/bench_history.py"]


def bare(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`args` run by the base interpreter from the checkout, with no venv and no PYTHONPATH (plus `env`)."""
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    return subprocess.run([BASE, *args], cwd=ROOT, env={**e, **env}, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module", autouse=True)
def base_without_torch():
    if not BASE or sys.prefix == sys.base_prefix:
        pytest.skip("not run from a venv: no base interpreter to stand for the system python")
    if subprocess.run([BASE, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{BASE} has torch")


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("script", ENTRY)
def test_a_script_names_what_is_missing_and_the_interpreter_to_use(script):
    line = one_line(bare(script, "--help"))
    assert "torch" in line and f"not installed for {BASE}" in line, line
    venv = ROOT / ".venv" / "bin" / "python"
    assert (str(venv) if venv.exists() else ".venv/bin/python") in line, line


def test_in_a_ray_job_the_line_says_how_to_start_the_head():
    # Ray's job supervisor sets this for a job's entrypoint
    line = one_line(bare("scripts/search.py", "--scale", "tiny", RAY_JOB_CONFIG_JSON_ENV_VAR="{}"))
    assert "this Ray Job's python" in line and "ray start --head" in line and "docs/cluster.md" in line, line


def test_the_cli_search_and_serve_say_it_too():
    for cmd in (["search", "--scale", "tiny"], ["serve", "--state-dir", "x", "--token-file", "y"]):
        line = one_line(bare("-m", "dass_ray.service.cli", *cmd))
        assert f"dass-ray {cmd[0]}" in line or "not installed" in line, line
