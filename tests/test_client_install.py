"""The slim client install (client/, docs/client.md; issue 29, item 6): `pip install ./client` into a fresh venv
brings grpcio and protobuf, not torch, Ray or numpy, and its `dass-ray` talks to a real server on a loopback port.

Needs the package index pip is configured with (grpcio, protobuf, grpcio-health-checking, and grpcio-tools for
the build); skipped, saying so, when pip cannot reach one."""
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raytools import free_ports, kill_under, wait_serving

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "dass_ray" / "assets" / "teachers" / "mnist5k_cpu.pt"
TOKEN = "alice-token-0123456789abcdef"
pytestmark = pytest.mark.slow
NO_INDEX = re.compile(r"No matching distribution found|Could not find a version|Failed to establish a new "
                      r"connection|Network is unreachable|Temporary failure in name resolution")


@pytest.fixture(scope="module")
def slim(tmp_path_factory):
    """The bin/ directory of a fresh venv (no system site-packages) with only `pip install ./client` in it."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                        str(ROOT / "client")], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and NO_INDEX.search(r.stdout + r.stderr):
        pytest.skip(f"pip cannot reach a package index: {(r.stdout + r.stderr)[-500:]}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return venv / "bin"


def run(bin_: Path, *args: str, rc: int = 0, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    r = subprocess.run([str(bin_ / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    assert r.returncode == rc, (args, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r


def test_the_slim_install_has_no_torch_ray_or_numpy(slim):
    r = run(slim, "python", "-c", "import importlib.util as u; import dass_ray.service.client, dass_ray.service.cli; "
            "print([m for m in ('torch', 'torchvision', 'ray', 'numpy', 'pyarrow') if u.find_spec(m)])")
    assert r.stdout.strip() == "[]"
    assert "usage: dass-ray" in run(slim, "dass-ray", "--help").stdout
    assert "--dataset" in run(slim, "dass-ray", "submit", "--help").stdout


def test_errors_are_one_line(slim, tmp_path):
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    port = free_ports(1)[0]  # nothing listens there
    r = run(slim, "dass-ray", "jobs", "--server", f"127.0.0.1:{port}", "--token-file", str(tok), "--timeout", "5",
            rc=1)
    assert re.fullmatch(r"dass-ray: error: cannot reach the server at 127\.0\.0\.1:\d+: .*\n", r.stderr), r.stderr
    # what needs the full package says so, in one line, and so does a script of the checkout run by this python
    for args in (("dass-ray", "serve", "--state-dir", str(tmp_path / "s"), "--token-file", str(tok)),
                 ("dass-ray", "search", "--scale", "tiny"), ("python", str(ROOT / "scripts" / "search.py"))):
        r = run(slim, *args, rc=2, cwd=tmp_path)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert ("needs the full dass_ray install" if args[0] == "dass-ray" else "torch") in r.stderr, r.stderr


def test_the_slim_client_talks_to_a_real_server(slim, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"alice {TOKEN}\n")
    mine = tmp_path / "alice.token"
    mine.write_text(TOKEN + "\n")
    port = free_ports(1)[0]
    tmp = tempfile.mkdtemp(prefix="dci")  # the server never starts Ray here (a dry run); its temp dir all the same
    from dass_ray.core.data import bundled_path

    log = open(tmp_path / "server.log", "wb")
    srv = subprocess.Popen([sys.executable, "-m", "dass_ray.service.cli", "serve", "--host", "127.0.0.1", "--port",
                            str(port), "--state-dir", str(tmp_path / "state"), "--token-file", str(tokens),
                            "--grace", "2"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                           env=dict(os.environ, RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled"))
    try:
        wait_serving(f"127.0.0.1:{port}", srv, tmp_path / "server.log")
        flags = ["--server", f"127.0.0.1:{port}", "--token-file", str(mine)]
        r = run(slim, "dass-ray", "submit", *flags, "--dataset", str(bundled_path("mnist5k")), "--teacher",
                str(TEACHER), "--scale", "tiny", "--candidates", "8", "--top-k", "1", "--dry-run")
        job_id = r.stdout.strip().splitlines()[-1]
        assert "dataset " in r.stderr and "teacher " in r.stderr, r.stderr  # both uploaded
        jobs = json.loads(run(slim, "dass-ray", "jobs", *flags, "--json").stdout)
        assert [j["job_id"] for j in jobs] == [job_id]
        assert jobs[0]["spec"]["candidates"] == 8 and jobs[0]["spec"]["dry_run"] is True
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=30)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
        log.close()
        kill_under(tmp)
