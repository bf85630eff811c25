"""`tec-train plot`: training curves of one or more runs, side by side in one PNG.

Data flow: Trainer._log appends one JSON record per logging interval to ``RUN/metrics.jsonl``
--read_metrics--> records (torn or foreign lines dropped) --plot_runs--> one panel per metric
(loss, loss_fea, loss_att, lr, images/s) over the optimizer step, one line per run.

A panel is drawn only when some run logged a finite number for its key: a plain MAE run logs no
feature/attention losses (or logs them as null), and its panels then simply do not appear. Drawing
uses matplotlib's Agg canvas on a private Figure, so no display or global backend is touched.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tec_cache.core.figures import DPI, save_png
from tec_cache.format.fs import prepare_output_file
from tec_train.harness.reporting import METRICS_NAME

__all__ = ["METRICS_NAME", "PANELS", "panel_keys", "plot_runs", "read_metrics", "smooth_values"]

# (record key, panel title), in drawing order.
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "loss"),
    ("loss_fea", "feature loss (loss_fea)"),
    ("loss_att", "attention loss (loss_att)"),
    ("val_loss_fea", "held-out feature loss (val_loss_fea)"),
    ("val_loss_att", "held-out attention loss (val_loss_att)"),
    ("lr", "learning rate"),
    ("images_per_s", "images/s"),
)
PANEL_W_IN, PANEL_H_IN = 5.0, 3.2
# The lr is an exact schedule, not a noisy estimate: averaging it would only shift the warm-up.
UNSMOOTHED = frozenset({"lr"})
RAW_ALPHA = 0.3  # the unsmoothed line stays visible behind the smoothed one


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of ``run/metrics.jsonl`` in step order.

    Lines that are not a JSON object with an integer ``step`` are skipped: the last line of a run
    killed mid-write is torn. Should a step appear twice (a resumed run that re-logged steps its
    checkpoint had not seen), the later record wins. FileNotFoundError names the run dir.
    """
    run = Path(run)
    path = run / METRICS_NAME
    if not path.is_file():
        what = "does not exist" if not run.exists() else ("is not a folder" if not run.is_dir() else f"has no {METRICS_NAME}")
        raise FileNotFoundError(f"RUN {run}: {what}")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                by_step[step] = rec
    return [by_step[s] for s in sorted(by_step)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records holding a finite number under ``key`` (nulls skipped)."""
    pts = [(r["step"], float(v)) for r in records
           if isinstance(v := r.get(key), (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not pts:
        return np.empty(0), np.empty(0)
    steps, values = zip(*pts)
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)  # [P], [P]


def panel_keys(runs_records: list[list[dict[str, Any]]]) -> list[str]:
    """The PANELS keys for which at least one run logged a finite value, in panel order."""
    return [key for key, _ in PANELS if any(_series(recs, key)[0].size for recs in runs_records)]


def smooth_values(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (fewer at the start); window 1 is the identity."""
    if window < 1:
        raise ValueError(f"--smooth: must be at least 1, got {window}")
    v = np.asarray(values, dtype=np.float64)  # [P]
    if window == 1 or v.size == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])  # [P+1]
    hi = np.arange(1, v.size + 1)
    lo = np.maximum(hi - window, 0)
    return (c[hi] - c[lo]) / (hi - lo)


def _labels(runs: list[Path]) -> list[str]:
    """Run dir names; where two runs share a name, their parent folders tell them apart."""
    names = [r.resolve().name or str(r) for r in runs]
    return [f"{r.resolve().parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(runs, names)]


def plot_runs(runs: list[Path], out: Path, smooth: int = 1) -> Path:
    """Draw the metrics of ``runs`` into the PNG ``out`` and return it.

    One panel per metric any run logged (PANELS order, two per row), step on x, one colour per run
    (labelled by its dir name). With ``smooth`` > 1 each line but lr's is a trailing moving average
    over that many records, drawn over the faint raw values. ValueError (message starting with the
    option: RUN, --out, --smooth) for bad input; FileNotFoundError for a run without metrics.
    """
    if not runs:
        raise ValueError("RUN: give at least one run dir")
    if smooth < 1:
        raise ValueError(f"--smooth: must be at least 1, got {smooth}")
    runs = [Path(r) for r in runs]
    all_records = [read_metrics(r) for r in runs]
    keys = panel_keys(all_records)
    if not keys:
        raise ValueError("RUN: no metrics records in " + ", ".join(str(r) for r in runs) + " (has any run logged a step yet?)")
    out = prepare_output_file(out)

    ncols = 1 if len(keys) == 1 else 2
    nrows = -(-len(keys) // ncols)
    fig = Figure(figsize=(ncols * PANEL_W_IN, nrows * PANEL_H_IN + 0.5), dpi=DPI, layout="constrained")
    title = f"{len(runs)} run(s)" + (f", moving average over {smooth} records" if smooth > 1 else "")
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    titles = dict(PANELS)
    labels = _labels(runs)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, keys):
        for recs, label, color in zip(all_records, labels, colors):
            steps, values = _series(recs, key)
            if not steps.size:
                # Keep the run in this panel's legend, so a missing curve is explained, not silent.
                ax.plot([], [], color=color, label=f"{label} (not logged)")
                continue
            if smooth > 1 and key not in UNSMOOTHED:
                ax.plot(steps, values, color=color, alpha=RAW_ALPHA, linewidth=0.8)
                values = smooth_values(values, smooth)
            ax.plot(steps, values, color=color, linewidth=1.4, label=label)
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(keys):]:
        ax.set_visible(False)  # the odd cell of the last row
    return save_png(fig, out, "--out")
