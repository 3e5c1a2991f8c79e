"""The detached launcher of `LocalBackend`: `python -m dass_ray.service.jobs.launch --exit-file F -- CMD...` runs
CMD, forwards SIGTERM/SIGINT to it and records its exit code in F, so a restarted server can learn how it ended."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path



def _launch_main(argv: list[str]) -> int:
    """Run CMD, forward SIGTERM/SIGINT to it, then write its exit code to F (atomically)."""
    if len(argv) < 4 or argv[0] != "--exit-file" or argv[2] != "--":
        print("usage: python -m dass_ray.service.jobs.launch --exit-file FILE -- CMD...", file=sys.stderr)
        return 2
    exit_file, cmd = Path(argv[1]), argv[3:]
    child = subprocess.Popen(cmd)

    def forward(sig, _frame):
        try:
            child.send_signal(sig)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = child.wait()
    tmp = exit_file.with_name(exit_file.name + ".tmp")
    tmp.write_text(json.dumps({"returncode": rc, "time": time.time()}))
    tmp.replace(exit_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(_launch_main(sys.argv[1:]))
