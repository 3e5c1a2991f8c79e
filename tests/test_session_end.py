"""The test session's end (tests/conftest.py): a crash in a sessionfinish hook, a leaked process or a leaked temp
entry must fail the run; a clean session exits 0 and leaves nothing behind. Each case runs a real inner pytest
session with this project's conftest."""
import os
import re
import shutil
import time
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


@pytest.fixture
def inner(pytester):
    shutil.copy(CONFTEST, pytester.path / "conftest.py")
    shutil.copy(CONFTEST.with_name("raytools.py"), pytester.path / "raytools.py")
    return pytester


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_clean_session_exits_zero_and_removes_its_temp_root(inner):
    inner.makepyfile(test_ok="""
        import os, tempfile
        def test_writes_temp(tmp_path):
            (tmp_path / "x").write_text("x")
            open(os.path.join(tempfile.gettempdir(), "y"), "w").close()
            print("ROOT=" + os.environ["TMPDIR"])
    """)
    r = inner.runpytest_subprocess("-s")
    assert r.ret == 0, r.stdout.str() + r.stderr.str()
    root = re.search(r"ROOT=(\S+)", r.stdout.str()).group(1)
    assert root != os.environ["TMPDIR"]
    assert not os.path.exists(root), "the inner session's private temp root was left behind"


def test_exception_in_a_sessionfinish_hook_fails_the_run(inner):
    inner.makepyfile(raiser="""
        def pytest_sessionfinish(session, exitstatus):
            raise RuntimeError("boom in sessionfinish")
    """, test_ok="def test_ok():\n    pass\n")
    r = inner.runpytest_subprocess("-p", "raiser")
    assert r.ret != 0, "an exception in pytest_sessionfinish ended in exit 0"
    assert "RuntimeError: boom in sessionfinish" in r.stderr.str()
    assert "Traceback" in r.stderr.str()


def test_orphaned_grandchild_fails_the_run_and_is_killed(inner, monkeypatch):
    monkeypatch.setenv("DASS_TEST_END_WAIT_S", "1")  # the inner session's wait for it to exit (20 s by default)
    inner.makepyfile(test_leak="""
        import subprocess
        def test_leaks_a_grandchild():
            # the shell exits at once; its `sleep` is orphaned (a grandchild of pytest)
            subprocess.run(["sh", "-c", "sleep 600 & echo LEAKED=$!"], check=True)
    """)
    r = inner.runpytest_subprocess("-s")
    out = r.stdout.str()
    pid = int(re.search(r"LEAKED=(\d+)", out).group(1))
    assert r.ret != 0, "a leaked process did not fail the run:\n" + out
    assert "process left running by the tests, killed" in out and f"pid {pid}" in out
    t0 = time.monotonic()
    while _alive(pid) and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert not _alive(pid)


def test_entry_left_in_the_machine_temp_dir_fails_the_run(inner):
    inner.makepyfile(test_leak="""
        import tempfile
        def test_writes_outside(request):
            base = request.config._dass_tmp_base  # the machine's temp dir, outside the session's private root
            print("LEAKED=" + tempfile.mkdtemp(dir=base))  # what code that hard-codes dir="/tmp" does
    """)
    r = inner.runpytest_subprocess("-s")
    leaked = Path(re.search(r"LEAKED=(\S+)", r.stdout.str()).group(1))
    try:
        assert r.ret != 0
        assert f"left in {leaked.parent} by the run: {leaked.name}" in r.stdout.str()
    finally:
        shutil.rmtree(leaked, ignore_errors=True)
