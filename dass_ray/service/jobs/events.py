"""Reading a search's `events.jsonl` incrementally (the search appends; the runner copies into the job's log)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from dass_ray.contract import SEARCH_TERMINAL

log = logging.getLogger("dass_ray.jobs")



def read_search_events(path: Path, offset: int) -> tuple[list[dict], int, dict | None]:
    """New complete events of a search's `events.jsonl` from byte `offset`.

    Returns (events, new_offset, pending_terminal). A terminal event ("done"/"failed") that is the last line is
    returned as `pending_terminal` and *not* consumed (the offset stays before it), so that it is only
    recorded once the process is known to have ended. A terminal line followed by more lines was written by a
    worker that was then resumed: it is skipped. Lines that are not JSON objects (a torn write) are skipped; a
    last line without its newline is left for later.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset, None
    events: list[dict] = []
    pos = 0
    pending = None
    lines = []
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        lines.append((data[pos:nl], pos, nl + 1))
        pos = nl + 1
    consumed = 0
    for i, (raw, start, end) in enumerate(lines):
        try:
            ev = json.loads(raw)
            if not isinstance(ev, dict):
                raise ValueError("not an object")
        except ValueError:
            if raw.strip():
                log.warning("%s: skipping an unreadable event line at byte %d", path, offset + start)
            consumed = end
            continue
        if ev.get("stage") in SEARCH_TERMINAL:
            if i == len(lines) - 1:
                pending = ev
                break
            consumed = end  # stale: the search went on after it (resumed)
            continue
        events.append(ev)
        consumed = end
    return events, offset + consumed, pending


def truncate_partial_line(path: Path) -> None:
    """Cut a torn last line (no trailing newline) left by a killed worker, before a resumed one appends."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        pass
