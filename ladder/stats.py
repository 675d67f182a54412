"""
The ladder's statistics, on final validation losses (nats/token; lower is better) paired by seed.

  paired delta   d_s = variant(s) - baseline(s) over the seeds both ran; mean d and, with n >= 2,
                 the 95% CI mean +- t(0.975, n-1) * sd(d) / sqrt(n) (scipy.stats.t)
  MDE            the CI's half-width: the smallest difference this run could tell from 0. Below it the
                 ladder cannot resolve anything, whatever the mean says
  verdict        "better" / "worse" only when the CI excludes 0; a CI that contains 0 is "undecided",
                 with the number of seeds that would decide it if the observed mean and spread held
                 (seeds_needed); one seed has no CI
  keeps          non-inferiority: the whole CI below +margin (a wide CI around 0 keeps nothing)
"""

import math
import statistics

from scipy import stats as _sp

CONFIDENCE = 0.95
MAX_SEEDS = 1000  # seeds_needed gives up here: a difference this small is below what the rung resolves


def t_quantile(p, df):
    """Student's t quantile: the t with P(T <= t) = p at df degrees of freedom; t(0.975, 2) = 4.3027."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    return float(_sp.t.ppf(p, df))


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def mean_std(xs):
    """(mean, sample std with n-1; None for n < 2) of a list of numbers; (None, None) when empty."""
    xs = list(xs)
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def half_width(sd, n, confidence=CONFIDENCE):
    """Half-width of the t CI of a mean of n paired differences with sample std sd."""
    return t_quantile((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)


def seeds_needed(mean, sd, confidence=CONFIDENCE, max_n=MAX_SEEDS):
    """The smallest n >= 2 whose CI half-width t(.., n-1) * sd / sqrt(n) is below |mean|: how many seeds
    would decide the comparison if the observed mean and spread held. None when nothing under max_n
    would (a mean of 0, or one far below the spread)."""
    if mean is None or sd is None or mean == 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, max_n + 1):
        if half_width(sd, n, confidence) < abs(mean):
            return n
    return None


def paired_delta(variant, baseline, confidence=CONFIDENCE):
    """Paired comparison of two {seed: value} dicts over the seeds both have (finite values only).

    Returns n, seeds, diffs, mean, sd, half_width (= the MDE), lo, hi, t, seeds_needed and the verdict
    (see classify); n = 0 when no seed is shared."""
    seeds = sorted(s for s in variant if s in baseline and finite(variant[s]) and finite(baseline[s]))
    d = [variant[s] - baseline[s] for s in seeds]
    out = {"n": len(d), "seeds": seeds, "diffs": d, "mean": None, "sd": None, "half_width": None,
           "lo": None, "hi": None, "t": None, "confidence": confidence, "seeds_needed": None}
    if d:
        out["mean"] = statistics.fmean(d)
    if len(d) >= 2:
        out["sd"] = statistics.stdev(d)
        out["t"] = t_quantile((1 + confidence) / 2, len(d) - 1)
        out["half_width"] = out["t"] * out["sd"] / math.sqrt(len(d))
        out["lo"], out["hi"] = out["mean"] - out["half_width"], out["mean"] + out["half_width"]
        out["seeds_needed"] = seeds_needed(out["mean"], out["sd"], confidence)
    out["verdict"] = classify(out)
    return out


def classify(delta):
    """'better' / 'worse' (lower / higher loss, the CI excludes 0), 'undecided' (the CI contains 0),
    'n=1, no CI' or 'not run'. Nothing is called a win unless the whole interval is below 0."""
    if not delta or delta["n"] == 0:
        return "not run"
    if delta["n"] == 1:
        return "n=1, no CI"
    if delta["hi"] < 0:
        return "better"
    if delta["lo"] > 0:
        return "worse"
    return "undecided"


def decide_note(delta):
    """What would decide an undecided comparison (is the difference above or below 0?): '~7 seeds would decide
    its sign at this spread', or why not."""
    if not delta or delta.get("verdict") != "undecided":
        return ""
    n = delta.get("seeds_needed")
    if n is None:
        return (f"no seed count up to {MAX_SEEDS} would decide it at this spread: the difference is below what "
                f"this rung resolves")
    return f"~{n} seeds would decide its sign at this spread"


def noninferior(d, margin):
    """Is the variant at most `margin` nats worse? 'yes' when the whole 95% CI is below +margin, 'no' when
    it is above 0 without that, else 'undecided'; 'n=1' with one seed, 'not run' with none."""
    if not d or d["n"] == 0:
        return "not run"
    if d["n"] == 1:
        return "n=1"
    if d["hi"] <= margin:
        return "yes"
    return "no" if d["lo"] > 0 else "undecided"


def interp(xs, ys, x):
    """Linear interpolation of the curve (xs ascending, ys) at x; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def speed_ratio(runs, ref_runs):
    """ms/step of runs relative to ref_runs, paired by seed: the geometric mean of the per-seed ratios and
    its 95% CI (t on the log ratios); "faster"/"slower" only when the CI excludes 1."""
    ref = {r["seed"]: r["ms_per_step"] for r in ref_runs if r["ok"] and r["ms_per_step"]}
    logs = {r["seed"]: math.log(r["ms_per_step"] / ref[r["seed"]]) for r in runs
            if r["ok"] and r["ms_per_step"] and r["seed"] in ref}
    d = paired_delta(logs, {k: 0.0 for k in logs})
    out = {"n": d["n"], "ratio": math.exp(d["mean"]) if d["n"] else None,
           "lo": math.exp(d["lo"]) if d["lo"] is not None else None,
           "hi": math.exp(d["hi"]) if d["hi"] is not None else None}
    out["verdict"] = {"better": "faster", "worse": "slower"}.get(d["verdict"], d["verdict"])
    return out
