"""
The roadmap's decision tree (verdicts) as lines computed from a comparison's numbers (ladder/results.py),
and the text of a paired delta, its MDE and seed count that the tables (ladder/report.py) share:
  1. R=8 keeps val loss (within noise)? ra_same_flop vs sdpa: non-inferiority within +margin
  2. head-selective helps? ra_headsel: lower loss than ra_same_flop, or within +margin of it and faster
     (a speed CI), and within +margin of sdpa
  3. quality-per-ms better than baseline? every other variant vs sdpa at equal training time
"""

from ladder.stats import decide_note, noninferior, paired_delta, seeds_needed, speed_ratio


def fmt_delta(d, cell=False):
    """A paired delta as text; cell=True: the short form of the tables ('-' when missing)."""
    if not d or d["n"] == 0:
        return "-" if cell else "no paired seeds"
    if d["n"] == 1:
        return f"{d['mean']:+.4f} (n=1, no CI)"
    interval = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    return interval if cell else f"{interval} (95% CI, n={d['n']})"


def _mde(d):
    """"MDE ±0.0123, n=3": the smallest difference this comparison resolves, and its seed count."""
    if not d or not d["n"]:
        return "n=0"
    return f"MDE ±{d['half_width']:.4f}, n={d['n']}" if d["half_width"] is not None else f"n={d['n']}, no MDE"


def verdict_cell(d):
    """A table's verdict cell: the verdict with the MDE and n next to it, and what would decide it."""
    if not d or not d["n"]:
        return (d or {}).get("verdict", "-")
    text = f"{d['verdict']} ({_mde(d)})" if d["verdict"] != "n=1, no CI" else "undecided (n=1, no CI)"
    if d["verdict"] == "undecided":
        text += f": {'~' + str(d['seeds_needed']) + ' seeds' if d['seeds_needed'] else 'below resolution'}"
    return text


def _said(d):
    """"+0.0123 [-0.01, +0.03] (95% CI, n=3; MDE ±0.0247): undecided, ~7 seeds would decide it at this
    spread" without repeating "n=1, no CI"."""
    text = fmt_delta(d)
    if d is None or d["verdict"] in ("n=1, no CI", "not run"):
        return text
    if d["half_width"] is not None:
        text = text[:-1] + f"; MDE ±{d['half_width']:.4f})"
    note = decide_note(d)
    return f"{text}: {d['verdict']}" + (f", {note}" if note else "")


def _keeps_seeds(d, margin):
    """Seeds that would decide "keeps the loss within +margin" at the observed mean and spread."""
    if not d or d.get("sd") is None:
        return None
    options = [seeds_needed(margin - d["mean"], d["sd"]) if d["mean"] < margin else None,
               seeds_needed(d["mean"], d["sd"]) if d["mean"] > 0 else None]
    options = [n for n in options if n is not None]
    return min(options) if options else None


def _more_seeds(n):
    # this question is "within the margin?", not the sign of the difference: its seed count differs from the sign's
    return (f"more seeds: ~{n} would decide whether it keeps the loss within the margin at this spread (--seeds {n} "
            f"with the same --out-dir reuses the finished runs)" if n else
            "a longer rung: no seed count would decide whether it keeps the loss at this spread")


def _find(results, attn):
    return next((v for v in results["variants"] if v["attn"] == attn), None)


def _fmt_speed(s, ref):
    if not s or not s["n"]:
        return f"ms/step vs {ref}: -"
    if s["lo"] is None:
        return f"ms/step x{s['ratio']:.2f} of {ref} (n=1)"
    return f"ms/step x{s['ratio']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] of {ref}: {s['verdict']}"


def verdicts(results, groups):
    """The roadmap's decision tree as lines computed from this comparison's numbers."""
    lines = []
    margin = results["margin"]
    base = next((v for v in results["variants"] if v.get("is_baseline")), None)
    sf, hs = _find(results, "ra_same_flop"), _find(results, "ra_headsel")
    runs_of = {label: rs for label, rs in groups}

    def missing(*names):
        have = {v["attn"] for v in results["variants"] if v["n_ok"] > 0}
        if base is None or base["n_ok"] == 0:
            have.discard("sdpa")
        return [n for n in names if n not in have]

    # 1. Phase 1: does R=8 keep the val loss? Non-inferiority within the margin, not a CI around 0.
    # One line per ra_same_flop variant: an R sweep (--sweep ra_R=4,8,12,16) answers it for each R.
    sfs = [v for v in results["variants"] if v["attn"] == "ra_same_flop" and v["n_ok"] > 0] or [sf]
    for sfv in sfs:
        R = sfv["ra_R"] if sfv else 8
        q = f"R={R} keeps val loss (within noise)?" + (f" [{sfv['label']}]" if len(sfs) > 1 else "")
        if missing("sdpa", "ra_same_flop"):
            lines.append({"question": q, "answer": "not run", "detail": f"needs finished runs of "
                          f"{' and '.join(missing('sdpa', 'ra_same_flop'))} (--variants sdpa,ra_same_flop)"})
            continue
        d = sfv["vs_baseline"]
        ni = noninferior(d, margin)
        ans = {"yes": "YES", "no": "NO"}.get(ni, "UNDECIDED")
        why = {"yes": f"the CI lies below +{margin:g}", "no": "the CI lies above 0",
               "undecided": f"the CI reaches past +{margin:g} and below 0: too wide to tell",
               "n=1": "one seed: no CI"}[ni]
        nxt = {"YES": "proceed to Phase 2 (head-selective)", "NO": "try R=12 (--train-args \"--ra-R 12\")",
               "UNDECIDED": _more_seeds(_keeps_seeds(d, margin)) if ni == "undecided" else "more seeds (--seeds 3)"}[ans]
        note = f" (the roadmap asks about R=8; this run used ra_R={R})" if R != 8 else ""
        speed = speed_ratio(runs_of[sfv["label"]], runs_of[base["label"]])
        lines.append({"question": q, "answer": ans, "detail": f"{sfv['label']} - sdpa final val = {_said(d)} ({why}); "
                      f"{_fmt_speed(speed, 'sdpa')} -> {nxt}{note}"})

    # 2. Phase 2: do selective heads help? Better than ra_same_flop, or as good and faster; and as good as sdpa
    q = "head-selective helps?"
    if missing("sdpa", "ra_same_flop", "ra_headsel"):
        lines.append({"question": q, "answer": "not run", "detail": "needs finished runs of " + " and ".join(
            missing("sdpa", "ra_same_flop", "ra_headsel")) + " (--variants sdpa,ra_same_flop,ra_headsel)"})
    else:
        vs_sf = paired_delta(hs["final_val"], sf["final_val"])
        vs_base = hs["vs_baseline"]
        speed = speed_ratio(runs_of[hs["label"]], runs_of[sf["label"]])
        keeps_sf, keeps_base = noninferior(vs_sf, margin), noninferior(vs_base, margin)
        if "n=1" in (keeps_sf, keeps_base):
            ans = "UNDECIDED"
        elif keeps_base == "no" or keeps_sf == "no":
            ans = "NO"
        elif vs_sf["verdict"] == "better" or (keeps_sf == "yes" and speed["verdict"] == "faster"):
            ans = "YES" if keeps_base == "yes" else "UNDECIDED"
        elif keeps_sf == "yes" and speed["verdict"] in ("slower", "undecided"):
            ans = "NO"
        else:
            ans = "UNDECIDED"
        frac = hs["gates"].get("ra_frac")
        undecided = [n for n in (_keeps_seeds(vs_sf, margin), _keeps_seeds(vs_base, margin)) if n]
        nxt = {"YES": "ship it", "NO": "evaluate whether Phase 1 (ra_same_flop) speed is acceptable",
               "UNDECIDED": "more seeds (--seeds 3)" if "n=1" in (keeps_sf, keeps_base)
               else _more_seeds(max(undecided) if undecided else None)}[ans]
        lines.append({"question": q, "answer": ans, "detail":
                      f"ra_headsel - ra_same_flop = {_said(vs_sf)}, {_fmt_speed(speed, 'ra_same_flop')}; "
                      f"ra_headsel - sdpa = {_said(vs_base)}"
                      + (f"; RA heads at the end: {100 * frac:.0f}%" if frac is not None else "")
                      + f" (rule: YES if lower loss than ra_same_flop, or within +{margin:g} of it and faster (CI), "
                        f"and within +{margin:g} of sdpa) -> {nxt}"})

    # 3. quality per ms: every other variant against the baseline at equal training time
    ra = [v for v in results["variants"] if not v.get("is_baseline") and v["n_ok"] > 0]
    q = "quality-per-ms better than baseline?"
    if base is None or base["n_ok"] == 0 or not ra:
        lines.append({"question": q, "answer": "not run",
                      "detail": "needs sdpa and at least one other variant that finished"})
    for v in ra if base is not None and base["n_ok"] > 0 else []:
        d = v["vs_baseline_at_time"]
        ans = {"better": "YES", "undecided": "UNDECIDED", "worse": "NO (worse)",
               "n=1, no CI": "UNDECIDED"}.get(d["verdict"], "UNDECIDED (no overlap)" if d["verdict"] == "no overlap"
                                               else "not run")
        axis = "steady time (step x median ms/step)" if results["time_axis"] == "steady" else "training time"
        if d["n"]:
            what = f"{v['label']} - sdpa val loss at equal {axis} (T = {d['time_s']:.1f} s, mean over seeds) = " \
                   f"{_said(d)}"
        elif d["verdict"] == "no overlap":
            what = (f"the shorter run ends before the other's first eval (seeds {d['no_overlap_seeds']}): evaluate more "
                    f"often (--eval-every) or use steady time (--time-axis steady) if stalls stretched a run")
        else:
            what = "no seed with both runs finished"
        speed = speed_ratio(runs_of[v["label"]], runs_of[base["label"]])
        lines.append({"question": f"{q} [{v['label']}]", "answer": ans,
                      "detail": f"{what}; {_fmt_speed(speed, 'sdpa')}"})
    return lines
