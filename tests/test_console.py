import dataclasses
"""What a search shows a person (issue 29): the summary it ends with, the KD progress lines, the relative budget
(`--max-flops-ratio`) and the report figure. No Ray: the progress callback gets plain objects and a fake clock."""
import io
import pickle
from types import SimpleNamespace

import pyarrow as pa
import pytest

from dass_ray.core.space import get_space
from dass_ray.search import InputError, SearchConfig
from dass_ray.search.cli import main, relative_budget
from dass_ray.search.report import compression_line, pareto_front, summary, write_report
from dass_ray import contract as C


def result(flops=45_000_000, params=400_000, acc=0.9762, max_flops=45_600_000, index=42, **kw) -> C.SearchResult:
    best = C.StudentResult(arch={"widths": [[8]]}, arch_json="{}", measured_acc=acc, predicted_acc=0.5,
                           flops=flops, params=params, index=index, predicted_rank=3)
    base = dict(best=best, teacher_acc=0.9800, teacher_flops=182_400_000, teacher_params=1_870_000, candidates=2000,
                top_k=5, trials=[], request={"max_flops": max_flops}, class_names=[str(i) for i in range(10)],
                input_spec=C.InputSpec(height=28, width=28, channels=1, model_size=32))
    base.update(kw)
    return C.SearchResult(**base)


# ---------------------------------------------------------------------------------------------- the summary


def test_summary_hand_computed():
    # 182.4 / 45.0 = 4.053 -> 4.1x; 1.87 / 0.40 = 4.675 -> 4.7x; 97.62 - 98.00 = -0.38 -> -0.4 points
    lines = summary(result(), "runs/demo").splitlines()
    assert lines[0].split() == ["FLOPs", "parameters", "accuracy"]
    assert lines[1].split() == ["teacher", "182.4", "M", "1.87", "M", "98.0%"]
    assert lines[2].split() == ["student", "45.0", "M", "0.40", "M", "97.6%"]
    assert lines[3] == ("  => 4.1x fewer FLOPs, 4.7x fewer parameters, -0.4 points of accuracy "
                        "(budget 45.6 MFLOPs)")
    assert lines[4].startswith("files: runs/demo/ (student.torchscript.pt, student.pt, result.json, report.png")
    assert lines[5] == ("run the student (needs PyTorch only): torch.jit.load('runs/demo/student.torchscript.pt')"
                        "(images)  # uint8 [N, 28, 28, 1] -> logits [N, 10] (class_names in result.json)")
    assert len(lines) == 6


def test_compression_line_larger_student_and_no_negative_zero():
    # 182.4 / 228.0 = 0.8 -> 1.25x more (rounds to 1.2); 1.87 / 1.87 = 1.0x; 98.00 - 98.00 = 0
    r = result(flops=228_000_000, params=1_870_000, acc=0.98, max_flops=0)
    assert compression_line(r) == "1.2x more FLOPs, 1.0x fewer parameters, +0.0 points of accuracy"
    assert summary(r, "o").splitlines()[3].endswith("(no budget)")
    # 0.97999 vs 0.98: -0.001 points prints as +0.0, not -0.0
    assert compression_line(result(acc=0.97999)).endswith("+0.0 points of accuracy")


def test_pareto_front_hand_computed():
    flops = [10, 20, 15, 30, 5, 20]
    acc = [0.90, 0.95, 0.93, 0.94, 0.80, 0.91]
    # by FLOPs: 5 (.80) 10 (.90) 15 (.93) 20 (.95; the .91 at 20 is beaten) 30 (.94 < .95: beaten)
    assert pareto_front(flops, acc) == [4, 0, 2, 1]
    assert pareto_front([], []) == []


# ---------------------------------------------------------------------------------------------- KD progress


def test_kd_progress_line():
    from dass_ray.search.trainable import kd_progress_line

    assert kd_progress_line(2, 5, 2, (0.979, 123, True), 65.2, 100.0, 0.48) == (
        "[kd] 2/5 students distilled, 2 running (48% done) | best 0.9790 (#123) | elapsed 1m05s | eta 1m40s")
    assert kd_progress_line(0, 5, 0, None, 0.0, None) == (
        "[kd] 0/5 students distilled, 0 running | best - | elapsed 0s | eta ?")
    assert "(#7, still training)" in kd_progress_line(0, 2, 1, (0.91, 7, False), 10, 30, 0.25)


class FakeRun:
    """What the recorder uses of a SearchRun: its recorded rows and `record_trial`."""

    def __init__(self):
        self.trial_rows = []

    def record_trial(self, trial, error=False):
        r = trial.last_result
        self.trial_rows.append({"index": trial.config["index"], "measured_acc": None if error else r["best_acc"]})


def trial(index, epoch, best_acc, status="RUNNING"):
    return SimpleNamespace(status=status, config={"index": index},
                           last_result={"epoch": epoch, "best_acc": best_acc} if epoch else {})


def recorder(times, **kw):
    from dass_ray.search.trainable import _TrialRecorder

    clock = iter(times)
    out = io.StringIO()
    rec = _TrialRecorder(FakeRun(), total=kw.pop("total", 2), epochs=kw.pop("epochs", 4), clock=lambda: next(clock),
                         stream=out, **kw)
    return rec, out


def test_progress_every_10s_while_no_trial_finishes():
    # Tune calls on_step_end about every 0.1 s: 35 s of steps with one trial running and none finishing
    steps = [i / 10 for i in range(351)]
    rec, out = recorder(steps)
    printed = []
    t = trial(7, 0, None)
    for s in steps:
        t.last_result = {"epoch": int(s // 10), "best_acc": 0.9} if s >= 10 else {}
        if rec.progress([t]) is not None:
            printed.append(s)
    assert printed == [0.0, 10.0, 20.0, 30.0]
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("[kd] 0/2 students distilled, 1 running") for line in lines)
    # at 30 s: 3 of 4 epochs of 1 of 2 students = 0.75 of 2 (38%) in 30 s -> 1.25 left at 0.025/s = 50 s
    assert lines[-1] == ("[kd] 0/2 students distilled, 1 running (38% done) | best 0.9000 (#7, still training) | "
                         "elapsed 30s | eta 50s")


def test_progress_on_trial_end_and_through_the_tune_hooks():
    rec, out = recorder([0.0, 3.0, 4.0, 9.0, 14.0])
    a, b = trial(1, 1, 0.8), trial(2, 0, None)
    rec.on_step_end(0, [a, b])  # t=0: the first line
    rec.on_step_end(1, [a, b])  # t=3: too soon
    a.last_result, a.status = {"epoch": 4, "best_acc": 0.95}, "TERMINATED"
    rec.on_trial_complete(2, [a, b], a)  # t=4: a trial ended: at once
    rec.on_step_end(3, [a, b])  # t=9: 5 s after the last line
    b.last_result = {"epoch": 2, "best_acc": 0.97}
    rec.on_step_end(4, [a, b])  # t=14
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[kd] 0/2 students distilled, 2 running (12% done) | best 0.8000 (#1, still training) | "
                        "elapsed 0s | eta ?")
    # t=0: 1/4 of student 1 = 0.25 of 2 (12.5%); t=4: 1 done, 0.75 in 4 s -> 1 left at 0.1875/s = 5.3 s
    assert lines[1] == "[kd] 1/2 students distilled, 1 running (50% done) | best 0.9500 (#1) | elapsed 4s | eta 5s"
    # t=14: 1 + 2/4 = 1.5 (75%): 1.25 in 14 s -> 0.5 left in 5.6 s; the running student is now the best
    assert lines[2] == ("[kd] 1/2 students distilled, 1 running (75% done) | best 0.9700 (#2, still training) | "
                        "elapsed 14s | eta 6s")
    assert len(lines) == 3
    # Tune pickles its callbacks: the copy has no run and prints nothing
    copy = pickle.loads(pickle.dumps(rec))
    assert copy.run is None
    copy.on_step_end(5, [a, b])
    copy.on_trial_error(5, [a, b], b)


# ---------------------------------------------------------------------------------------------- relative budget


def test_relative_budget():
    space = get_space("cpu", 10)
    prep = SimpleNamespace(space=space, deploy_space=space, cfg=SearchConfig())
    teacher = space.flops(space.teacher())
    assert relative_budget(prep, 0.25).max_flops == int(0.25 * teacher)
    # students exported at 64 px: the ratio is of the teacher's FLOPs at 64 px (about 4x those at 32)
    at64 = SimpleNamespace(space=space, deploy_space=dataclasses.replace(space, image_size=64), cfg=SearchConfig())
    teacher64 = at64.deploy_space.flops(space.teacher())
    assert teacher64 > 3.9 * teacher and relative_budget(at64, 0.25).max_flops == int(0.25 * teacher64)
    for bad in (0, -0.5, 1.5):
        with pytest.raises(InputError, match=r"--max-flops-ratio: must be in \(0, 1\]"):
            relative_budget(prep, bad)
    with pytest.raises(InputError, match="--max-flops-ratio 0.001 .*impossible budget: the smallest student"):
        relative_budget(prep, 0.001)


def test_cli_ratio_and_absolute_budget_exclusive(capsys):
    assert main(["--max-flops", "40e6", "--max-flops-ratio", "0.25"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-flops-ratio: give either --max-flops or "
                                               "--max-flops-ratio, not both")


# ---------------------------------------------------------------------------------------------- report figure


@pytest.mark.parametrize("budget", [45_600_000, 0])
def test_report_figure(tmp_path, budget):
    flops = [30_000_000, 45_000_000, 20_000_000, 44_000_000, 60_000_000, 12_000_000]
    cands = pa.table({"flops": pa.array(flops, pa.int64()),
                      "predicted_acc": [0.5, 0.6, 0.4, 0.55, 0.7, 0.3]})
    trials = [{"index": 1, "predicted_acc": 0.6, "measured_acc": 0.9762, "status": "ok"},
              {"index": 0, "predicted_acc": 0.5, "measured_acc": 0.9701, "status": "ok"},
              {"index": 3, "predicted_acc": 0.55, "measured_acc": 0.9650, "status": "ok"},
              {"index": 2, "predicted_acc": 0.4, "measured_acc": 0.9600, "status": "ok"},
              {"index": 5, "predicted_acc": 0.3, "measured_acc": None, "status": "failed"}]
    res = result(index=1, max_flops=budget)
    p = tmp_path / "report.png"
    write_report(p, cands, trials, res, budget)
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 20_000
