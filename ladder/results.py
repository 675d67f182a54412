"""
The comparison of loaded runs (ladder/runs.py) as a JSON-able dict: per variant and against the baseline,
with the roadmap's verdicts (ladder/verdicts.py). Statistics: ladder/stats.py.

All on validation loss, nats/token; lower is better:
  per variant   mean and sample std (n-1) of the final val loss over its seeds
  vs baseline   paired by seed: d_s = val(variant, s) - val(baseline, s) for the seeds both ran,
                mean d +- t(0.975, n-1) * sd(d) / sqrt(n)   (a 95% confidence interval)
                "better"/"worse" only when the interval excludes 0; an interval that contains 0 is
                "undecided", never a win, with the seeds that would decide it at the observed spread;
                with n = 1 there is no interval ("n=1, no CI"). Every verdict shows the MDE (the CI's
                half-width: the smallest difference this run resolves) and n
  keeps         "keeps the val loss" (the roadmap's R=8 and head-selective questions) needs the whole
                CI below +margin (default 0.02 nats; --margin): a wide CI around 0 keeps nothing
  repeat        a run folder whose ladder_run.json names repeat_of (quick_quality_test.py --repeat) is
                the same seed and config run again: its difference to the original is the GPU's
                non-determinism, reported on its own and kept out of the variants
  speed         per seed ms/step ratios, their geometric mean and a t CI on the logs; "faster" only
                when the CI is below 1
  equal steps   val loss at step S* = the smallest final step of all runs compared (linear
                interpolation of each run's val curve on step)
  equal time    per seed, at T = min(train time of the variant's run, of the baseline's run),
                both val curves interpolated on the training clock (ladder/runs.py: train_time_s less
                the warm-up), so nothing is extrapolated. time_axis="steady" uses step x the run's
                median ms/step instead, which also leaves out mid-run stalls of a busy machine (the
                report lists runs whose measured clock holds such stalls)
  ms/step       per run the median logged interval (ladder/runs.py); per variant the mean over seeds;
                the table's ratio is of those means
"""

import math
import statistics

from ladder import variants as attn_info
from ladder.plots import TIME_KEYS  # the run fields of each time axis
from ladder.runs import STALL, config_key, group_runs, run_passes, unlike_fields
from ladder.stats import CONFIDENCE, interp, mean_std, paired_delta, t_quantile
from ladder.verdicts import verdicts

MARGIN = 0.02  # nats: "keeps the val loss" = the 95% CI of the loss difference lies below +MARGIN


def build_results(runs, baseline=None, order=None, meta=None, time_axis="measured", margin=MARGIN):
    """The comparison of run dicts (load_run) as a JSON-able dict: variants, deltas, verdicts.
    time_axis: "measured" (train_time_s) or "steady" (step x median ms/step) for the equal-time comparison."""
    if time_axis not in TIME_KEYS:
        raise ValueError(f"time_axis={time_axis!r}: use {' or '.join(TIME_KEYS)}")
    mark_same_seed_repeats(runs)
    groups = group_runs(runs, order)
    labels = [label for label, _ in groups]
    if baseline is None:
        baseline = next((label for label, rs in groups if rs[0]["attn"] == "sdpa"), None)
    elif baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not among the variants: {', '.join(labels)}")
    ok_runs = [r for _, rs in groups for r in rs if r["ok"]]
    s_star = min((r["val_steps"][-1] for r in ok_runs), default=None)
    variants = []
    for label, rs in groups:
        good = [r for r in rs if r["ok"]]
        final = {r["seed"]: r["final_val"] for r in good}
        at_step = {r["seed"]: interp(r["val_steps"], r["val_losses"], s_star) for r in good} if s_star else {}
        m, s = mean_std(final.values())
        ms_mean, _ = mean_std([r["ms_per_step"] for r in good if r["ms_per_step"] is not None])
        cfg = rs[0]["config"] or {}
        variants.append({
            "label": label, "attn": rs[0]["attn"], "seeds": [r["seed"] for r in rs], "n_ok": len(good),
            "n_runs": len(rs), "final_val": final, "final_val_mean": m, "final_val_std": s,
            "val_at_step": at_step, "val_at_step_mean": mean_std([v for v in at_step.values() if v is not None])[0],
            "ms_per_step": ms_mean, "steps": mean_std([r["steps"] for r in good])[0],
            "train_time_s": mean_std([r["train_time_s"] for r in good if r["train_time_s"] is not None])[0],
            "ra_R": cfg.get("ra_R"), "gates": _mean_gates(good),
            "settings": {o: cfg[o] for o in attn_info.options(rs[0]["attn"]) if o in cfg},
            "head_selective": attn_info.head_selective(rs[0]["attn"]),
            "passes": all(run_passes(r) for r in rs),
            "runs": [{k: r[k] for k in ("name", "dir", "seed", "status", "ok", "steps", "train_time_s", "warmup_s",
                                         "final_val", "ms_per_step", "stall_s", "gates", "heads_off", "checks",
                                         "notes")} for r in rs],
        })
    by_label = {v["label"]: v for v in variants}
    base = by_label.get(baseline)
    base_runs = {r["seed"]: r for label, rs in groups if label == baseline for r in rs if r["ok"]}
    for v, (label, rs) in zip(variants, groups):
        v["is_baseline"] = label == baseline
        if base is None or label == baseline:
            continue
        v["vs_baseline"] = paired_delta(v["final_val"], base["final_val"])
        v["vs_baseline_at_step"] = paired_delta(v["val_at_step"], base["val_at_step"])
        v["vs_baseline_at_time"] = equal_time_delta([r for r in rs if r["ok"]], base_runs, TIME_KEYS[time_axis])
        v["ms_ratio"] = (v["ms_per_step"] / base["ms_per_step"]
                         if v["ms_per_step"] and base["ms_per_step"] else None)
    stalls = [f"{r['name']}: {r['stall_s']:.1f} s of its {r['train_time_s']:.1f} s of training in intervals slower "
              f"than {STALL:g}x its median step (a busy machine, or a resume's warm-up)"
              for r in ok_runs if r["train_time_s"] and r["stall_s"] > 0.1 * r["train_time_s"]]
    results = {"meta": meta or {}, "baseline": baseline, "equal_step": s_star, "variants": variants,
               "time_axis": time_axis, "margin": margin, "stalls": stalls, "unlike_fields": unlike_fields(groups),
               "lr_decays": any((r["config"] or {}).get("max_time_min", 0) == 0 for r in ok_runs),
               "repeats": repeat_deltas(runs), "resolution": resolution(variants)}
    results["verdicts"] = verdicts(results, groups)
    return results


def equal_time_delta(runs, base_runs, key="val_times"):
    """Per seed at T = min(the two runs' train times): val(variant, T) - val(baseline, T), paired."""
    var, base, times, no_overlap = {}, {}, [], []
    for r in runs:
        b = base_runs.get(r["seed"])
        if b is None or not r[key] or not b[key]:
            continue
        t = min(r[key][-1], b[key][-1])
        vv, bv = interp(r[key], r["val_losses"], t), interp(b[key], b["val_losses"], t)
        if vv is not None and bv is not None:
            var[r["seed"]], base[r["seed"]] = vv, bv
            times.append(t)
        else:  # T is before one run's first eval: nothing to compare without extrapolating
            no_overlap.append(r["seed"])
    out = paired_delta(var, base)
    out["time_s"] = statistics.fmean(times) if times else None
    out["no_overlap_seeds"] = no_overlap
    if out["n"] == 0 and no_overlap:
        out["verdict"] = "no overlap"
    return out


def mark_same_seed_repeats(runs):
    """Run folders gathered by hand (compare.py) may hold the same config and seed twice without a ladder's
    repeat_of: the later one (by folder name, then path) is then a repeat of the first, noise rather than another
    seed. Two ladders may hold folders of the same name, so the original is also named by its path."""
    first = {}
    for r in sorted(runs, key=lambda r: (r["name"], r["dir"])):
        if r.get("repeat_of") or r["config"] is None or r["seed"] is None:
            continue
        key = (config_key(r["config"]), r["seed"])
        if key in first:
            r["repeat_of"], r["repeat_of_dir"] = first[key]["name"], first[key]["dir"]
        else:
            first[key] = r


def repeat_deltas(runs):
    """The --repeat runs against the runs they repeat (same config and seed, another process): the final
    val difference and the largest difference over the val curve at the steps both evaluated."""
    by_name, by_dir = {r["name"]: r for r in runs}, {r["dir"]: r for r in runs}
    out = []
    for r in runs:
        if not r.get("repeat_of"):
            continue
        o = by_dir.get(r.get("repeat_of_dir")) or by_name.get(r["repeat_of"])
        row = {"name": r["name"], "of": r["repeat_of"], "attn": r["attn"], "seed": r["seed"], "status": r["status"],
               "final_val": r["final_val"], "original_final_val": o["final_val"] if o else None, "diff": None,
               "max_abs_curve_diff": None, "at_step": None}
        if o and r["ok"] and o["ok"]:
            row["diff"] = r["final_val"] - o["final_val"]
            theirs = dict(zip(o["val_steps"], o["val_losses"]))
            both = [(abs(v - theirs[s]), s) for s, v in zip(r["val_steps"], r["val_losses"]) if s in theirs]
            if both:
                row["max_abs_curve_diff"], row["at_step"] = max(both)
        out.append(row)
    return out


def resolution(variants):
    """What this comparison can resolve: the smallest and largest MDE (CI half-width) of the final-loss
    deltas and their seed counts."""
    ds = [v["vs_baseline"] for v in variants if v.get("vs_baseline") and v["vs_baseline"]["half_width"] is not None]
    if not ds:
        return None
    return {"mde_min": min(d["half_width"] for d in ds), "mde_max": max(d["half_width"] for d in ds),
            "n_min": min(d["n"] for d in ds), "n_max": max(d["n"] for d in ds), **pooled_spread(variants)}


def pooled_spread(variants, seed_counts=(3, 5, 8)):
    """The spread of the paired differences (variant - baseline, by seed) pooled over the undecided variants:
    each variant's deviations from its own mean difference, sd = sqrt(sum of squares / sum of (n - 1)). One
    variant's 2-3 seeds say little about the spread; several variants near the baseline say more, and give
    the MDE a ladder of n seeds would reach (t quantile at the n - 1 of that ladder). Variants that differ
    clearly (a CI excluding 0) are left out: their spread is their own, not the rung's noise."""
    over = [v for v in variants if v.get("vs_baseline") and v["vs_baseline"]["verdict"] == "undecided"]
    ss = sum(sum((d - v["vs_baseline"]["mean"]) ** 2 for d in v["vs_baseline"]["diffs"]) for v in over)
    dof = sum(v["vs_baseline"]["n"] - 1 for v in over)
    if dof < 2:
        return {}
    sd = math.sqrt(ss / dof)
    return {"pooled_sd": sd, "pooled_dof": dof, "pooled_over": [v["label"] for v in over],
            "pooled_mde": {n: t_quantile((1 + CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n) for n in seed_counts}}


def _mean_gates(runs):
    names = sorted({k for r in runs for k in r["gates"]})
    return {k: statistics.fmean([r["gates"][k] for r in runs if k in r["gates"]]) for k in names}
