"""What a search shows a person: the summary it ends with (`summary`) and its report figure (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from dass_ray import contract as C


def _times(teacher: float, student: float, what: str) -> str:
    """'4.1x fewer FLOPs' (or '1.3x more FLOPs' for a student larger than the teacher)."""
    if student <= 0 or teacher <= 0:
        return f"{what}: n/a"
    r = teacher / student
    return f"{r:.1f}x fewer {what}" if r >= 1 else f"{1 / r:.1f}x more {what}"


def compression_line(result: C.SearchResult) -> str:
    """'4.1x fewer FLOPs, 3.2x fewer parameters, -0.4 points': the student against the teacher, one line."""
    b = result.best
    pts = 100.0 * (b.measured_acc - result.teacher_acc)
    pts = 0.0 if round(pts, 1) == 0 else pts  # no "-0.0 points"
    return (f"{_times(result.teacher_flops, b.flops, 'FLOPs')}, {_times(result.teacher_params, b.params, 'parameters')}"
            f", {pts:+.1f} points of accuracy")


def summary(result: C.SearchResult, output: str | Path) -> str:
    """The lines a search ends with: the student against the teacher (FLOPs, parameters, accuracy, and how much
    smaller), where the files are, and one line that runs the student. Pure: `result` and the output directory."""
    b, out, spec = result.best, Path(output), result.input_spec
    budget = result.request.get("max_flops") or 0
    row = "  {:<9}{:>12}{:>14}{:>11}"
    return "\n".join([
        row.format("", "FLOPs", "parameters", "accuracy"),
        row.format("teacher", f"{result.teacher_flops / 1e6:.1f} M", f"{result.teacher_params / 1e6:.2f} M",
                   f"{100 * result.teacher_acc:.1f}%"),
        row.format("student", f"{b.flops / 1e6:.1f} M", f"{b.params / 1e6:.2f} M", f"{100 * b.measured_acc:.1f}%"),
        f"  => {compression_line(result)}" + (f" (budget {budget / 1e6:.1f} MFLOPs)" if budget else " (no budget)"),
        f"files: {out}/ (" + ", ".join([e["file"] for e in result.exports] or ["student.torchscript.pt"])
        + ", student.pt, result.json, report.png, trials.parquet, candidates.parquet)",
        f"run the student (needs PyTorch only): torch.jit.load({str(out / 'student.torchscript.pt')!r})(images)  # "
        f"{spec.dtype} [N, {spec.height}, {spec.width}, {spec.channels}] -> logits [N, {len(result.class_names)}] "
        f"(class_names in result.json)",
    ])


def pareto_front(flops, acc) -> list[int]:
    """Indices of the points no other point beats (fewer or equal FLOPs and higher accuracy, or equal accuracy and
    fewer FLOPs), by increasing FLOPs: the best accuracy each FLOPs level buys."""
    order = sorted(range(len(flops)), key=lambda i: (flops[i], -acc[i]))
    front, best = [], float("-inf")
    for i in order:
        if acc[i] > best:
            front.append(i)
            best = acc[i]
    return front


def write_report(path: Path, cands: pa.Table, trials: list[dict], result: C.SearchResult,
                 max_flops: int = 0) -> None:
    """report.png: predicted vs measured accuracy of the distilled students (left), and measured accuracy against
    FLOPs (right): the distilled students, their Pareto front, the teacher, the FLOPs budget (when there is one)
    and where the scored candidates lie (ticks along the bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.8))
    ok = [r for r in trials if r["status"] == "ok"]
    best = result.best.index
    a1.scatter([r["predicted_acc"] for r in ok], [r["measured_acc"] for r in ok], c="C1")
    # the posterior's 90% interval for each student when it was picked (absent in results of older versions)
    iv = [r for r in ok if np.isfinite(r.get("predicted_lo") or np.nan) and np.isfinite(r.get("predicted_hi") or np.nan)]
    if iv:
        px = np.array([r["predicted_acc"] for r in iv])
        a1.errorbar(px, [r["measured_acc"] for r in iv], fmt="none", ecolor="C1", alpha=0.5, lw=1,
                    xerr=[np.maximum(0, px - [r["predicted_lo"] for r in iv]),
                          np.maximum(0, [r["predicted_hi"] for r in iv] - px)])
        lim = [min(px.min(), min(r["measured_acc"] for r in iv)), max(px.max(), max(r["measured_acc"] for r in iv))]
        a1.plot(lim, lim, ls=":", c="0.6", lw=0.8)
    for r in ok:
        a1.annotate(f"#{r['index']}", (r["predicted_acc"], r["measured_acc"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    for r in ok:
        if r["index"] == best:
            a1.scatter([r["predicted_acc"]], [r["measured_acc"]], marker="*", s=260, c="C2", edgecolors="k", lw=0.6,
                       zorder=5, label=f"returned student #{best}")
            a1.legend(fontsize=7, loc="best")
    a1.set_xlabel("predicted post-KD accuracy when picked (posterior mean, 90% interval)")
    a1.set_ylabel("measured post-KD accuracy")
    a1.set_title(f"the {len(ok)} distilled students: predicted vs measured", fontsize=10)

    flops = cands["flops"].to_numpy() / 1e6
    tf = result.teacher_flops / 1e6
    # where the scored candidates lie: ticks along the bottom (x in MFLOPs, y in axes units)
    a2.scatter(flops, [0.015] * len(flops), marker="|", s=40, c="0.8", lw=0.6,
               transform=blended_transform_factory(a2.transData, a2.transAxes),
               label=f"scored candidates ({len(flops)})")
    sx = [flops[r["index"]] for r in ok]
    sy = [r["measured_acc"] for r in ok]
    b = result.best

    def students(ax, labels: bool, zoom: bool = False) -> None:
        ax.scatter(sx, sy, c="C1", s=30, zorder=3, label=None if zoom else "distilled students (measured)")
        front = pareto_front(sx, sy)
        if front:
            fx, fy = [sx[i] for i in front], [sy[i] for i in front]
            ax.step(fx, fy, where="post", c="C0", lw=1.5, zorder=2,
                    label=None if zoom else "Pareto front of the distilled students")
            ax.scatter(fx, fy, facecolors="none", edgecolors="C0", s=90, lw=1.2, zorder=4)
        ax.scatter([b.flops / 1e6], [b.measured_acc], marker="*", s=260, c="C2", edgecolors="k", lw=0.6, zorder=5,
                   label=None if zoom else f"returned student #{best}: {b.flops / 1e6:.1f} MFLOPs, "
                                           f"{100 * b.measured_acc:.1f}%")
        if labels:
            for x, y, r in zip(sx, sy, ok):
                ax.annotate(f"#{r['index']}", (x, y), fontsize=6, xytext=(4, -3), textcoords="offset points")

    students(a2, labels=False)
    a2.scatter([tf], [result.teacher_acc], marker="D", s=60, c="k", zorder=5,
               label=f"teacher: {tf:.1f} MFLOPs, {100 * result.teacher_acc:.1f}%")
    a2.axhline(result.teacher_acc, ls=":", c="k", lw=0.8)
    if max_flops:
        bf = max_flops / 1e6
        a2.axvline(bf, ls="--", c="C3", lw=1.2, label=f"FLOPs budget: {bf:.1f} MFLOPs")
        a2.axvspan(bf, max(tf, flops.max(initial=0.0)) * 1.08, color="C3", alpha=0.06, lw=0)
        a2.text(bf, 0.97, "  over budget", transform=blended_transform_factory(a2.transData, a2.transAxes),
                color="C3", fontsize=8, va="top")
    xmax = max(tf, flops.max(initial=0.0), max_flops / 1e6) * 1.08
    a2.set_xlim(0, xmax)
    ys = sy + [result.teacher_acc]
    lo, hi = min(ys), max(ys)
    pad = max(0.01, 0.15 * (hi - lo))
    a2.set_ylim(lo - 2.5 * pad, hi + pad)  # room at the bottom for the candidate ticks
    if len(sx) > 1 and max(sx) - min(sx) < 0.2 * xmax:  # the students crowd together: a zoomed inset of them
        ins = a2.inset_axes([0.33, 0.42, 0.36, 0.45])
        students(ins, labels=True, zoom=True)
        if max_flops:
            ins.axvline(max_flops / 1e6, ls="--", c="C3", lw=1.2)
        dx = max(max(sx) - min(sx), 0.02 * xmax)
        dy = max(max(sy) - min(sy), 0.002)
        ins.set_xlim(min(sx) - 0.15 * dx, max(max(sx), max_flops / 1e6 if max_flops else 0) + 0.25 * dx)
        ins.set_ylim(min(sy) - 0.2 * dy, max(sy) + 0.25 * dy)
        ins.set_title("the distilled students, zoomed", fontsize=7, pad=2)
        ins.tick_params(labelsize=6)
        ins.grid(alpha=0.25)
        a2.indicate_inset_zoom(ins, edgecolor="0.5")
    a2.set_xlabel("MFLOPs per image (teacher: the black diamond)")
    a2.set_ylabel("measured accuracy")
    a2.set_title("accuracy against FLOPs" + (f" (budget {100 * max_flops / result.teacher_flops:.0f}% of the "
                                             "teacher's)" if max_flops and result.teacher_flops else
                                             " (no FLOPs budget)"), fontsize=10)
    a2.grid(alpha=0.25)
    a2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"student #{best} vs teacher: {compression_line(result)}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
