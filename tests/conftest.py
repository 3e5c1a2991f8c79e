import numpy as np
import pytest
import torch

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


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------------------
# Clean exit (issue: `make test` could end in a segmentation fault after every test passed)
#
# At the end of the session: Ray is disconnected if a test left it connected, child processes a test left behind
# are listed and killed, and the threads still alive are listed with their Python stacks -- all in the terminal
# summary, so a leak shows in CI's log. Then the process leaves with `os._exit(<pytest's exit status>)` instead of
# running the interpreter's finalization: by then every test has run and been reported, and what finalization
# would still do is tear down native thread pools that outlive `ray.shutdown()` (Ray's core-worker/gRPC threads,
# Ray Tune/Train driver threads, gRPC's C-core pollers of closed channels, torch's intra-op pool) in no defined
# order while daemon threads may still be inside them -- the crash seen after "N passed" (a known Ray hazard when
# one process starts and stops Ray several times: ray-project/ray#31145). The exit status is pytest's own, so a
# failing test still fails the run; `make test` runs with the fault handler on, so a crash *during* the tests
# prints every thread's stack. DASS_TEST_FINALIZE=1 skips the shortcut (to reproduce the finalization crash).
# ----------------------------------------------------------------------------------------------------------------

_END_REPORT: list[str] = []


def _live_children() -> list[tuple[int, str]]:
    import os
    from pathlib import Path

    me, out = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid, state = int(stat.rsplit(")", 1)[1].split()[1]), stat.rsplit(")", 1)[1].split()[0]
            if ppid == me and state != "Z":
                out.append((int(d.name), (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")))
        except (OSError, ValueError, IndexError):
            continue
    return out


def pytest_sessionfinish(session, exitstatus):
    import os
    import signal
    import sys
    import threading
    import time
    import traceback

    session.config._dass_exitstatus = int(exitstatus)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            _END_REPORT.append("Ray was still connected at the end of the session (a fixture did not shut it down)")
            ray.shutdown()
    t0 = time.monotonic()
    kids = _live_children()
    while kids and time.monotonic() - t0 < 10:  # processes being stopped right now get a moment to exit
        time.sleep(0.5)
        kids = _live_children()
    for pid, cmd in kids:
        _END_REPORT.append(f"child process left running by a test, killed: pid {pid}: {cmd[:200]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    # Native threads (no Python frame) still running in this process: after `ray.shutdown()` Ray's GCS client I/O
    # thread and gRPC's executor/timer/event-engine threads stay alive (measured: 10 of them after one
    # init/shutdown); these are what interpreter finalization used to race with.
    names: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            n = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            continue
        names[n] = names.get(n, 0) + 1
    _END_REPORT.append(f"OS threads at exit: {sum(names.values())} "
                       + ", ".join(f"{k} x{v}" for k, v in sorted(names.items())))
    frames = sys._current_frames()
    for t in threading.enumerate():
        if t is threading.main_thread():
            continue
        stack = "".join(traceback.format_stack(frames[t.ident])[-4:]) if t.ident in frames else "  (no frame)\n"
        _END_REPORT.append(f"thread alive at exit: {t.name!r} daemon={t.daemon}\n{stack.rstrip()}")


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
