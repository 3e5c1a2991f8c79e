import numpy as np
import pytest
import torch
from raytools import restore_env

from dass_ray.core.nets import build
from dass_ray.core.space import get_space


def randomize_bn(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN layers non-trivial statistics and affine params (a fresh net's are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
    return net


@pytest.fixture(scope="session")
def cpu_space():
    return get_space("cpu")


@pytest.fixture(scope="session")
def cpu_teacher(cpu_space):
    return randomize_bn(build(cpu_space.teacher(), cpu_space, seed=0)).eval()


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray for one test module: its own temp dir (inside the session's root), never a cluster that
    runs on the machine (RAY_ADDRESS cleared; Ray's "current cluster" file lives in that temp dir), token auth off;
    the environment as it was afterwards."""
    import os
    import shutil
    import tempfile

    import ray

    keys = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_TMPDIR")
    saved = {k: os.environ.get(k) for k in keys}
    tmp = tempfile.mkdtemp(prefix="rl")  # short: Ray's socket paths are length-limited
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_TMPDIR=tmp)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    try:
        yield ray
    finally:
        ray.shutdown()
        restore_env(saved)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head():
    """A private `ray start --head` for one test module (`raytools.RayHead`: own temp dir and ports; the equivalent
    of a user's head, whose Ray Jobs API a runner, a server or `ray job submit` talks to), started only when a test
    asks for it; at the end every process of it is killed -- those that name its temp dir or GCS port, then those
    that only carry its RAY_TMPDIR (`kill_ray`) -- never with `ray stop`."""
    from raytools import RayHead, kill_ray

    head = RayHead()
    try:
        head.start()
        yield head
    finally:
        head.cleanup()
        kill_ray(head.tmp)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------------------
# The session's own corner of the machine, and an end that cannot hide a crash or a leak
#
# At configure time the session gets a private temp root (TMPDIR, RAY_TMPDIR, Python's tempfile and pytest's
# tmp_path all point there; short, because Ray's socket paths are length-limited), a marker in the environment
# that every process it starts inherits (Ray workers, `ray start` heads, job drivers, their grandchildren), and
# becomes the child subreaper, so a grandchild orphaned by its parent is re-parented to pytest instead of to PID 1.
#
# At the end: Ray is disconnected if a test left it connected; every process still alive that carries the marker
# (or is a child of pytest) is given 20 s ($DASS_TEST_END_WAIT_S) to exit, then killed -- and then the run FAILS,
# naming it; the private temp root (Ray's session directories, pytest's tmp_path) is removed; a new entry left in
# the machine's temp dir by the run (a Ray session dir, a tempfile or pytest dir, one of this suite's prefixes) fails it too. The outermost sessionfinish wrapper turns an exception raised by any sessionfinish hook
# (this file's or a plugin's) into a printed traceback and a non-zero status.
#
# Then the process leaves with `os._exit(<final status>)` instead of running the interpreter's finalization:
# what finalization would still do is tear down native thread pools that outlive `ray.shutdown()` (Ray's
# core-worker/gRPC threads, Ray Tune/Train driver threads, gRPC's C-core pollers of closed channels, torch's intra-op
# pool) in no defined order while daemon threads may still be inside them -- the crash once seen after "N passed"
# (ray-project/ray#31145). The status is pytest's own unless the end checks failed, so a failing test still fails
# the run. DASS_TEST_FINALIZE=1 skips the shortcut (to reproduce the finalization crash).
# ----------------------------------------------------------------------------------------------------------------

_END_REPORT: list[str] = []
_MARKER = "DASS_TEST_SESSION"
_PR_SET_CHILD_SUBREAPER = 36
_OWNER = ".dass-test-session"  # in a session's temp root: the pid of its pytest
# What a test run creates in a temp dir when it escapes its private root: Ray's session dirs, Python's tempfile,
# pytest's basetemp, and this suite's own prefixes. (Other names in /tmp are not this run's: a developer's machine
# has other things writing there.)
_PRODUCED = __import__("re").compile(r"^(ray|session_|pytest-of-|tmp|dt|ras|djt|rmn|dsv|dlh|rl|dass)")


def _proc_table() -> dict[int, tuple[int, str, bool]]:
    """pid -> (ppid, command line, carries this session's marker) for every live, non-zombie process."""
    import os
    from pathlib import Path

    token = f"{_MARKER}={os.environ.get(_MARKER, '')}".encode()
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            rest = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if rest[0] == "Z":
                continue
            try:
                marked = token in (d / "environ").read_bytes().split(b"\0")
            except OSError:
                marked = False
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            out[int(d.name)] = (int(rest[1]), cmd, marked)
        except (OSError, ValueError, IndexError):
            continue
    return out


def _other_live_session(path: str) -> bool:
    """Is `path` the private temp root of another test session that is still running (e.g. two pytest runs side
    by side on a developer's machine)?"""
    import os

    try:
        pid = int(open(os.path.join(path, _OWNER)).read().strip())
    except (OSError, ValueError):
        return False
    return pid != os.getpid() and os.path.exists(f"/proc/{pid}")


def session_leftovers() -> list[tuple[int, str]]:
    """Processes this test session started that are still alive: those that carry its marker and every
    descendant of pytest (children, and grandchildren re-parented to it as the subreaper)."""
    import os

    me = os.getpid()
    procs = _proc_table()
    chosen = {pid for pid, (_, _, marked) in procs.items() if marked and pid != me}
    chosen |= {pid for pid, (ppid, _, _) in procs.items() if ppid == me}
    grew = True
    while grew:
        kids = {pid for pid, (ppid, _, _) in procs.items() if ppid in chosen and pid != me} - chosen
        grew = bool(kids)
        chosen |= kids
    return sorted((pid, procs[pid][1]) for pid in chosen)


def pytest_configure(config):
    import ctypes
    import os
    import tempfile
    import uuid

    if hasattr(config, "_dass_tmp_root"):
        return
    base = tempfile.gettempdir()
    config._dass_tmp_before = set(os.listdir(base))
    config._dass_tmp_base = base
    root = tempfile.mkdtemp(prefix="dt", dir=base)
    with open(os.path.join(root, _OWNER), "w") as f:  # another session running beside this one skips this root
        f.write(str(os.getpid()))
    config._dass_tmp_root = root
    config._dass_env_before = {k: os.environ.get(k) for k in ("TMPDIR", "RAY_TMPDIR", _MARKER)}
    os.environ.update(TMPDIR=root, RAY_TMPDIR=root, **{_MARKER: uuid.uuid4().hex})
    tempfile.tempdir = root
    try:  # grandchildren whose parent exits are re-parented to us, where the end check sees them
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    config.pluginmanager.register(_SessionEnd(), "dass-session-end")


def _end_checks(session) -> bool:
    """Disconnect Ray, kill what the session left running, remove its temp root; False when something leaked."""
    import os
    import shutil
    import signal
    import sys
    import time

    config = session.config
    ok = True
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            _END_REPORT.append("Ray was still connected at the end of the session (a fixture did not shut it down)")
            ok = False
            ray.shutdown()
    t0 = time.monotonic()
    left = session_leftovers()
    wait = float(os.environ.get("DASS_TEST_END_WAIT_S", "20"))  # tests/test_session_end.py shortens it
    while left and time.monotonic() - t0 < wait:  # processes being stopped right now get a moment to exit
        time.sleep(0.5)
        left = session_leftovers()
    for pid, cmd in left:
        _END_REPORT.append(f"process left running by the tests, killed: pid {pid}: {cmd[:200]}")
        ok = False
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    root = getattr(config, "_dass_tmp_root", None)
    if root:
        shutil.rmtree(root, ignore_errors=True)
        if os.path.exists(root):
            _END_REPORT.append(f"the session's temp root {root} could not be removed")
            ok = False
        new = sorted(set(os.listdir(config._dass_tmp_base)) - config._dass_tmp_before)
        for name in new:
            if not _PRODUCED.match(name) or _other_live_session(os.path.join(config._dass_tmp_base, name)):
                continue
            _END_REPORT.append(f"left in {config._dass_tmp_base} by the run: {name}")
            ok = False
        restore_env(config._dass_env_before)
    return ok


def pytest_sessionfinish(session, exitstatus):
    """The end checks; they run inside the terminal reporter's wrapper, so their report reaches the summary."""
    if not _end_checks(session) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class _SessionEnd:
    """The outermost sessionfinish wrapper: an exception from any sessionfinish hook (a plugin's, this file's end
    checks) is printed with its traceback and makes the status non-zero; the final status is kept for `os._exit`."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session):
        import sys
        import traceback

        try:
            yield
        except BaseException as e:  # noqa: BLE001 -- whatever it is, it must not end in exit 0
            sys.stderr.write("error in a pytest_sessionfinish hook; the run fails:\n")
            traceback.print_exc(file=sys.stderr)
            code = getattr(e, "returncode", None) if isinstance(e, pytest.exit.Exception) else None
            if code is not None:
                session.exitstatus = code
            if not session.exitstatus:
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
        session.config._dass_exitstatus = int(session.exitstatus)


def pytest_terminal_summary(terminalreporter):
    if _END_REPORT:
        terminalreporter.section("left running at the end of the session")
        for line in _END_REPORT:
            terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import logging
    import os
    import sys

    status = getattr(config, "_dass_exitstatus", None)
    if status is None or os.environ.get("DASS_TEST_FINALIZE") == "1":
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
