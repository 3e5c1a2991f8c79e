"""The search's report figure (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from dass_ray.service import contract as C


def write_report(path: Path, cands: pa.Table, trials: list[dict], result: C.SearchResult,
                 max_flops: int = 0) -> None:
    """report.png: predicted vs measured accuracy of the distilled students, and accuracy against FLOPs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ok = [r for r in trials if r["status"] == "ok"]
    a1.scatter([r["predicted_acc"] for r in ok], [r["measured_acc"] for r in ok], c="C1")
    for r in ok:
        a1.annotate(str(r["index"]), (r["predicted_acc"], r["measured_acc"]), fontsize=7)
    a1.set_xlabel("predicted post-KD accuracy (DaSS score: ranks, not calibrated)")
    a1.set_ylabel("measured post-KD accuracy")
    a1.set_title("distilled students")
    # the predictor ranks; its absolute level can sit far from the measured accuracies, so the predicted
    # scores of all candidates get their own axis (right) and the measured accuracies the left one
    flops = cands["flops"].to_numpy() / 1e6
    a3 = a2.twinx()
    a3.scatter(flops, cands["predicted_acc"].to_numpy(), s=3, c="0.7", label="candidates (predicted, right axis)")
    a3.set_ylabel("predicted score", color="0.4")
    a2.set_zorder(a3.get_zorder() + 1)
    a2.patch.set_visible(False)
    a2.scatter([flops[r["index"]] for r in ok], [r["measured_acc"] for r in ok], c="C1", label="distilled (measured)")
    a2.axhline(result.teacher_acc, ls=":", c="k", lw=1, label="teacher")
    if max_flops:
        a2.axvline(max_flops / 1e6, ls="--", c="C3", lw=1, label="FLOPs budget")
    a2.set_xlabel("MFLOPs")
    a2.set_ylabel("measured accuracy")
    h2, l2 = a2.get_legend_handles_labels()
    h3, l3 = a3.get_legend_handles_labels()
    a2.legend(h2 + h3, l2 + l3, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
