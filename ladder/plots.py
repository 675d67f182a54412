"""
The ladder's pictures (matplotlib, Agg backend): val loss against step and training time with a band
over seeds, and for every variant that logs per-head gates one heatmap per gate over training
(x = step, y = layer x head), so a reader sees in which layers and heads reciprocity survived.
"""

import math
import re
import statistics
from pathlib import Path

from ladder import variants as attn_info
from ladder.stats import interp

TIME_KEYS = {"measured": "val_times", "steady": "val_times_steady"}  # the run fields of each time axis
MAX_SEED_COLUMNS = 3  # gate plots show at most this many seeds side by side


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a notice) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed, skipping them (pip install matplotlib, or run "
              "`python compare.py <ladder folder>` where it is)")
        return None
    return plt


def _curve_band(runs, xkey, n_grid=60):
    """Mean, min and max over seeds of val loss on a grid the seeds all cover (one seed: its own points)."""
    curves = [(r[xkey], r["val_losses"]) for r in runs if r["ok"] and len(r[xkey]) >= 1]
    if not curves:
        return None
    if len(curves) == 1:
        xs, ys = curves[0]
        return list(xs), list(ys), list(ys), list(ys)
    lo, hi = max(c[0][0] for c in curves), min(c[0][-1] for c in curves)
    if hi <= lo:
        return None
    grid = [lo + (hi - lo) * i / (n_grid - 1) for i in range(n_grid)]
    vals = [[interp(xs, ys, g) for xs, ys in curves] for g in grid]
    return grid, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def write_val_plots(groups, out_dir, baseline=None, time_axis="measured", reference=None):
    """val loss vs step and vs training time, one line per variant (mean over seeds) with a min-max band.
    Returns the file names written."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    tlabel = "training time (s, no eval)" if time_axis == "measured" else "steady time (s): step x median ms/step"
    for xkey, xlabel, fname, title in (("val_steps", "step", "val_loss_vs_step.png", "step"),
                                       (TIME_KEYS[time_axis], tlabel, "val_loss_vs_time.png", "training time")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, rs in groups:
            band = _curve_band(rs, xkey)
            if band is None:
                continue
            x, mean, lo, hi = band
            n = sum(r["ok"] for r in rs)
            line, = ax.plot(x, mean, label=f"{label} (n={n})", lw=2.2 if label == baseline else 1.4,
                            marker="o" if len(x) <= 12 else None, ms=3)
            if n > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        for name, style in (("ideal", ":"), ("no_attention_bound", "--")):
            if reference and reference.get(name) is not None:
                ax.axhline(reference[name], color="gray", ls=style, lw=1, label=name.replace("_", " "))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val loss (nats/token)")
        ax.set_title(f"val loss vs {title} (line: mean over seeds; band: min-max)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(out_dir) / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def gate_matrix(history, gate):
    """(steps, rows, labels) of one gate: rows[i][j] = the value of row i (layer x head) at steps[j];
    labels[i] = 'l{layer}' for the first head of a layer, '' for the others."""
    layers = sorted({int(m.group(1)) for k in history["values"]
                     for m in [re.fullmatch(r"l(\d+)/(.+)", k)] if m and m.group(2) == gate})
    rows, labels = [], []
    for layer in layers:
        per_step = history["values"][f"l{layer}/{gate}"]  # one list of per-head values per logged step
        heads = max((len(v) for v in per_step if v is not None), default=0)
        for h in range(heads):
            rows.append([v[h] if v is not None and h < len(v) else float("nan") for v in per_step])
            labels.append(f"l{layer}" if h == 0 else "")
    return history["steps"], rows, labels


def write_gate_plots(groups, out_dir):
    """For every variant whose runs logged "gates" records: gates_<label>.png with one heatmap per gate
    (rows) and seed (columns, at most MAX_SEED_COLUMNS). Returns the file names written."""
    todo = [(label, [r for r in rs if r.get("gate_history", {}).get("steps")]) for label, rs in groups]
    todo = [(label, rs[:MAX_SEED_COLUMNS]) for label, rs in todo if rs]
    if not todo:
        return []
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for label, rs in todo:
        gates = sorted({k.split("/", 1)[1] for r in rs for k in r["gate_history"]["values"]})
        fig, axes = plt.subplots(len(gates), len(rs), figsize=(4.5 * len(rs), 2.8 * len(gates)), squeeze=False)
        ranges = attn_info.gate_ranges(rs[0]["attn"])
        for gi, gate in enumerate(gates):
            # one colour scale per gate, shared by the seeds; a bounded gate (e.g. a 0/1 head switch) uses its
            # declared range, so "all on" and "all off" look different
            lo, hi = ranges.get(gate, (None, None))
            matrices = [gate_matrix(r["gate_history"], gate) for r in rs]
            if lo is not None and hi is not None and math.isfinite(lo):
                vmin, vmax = lo, hi
            else:
                values = [v for _, rows, _ in matrices for row in rows for v in row if math.isfinite(v)]
                vmin, vmax = (min(values), max(values)) if values else (None, None)
            for si, r in enumerate(rs):
                ax = axes[gi][si]
                steps, rows, labels = matrices[si]
                if not rows:
                    ax.set_axis_off()
                    continue
                x0, x1 = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1
                im = ax.imshow(rows, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax,
                               extent=(x0, x1, len(rows) - 0.5, -0.5))
                starts = [i for i, lab in enumerate(labels) if lab]
                for i in starts[1:]:
                    ax.axhline(i - 0.5, color="white", lw=0.6)
                ax.set_yticks(starts)
                ax.set_yticklabels([labels[i] for i in starts], fontsize=6)
                ax.set_title(f"{gate}, seed {r['seed']}", fontsize=9)
                ax.set_xlabel("step", fontsize=8)
                fig.colorbar(im, ax=ax, fraction=0.04)
        fig.suptitle(f"{label}: per-head gates over training (rows: layer x head)", fontsize=10)
        fig.tight_layout()
        fname = "gates_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") + ".png"
        fig.savefig(Path(out_dir) / fname, dpi=100)
        plt.close(fig)
        written.append(fname)
    return written
