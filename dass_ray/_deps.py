"""One line instead of a traceback when a command runs under an interpreter that lacks what it needs.

The entry points (scripts/*.py, benchmarks/*.py, `dass-ray`) call `require(...)` before their heavy imports. The
usual cause: a Ray Job whose `python` is the system one because the head was started outside the project's
environment, or the slim client install (client/) asked to serve or search. Standard library only: this module
must import where nothing else does.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# What the search, the meta-dataset pipeline and the server's jobs import (top-level import names).
FULL = ("torch", "torchvision", "ray", "numpy", "pyarrow", "scipy")
# What the gRPC client imports (`pip install ./client`: docs/client.md).
CLIENT = ("grpc", "google.protobuf", "grpc_health")
# import name -> what to install
DISTRIBUTION = {"grpc": "grpcio", "google.protobuf": "protobuf", "grpc_health": "grpcio-health-checking",
                "grpc_tools": "grpcio-tools", "PIL": "pillow"}
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's entrypoint


def missing(modules) -> list[str]:
    """The modules of `modules` this interpreter cannot import (found without importing them)."""
    out = []
    for m in modules:
        try:
            if importlib.util.find_spec(m) is None:
                out.append(m)
        except (ImportError, ValueError):  # a parent package missing, or a broken one
            out.append(m)
    return out


def _checkout_python() -> Path | None:
    """The project environment's interpreter (`make install` makes it) of the checkout this file or the running
    script (scripts/x.py, benchmarks/x.py) is in."""
    roots = [Path(__file__).resolve().parents[1]]
    if sys.argv and sys.argv[0].endswith(".py") and Path(sys.argv[0]).is_file():
        roots.append(Path(sys.argv[0]).resolve().parents[1])
    for root in roots:
        p = root / ".venv" / "bin" / "python"
        if p.exists():
            return p
    return None


def message(names: list[str], what: str) -> str:
    """The one line: what is missing, for which interpreter, and the fix."""
    shown = ", ".join(DISTRIBUTION.get(n, n) for n in names)
    verb = "is" if len(names) == 1 else "are"
    here = sys.executable or "this python"
    if any(n.startswith("dass_ray.") for n in names):  # the slim client install, asked to serve or search
        return (f"error: {what} needs the full dass_ray install (torch, Ray); this environment ({here}) has the "
                f"client only (docs/client.md): run it from the project's checkout (`make install`, then "
                f".venv/bin/dass-ray ...)")
    if os.environ.get(RAY_JOB_ENV):
        return (f"error: {shown} {verb} not installed for this Ray Job's python ({here}): start the Ray head from "
                f"the project's activated environment (`source .venv/bin/activate && ray start --head`), or name "
                f"the interpreter in the entrypoint (`ray job submit ... -- /path/to/.venv/bin/python "
                f"scripts/search.py ...`, with --runtime-env-json '{{\"py_executable\": "
                f"\"/path/to/.venv/bin/python\"}}' for its workers); see docs/cluster.md")
    venv = _checkout_python()
    use = str(venv) if venv and venv != Path(here) else ".venv/bin/python (`make install` creates it)"
    return (f"error: {shown} {verb} not installed for {here}: run {what} with the project's environment: {use}; "
            f"as a Ray Job, see docs/cluster.md")


def require(*modules: str, what: str | None = None) -> None:
    """Exit with status 2 and one line on stderr when any of `modules` (default: `FULL`) cannot be imported."""
    names = missing(modules or FULL)
    if names:
        prog = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else "this command"
        print(message(names, what or prog), file=sys.stderr, flush=True)
        raise SystemExit(2)
