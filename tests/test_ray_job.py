"""`ray job submit -- python scripts/search.py ...` against a locally started Ray head (`ray start --head`)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_job_submit_runs_the_search(ray_head, tmp_path):
    from dass_ray.core.meta import make_model, save_predictor
    from dass_ray.core.space import get_space

    pred = tmp_path / "pred.pt"
    save_predictor(pred, make_model(get_space("cpu")), get_space("cpu"))
    out = tmp_path / "out"
    ray = Path(sys.executable).parent / "ray"
    base = [str(ray), "job", "submit", "--address", ray_head.address, "--working-dir", str(ROOT), "--",
            sys.executable, "scripts/search.py", "--scale", "tiny", "--predictor", str(pred), "--address", "auto"]
    cmd = base + ["--candidates", "32", "--top-k", "3", "--output", str(out)]
    r = subprocess.run(cmd, env=ray_head.env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in (r.stdout + r.stderr).lower()
    # no error-level line from a search that succeeds (Ray's log format: "[date time E pid tid] file:line: ...")
    assert not re.search(r"^\[[0-9: ,.-]+ E \d+ \d+\]", r.stdout + r.stderr, re.M), r.stdout + r.stderr
    res = json.loads((out / "result.json").read_text())
    assert res["candidates"] == 32 and res["top_k"] == 3
    # the best student is the best of the distilled ones: they did not all measure the same, so picking another one
    # (the first distilled, the last, a lower one) fails here
    trials = res["trials"]
    assert len(trials) == 3 and all(t["status"] == "ok" for t in trials)
    accs = [t["measured_acc"] for t in trials]
    assert len(set(accs)) > 1, accs
    top = [t["index"] for t in trials if t["measured_acc"] == max(accs)]
    assert res["best"]["measured_acc"] == max(accs) and res["best"]["index"] in top, (res["best"], trials)
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["stage"] == "done"
    # KD checkpoints inside the output directory are recorded relative to it: trials.parquet names no machine path
    import pyarrow.parquet as pq

    cks = pq.read_table(out / "trials.parquet")["checkpoint"].to_pylist()
    assert all(c.startswith("tune/") and (out / c).is_dir() for c in cks), cks
    # a bad input fails the job with the one-line reason and a non-zero exit
    bad = subprocess.run(base + ["--top-k", "5", "--candidates", "2", "--output", str(tmp_path / "o2")],
                         env=ray_head.env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "--top-k: top_k (5) must not exceed candidates (2)" in bad.stdout + bad.stderr
