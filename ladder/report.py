"""
The ladder's report: results.md (tables with MDEs, the ladder's own noise, each variant's attention
settings, the sanity checks and the verdicts), results.json and the plots (ladder/plots.py), from loaded
runs (ladder/runs.py) through the comparison (ladder/results.py). quick_quality_test.py and compare.py
both call write_report(), so a ladder's results.md and compare.py's table from the same folders agree.
"""

import json
from pathlib import Path

from ladder import plots as ladder_plots
from ladder.results import MARGIN, build_results
from ladder.runs import LEAK_MARGIN, group_runs, reference_loss
from ladder.stats import finite
from ladder.verdicts import fmt_delta, verdict_cell


def _ratio(x):
    return f"{x:.2f}" if x is not None else "?"


def fmt(x, nd=4):
    return f"{x:.{nd}f}" if finite(x) else "-"


def render_tables(results):
    """The comparison tables and verdicts (the part that compare.py must reproduce exactly)."""
    base = results["baseline"] or "(no baseline)"
    out = ["## Final validation loss", "",
           f"Mean ± std over seeds; Δ = variant − {base}, paired by seed, with its 95% CI (t, n−1 dof). "
           "MDE: the CI's half-width, the smallest difference this comparison resolves. An interval containing 0 "
           "is \"undecided\", with the seeds that would decide it if the observed mean and spread held.", "",
           f"| variant | seeds ok | val loss | Δ vs {base} [95% CI] | verdict (MDE, n) | ms/step | × {base} | steps | "
           f"train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        mean = fmt(v["final_val_mean"]) + (f" ± {fmt(v['final_val_std'])}" if v["final_val_std"] is not None else "")
        if v["n_ok"] == 0:
            mean = "FAILED"
        verdict = "baseline" if v.get("is_baseline") else verdict_cell(v.get("vs_baseline"))
        ratio = "1.00" if v.get("is_baseline") else _ratio(v.get("ms_ratio")) if v.get("ms_ratio") else "-"
        out.append(f"| {v['label']} | {v['n_ok']}/{v['n_runs']} | {mean} | "
                   f"{'-' if v.get('is_baseline') else fmt_delta(v.get('vs_baseline'), cell=True)} | {verdict} | "
                   f"{fmt(v['ms_per_step'], 1)} | {ratio} | {fmt(v['steps'], 0)} | {fmt(v['train_time_s'], 1)} |")
    out += ["", "## What this ladder resolves", ""] + [f"- {x}" for x in resolution_lines(results)]
    s = results["equal_step"]
    axis = ("train_time_s (training steps only: no eval, no checkpoints) less the first interval's warm-up"
            if results["time_axis"] == "measured" else
            "steady time = step x the run's median ms/step (--time-axis steady: stalls left out)")
    out += ["", "## Equal steps and equal wall-clock", "",
            f"Equal steps: val loss at step {s} (the fewest steps any run made). Equal wall-clock: per seed at "
            f"T = min(variant's, {base}'s training time), both val curves interpolated on {axis}; "
            f"T is the mean over seeds.", "",
            f"| variant | val @ step {s} | Δ @ step {s} [95% CI] | verdict | T (s) | Δ @ equal time [95% CI] | verdict |",
            "|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        if v.get("is_baseline"):
            out.append(f"| {v['label']} | {fmt(v['val_at_step_mean'])} | - | baseline | - | - | baseline |")
            continue
        a, t = v.get("vs_baseline_at_step"), v.get("vs_baseline_at_time")
        out.append(f"| {v['label']} | {fmt(v['val_at_step_mean'])} | {fmt_delta(a, cell=True)} | {verdict_cell(a)} | "
                   f"{fmt((t or {}).get('time_s'), 1)} | {fmt_delta(t, cell=True)} | {verdict_cell(t)} |")
    out += ["", "## Sanity checks", "",
            "Per run: finished; train loss fell (last logged < 0.99 × first logged); every loss and attention "
            "metric finite; gates in range; on synthetic data the val loss must not beat the task's ideal "
            f"floor by more than {LEAK_MARGIN} nats (a causality leak), and \"attention used\" says whether it got "
            "below the no-attention bound (information only).", "",
            "| variant | seed | status | loss first -> last | finite | gates in range | gates at the end | causal | attention used | result |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        for r in v["runs"]:
            c = r["checks"]
            gates = ", ".join(f"{k} {val:.3g}" for k, val in sorted(r["gates"].items())) or "-"
            used = c.get("attention used")
            out.append(f"| {v['label']} | {r['seed']} | {r['status']} | {_check(c, 'loss fell', True)} | "
                       f"{_check(c, 'finite')} | {_check(c, 'gates in range')} | {gates} | {_check(c, 'causal')} | "
                       f"{'-' if used is None else ('yes' if used['info'] else 'no')} | "
                       f"{'PASS' if all(x['ok'] is not False for x in c.values()) else 'FAIL'} |")
    out += settings_lines(results)
    out += ["", "## Verdicts (the roadmap's decision tree)", "",
            "Each answer with the numbers that decided it, the MDE and the seed count. YES to \"better\" needs the "
            "whole 95% CI below 0; a CI that contains 0 is \"undecided\"; with one seed nothing is decided.", ""]
    for line in results["verdicts"]:
        out.append(f"- **{line['question']}** {line['answer']}: {line['detail']}")
    return "\n".join(out) + "\n"


def resolution_lines(results):
    """The ladder's own noise: the MDE range of its final-loss comparisons and the same-seed repeat."""
    out = []
    res = results.get("resolution")
    if res:
        seeds = f"n={res['n_min']}" if res["n_min"] == res["n_max"] else f"n={res['n_min']}-{res['n_max']}"
        mde = (f"±{res['mde_min']:.4f}" if f"{res['mde_min']:.4f}" == f"{res['mde_max']:.4f}" else
               f"±{res['mde_min']:.4f} to ±{res['mde_max']:.4f}")
        out.append(f"final val loss vs the baseline: MDE {mde} nats ({seeds} seeds): smaller differences are not "
                   f"resolved by this ladder")
        if res.get("pooled_sd") is not None:
            at = ", ".join(f"±{m:.4f} at {n}" for n, m in res["pooled_mde"].items())
            out.append(f"paired spread pooled over the undecided variants ({', '.join(res['pooled_over'])}): sd "
                       f"{res['pooled_sd']:.4f} nats ({res['pooled_dof']} degrees of freedom); at that spread a "
                       f"paired 95% CI is {at} seeds")
    else:
        out.append("no paired comparison with >= 2 seeds: no MDE (run --seeds 3 or more)")
    for r in results.get("repeats", []):
        if r["diff"] is None:
            out.append(f"same-seed repeat {r['name']} of {r['of']}: {r['status']}, no difference computed (one of the "
                       f"two did not finish)")
            continue
        curve = (f"; largest |Δ| over the val curve {r['max_abs_curve_diff']:.4f} at step {r['at_step']}"
                 if r["max_abs_curve_diff"] is not None else "")
        out.append(f"same-seed repeat ({r['attn']} seed {r['seed']}, another process): final val "
                   f"{r['original_final_val']:.4f} then {r['final_val']:.4f}, Δ = {r['diff']:+.4f} nats{curve}. "
                   f"That much is GPU non-determinism, not attention; it is inside every paired difference above")
    if not results.get("repeats"):
        out.append("no same-seed repeat in this ladder (--repeat measures the GPU's non-determinism)")
    return out


def settings_lines(results):
    """The attention options each variant ran with (the fields its class reads, from config.json), and for
    head-selective variants when a run's RA heads all switched off."""
    out = ["", "## Variant settings", "", "The GPTConfig fields each variant reads (its class's `options`), "
           "from its runs' config.json.", ""]
    for v in results["variants"]:
        s = ", ".join(f"{k}={val}" for k, val in v.get("settings", {}).items()) or "(none)"
        out.append(f"- {v['label']}: {s}")
    sel = [v for v in results["variants"] if v.get("head_selective")]
    if sel:
        out += ["", "Head-selective runs (ra_frac: the fraction of RA heads, mean over layers):", ""]
    for v in sel:
        for r in v["runs"]:
            h = r.get("heads_off")
            if h is None:
                text = "no ra_frac logged"
            elif h["step"] is None:
                text = f"RA heads on to the end (ra_frac {h['final']:.2f} at the last log)"
            elif h["stayed"]:
                text = f"every RA head switched off: ra_frac reached 0 at step {h['step']} and stayed 0"
            else:
                text = (f"ra_frac reached 0 at step {h['step']}, later rose again (ra_frac {h['final']:.2f} at the "
                        f"last log)")
            out.append(f"- {v['label']} seed {r['seed']}: {text}")
    return out


def _check(checks, name, show_detail=False):
    c = checks.get(name)
    if c is None:
        return "-"
    mark = {True: "ok", False: "FAIL", None: "n/a"}[c["ok"]]
    if show_detail or c["ok"] is False:
        return f"{c['detail']} ({mark})" if show_detail else f"FAIL: {c['detail']}"
    return mark


def render_markdown(results, title="Quality comparison"):
    meta = results["meta"]
    head = [f"# {title}", ""]
    for k in ("command", "rung", "dataset", "device", "torch", "date", "git", "wall_s"):
        if meta.get(k) is not None:
            head.append(f"- {k}: `{meta[k]}`" if k in ("command", "git") else f"- {k}: {meta[k]}")
    notes = list(meta.get("notes", []))
    if results["unlike_fields"]:
        notes.append(f"the variants also differ in {', '.join(results['unlike_fields'])}: not a like-for-like "
                     f"comparison of attention alone")
    if results["baseline"] is None:
        notes.append("no sdpa run found: no deltas (compare.py --baseline LABEL picks another baseline)")
    notes += [f"stall: {x}; equal-time numbers on the measured clock are distorted (median ms/step is not; "
              f"--time-axis steady)" for x in results.get("stalls", [])]
    if results["lr_decays"] and len(results["variants"]) > 1:
        notes.append("the LR schedule decays by step: at equal wall-clock a run that finished first is compared at "
                     "its decayed end against the other mid-schedule; the full rung (time budget, constant LR after "
                     "warm-up) avoids this")
    refs = meta.get("reference_loss")
    if refs:
        notes.append(f"synthetic task reference (nats/token): ideal floor {refs['ideal']:.3f}, no-attention bound "
                     f"{refs['no_attention_bound']:.3f}")
    if notes:
        head += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    runs = ["", "## Runs", "", "| variant | seed | status | steps | final val | ms/step | train s | warm-up s | folder |",
            "|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        for r in v["runs"]:
            runs.append(f"| {v['label']} | {r['seed']} | {r['status']} | {r['steps']} | {fmt(r['final_val'])} | "
                        f"{fmt(r['ms_per_step'], 1)} | {fmt(r['train_time_s'], 1)} | {fmt(r['warmup_s'], 1)} | {r['dir']} |")
    plots = meta.get("plots")
    if plots:
        runs += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(head) + "\n\n" + render_tables(results) + "\n".join(runs) + "\n"


def write_report(runs, out_dir, baseline=None, order=None, meta=None, title="Quality comparison", plots=True,
                 time_axis="measured", margin=MARGIN):
    """Build the results from loaded runs and write results.json, results.md and the plots into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if "reference_loss" not in meta:
        refs = [reference_loss(r["config"]) for r in runs if r["config"]]
        meta["reference_loss"] = next((x for x in refs if x), None)
    groups = group_runs(runs, order)
    results = build_results(runs, baseline=baseline, order=order, meta=meta, time_axis=time_axis, margin=margin)
    if plots:
        meta["plots"] = (ladder_plots.write_val_plots(groups, out_dir, results["baseline"], time_axis,
                                                      meta.get("reference_loss"))
                         + ladder_plots.write_gate_plots(groups, out_dir))
    results["meta"] = meta
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = render_markdown(results, title)
    (out_dir / "results.md").write_text(md)
    return results, md
