"""
The quality ladder's report, built only from run folders (config.json, log.jsonl, summary.json of
train.py, plus ladder_run.json where quick_quality_test.py ran the run): quick_quality_test.py and
compare.py both call build_results() and write_report(), so a ladder's results.md and compare.py's
table from the same folders are the same.

Statistics (all on validation loss, nats/token; lower is better):
  per variant   mean and sample std (n-1) of the final val loss over its seeds
  vs baseline   paired by seed: d_s = val(variant, s) - val(baseline, s) for the seeds both ran,
                mean d +- t(0.975, n-1) * sd(d) / sqrt(n)   (a 95% confidence interval)
                "better"/"worse" only when the interval excludes 0; an interval that contains 0 is
                "no difference", never a win; with n = 1 there is no interval ("n=1, no CI").
  keeps         "keeps the val loss" (the roadmap's R=8 and head-selective questions) needs more than
                "no difference": the whole CI below +margin (default 0.02 nats; --margin), since a
                wide CI around 0 is no evidence of keeping anything
  speed         per seed ms/step ratios, their geometric mean and a t CI on the logs; "faster" only
                when the CI is below 1
  equal steps   val loss at step S* = the smallest final step of all runs compared (linear
                interpolation of each run's val curve on step)
  equal time    per seed, at T = min(train time of the variant's run, of the baseline's run),
                both val curves interpolated on the training clock, so nothing is extrapolated.
                The clock is train.py's train_time_s (training steps only: no eval, no checkpoints)
                less the warm-up: the first logged interval's excess over the median step
                (allocator, cuBLAS init, Triton JIT, torch.compile: one-time costs that a long run
                amortizes and that would otherwise decide short comparisons). time_axis="steady"
                uses step x the run's median ms/step instead, which also leaves out mid-run stalls
                of a busy machine (the report lists runs whose measured clock holds such stalls)
  ms/step       per run: the median of the logged ms_per_step intervals, the first one left out
                (it holds warm-up and torch.compile); per variant: the mean over seeds; the table's
                ratio is of those means
"""

import json
import math
import statistics
from pathlib import Path

OK_STATUSES = ("done", "time budget reached")
# config fields that do not make two runs different variants (seeds of one variant differ in them)
IGNORED_FIELDS = {"seed", "run_name", "out_dir", "data_root", "data_dir", "resume", "wandb", "wandb_project",
                  "wandb_group", "wandb_tags", "log_every", "eval_every", "ckpt_every"}
# attention metrics with a known valid range, by name (attn/l{i}/NAME and attn/mean/NAME); every
# attention metric must also be finite
GATE_RANGES = {"w_rec": (0.0, None), "w_std": (0.0, None), "b_abs": (0.0, None), "ra_frac": (0.0, 1.0),
               "tok_frac": (0.0, 1.0)}
TIME_KEYS = {"measured": "val_times", "steady": "val_times_steady"}  # the run fields of each time axis
STALL = 3.0  # an interval slower than this many median steps is a stall (see stall_s)
MARGIN = 0.02  # nats: "keeps the val loss" = the 95% CI of the loss difference lies below +MARGIN
LEAK_MARGIN = 0.1  # nats: a val loss this far under the dataset's ideal floor means the model sees the future


# ----------------------------------------------------------------------------- statistics

def _betacf(a, b, x):
    """Continued fraction of the incomplete beta function (Numerical Recipes, modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a, b, x):
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbeta) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p, df):
    """The t such that t_cdf(t, df) = p (0.5 < p < 1), by bisection: t(0.975, 2) = 4.3027."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def mean_std(xs):
    """(mean, sample std with n-1; None for n < 2) of a list of numbers; (None, None) when empty."""
    xs = list(xs)
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def paired_delta(variant, baseline, confidence=0.95):
    """Paired comparison of two {seed: value} dicts over the seeds both have.

    d_s = variant[s] - baseline[s]; mean d, and with n >= 2 the interval
    mean +- t((1 + confidence) / 2, n - 1) * sd(d) / sqrt(n). Returns a dict with n, seeds, mean,
    sd, half_width, lo, hi, t and the verdict (see classify); n = 0 when no seed is shared."""
    seeds = sorted(s for s in variant if s in baseline and _finite(variant[s]) and _finite(baseline[s]))
    d = [variant[s] - baseline[s] for s in seeds]
    out = {"n": len(d), "seeds": seeds, "diffs": d, "mean": None, "sd": None, "half_width": None,
           "lo": None, "hi": None, "t": None, "confidence": confidence}
    if d:
        out["mean"] = statistics.fmean(d)
    if len(d) >= 2:
        out["sd"] = statistics.stdev(d)
        out["t"] = t_quantile((1 + confidence) / 2, len(d) - 1)
        out["half_width"] = out["t"] * out["sd"] / math.sqrt(len(d))
        out["lo"], out["hi"] = out["mean"] - out["half_width"], out["mean"] + out["half_width"]
    out["verdict"] = classify(out)
    return out


def classify(delta):
    """'better' / 'worse' (lower / higher loss, the CI excludes 0), 'no difference' (the CI contains 0),
    'n=1, no CI' or 'not run'. A difference is never called a win unless the whole interval is below 0."""
    if not delta or delta["n"] == 0:
        return "not run"
    if delta["n"] == 1:
        return "n=1, no CI"
    if delta["hi"] < 0:
        return "better"
    if delta["lo"] > 0:
        return "worse"
    return "no difference"


def interp(xs, ys, x):
    """Linear interpolation of the curve (xs ascending, ys) at x; None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ----------------------------------------------------------------------------- run folders

def is_run_dir(path):
    p = Path(path)
    return (p / "config.json").is_file() or (p / "ladder_run.json").is_file()


def discover_runs(paths):
    """Run folders under each path (a run folder itself, a ladder folder, or any folder of runs), sorted."""
    found = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (give run folders or a ladder folder such as "
                                    f"runs/ladder-<id>)")
        if is_run_dir(p):
            found.append(p)
            continue
        found += sorted({c.parent for pattern in ("config.json", "ladder_run.json") for c in p.rglob(pattern)
                         if "wandb" not in c.parts})
    seen, out = set(), []
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(p)
    if not out:
        raise FileNotFoundError(f"no run folders (with config.json from train.py) under {', '.join(map(str, paths))}")
    return out


def _read_jsonl(path):
    """Records of a log.jsonl; a torn last line (a run killed mid-write) is skipped."""
    out = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def load_run(path):
    """One run folder -> a dict: config, status, curves, final values, ms/step, sanity checks."""
    path = Path(path)
    ladder = json.loads((path / "ladder_run.json").read_text()) if (path / "ladder_run.json").exists() else {}
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else None
    records = _read_jsonl(path / "log.jsonl")
    notes = []
    # a resumed run re-logs the steps after its checkpoint: the last record of a step wins
    train, val = {}, {}
    for r in records:
        (val if "val_loss" in r else train if "loss" in r else {})[r["step"]] = r
    train = [train[s] for s in sorted(train)]
    val = [val[s] for s in sorted(val)]
    # train.py restarts train_time_s at 0 on --resume: continue the clock from where it was
    for curve in (train, val):
        offset, last = 0.0, 0.0
        for r in curve:
            t = r.get("train_time_s", 0.0) + offset
            if t < last - 1e-9:
                offset += last - t
                t = last
                if "resumed" not in notes:
                    notes.append("resumed")
            r["_t"], last = t, t
    # ms/step: the median interval, the first left out; the first interval's excess over it is warm-up
    # (allocator, cuBLAS/cuDNN init, Triton JIT, torch.compile), which the clock below leaves out
    ms = [r["ms_per_step"] for r in train if _finite(r.get("ms_per_step"))]
    med = statistics.median(ms[1:] if len(ms) > 1 else ms) if ms else None
    warmup = 0.0
    if med and len(train) > 1 and _finite(train[0].get("ms_per_step")):
        warmup = max(0.0, train[0]["step"] * (train[0]["ms_per_step"] - med) / 1000)
    for r in train + val:
        r["_t"] = max(0.0, r["_t"] - warmup)
    status = (summary or {}).get("status") or ladder.get("status") or "incomplete (no summary.json)"
    run = {
        "dir": str(path), "name": path.name, "config": config, "ladder": ladder, "status": status,
        "ok": status in OK_STATUSES and bool(val) and _finite(val[-1]["val_loss"]),
        "attn": (config or {}).get("attn") or ladder.get("attn") or "?",
        "seed": (config or {}).get("seed", ladder.get("seed")),
        "steps": (summary or {}).get("step") or (train[-1]["step"] if train else 0),
        "train_time_s": val[-1]["_t"] if val else (train[-1]["_t"] if train else None),
        "val_steps": [r["step"] for r in val], "val_times": [r["_t"] for r in val],
        "val_losses": [r["val_loss"] for r in val],
        "train_steps": [r["step"] for r in train], "train_losses": [r["loss"] for r in train],
        "final_val": val[-1]["val_loss"] if val else None,
        "notes": notes, "ms_per_step": med, "warmup_s": warmup,
    }
    run["val_times_steady"] = [s * med / 1000 for s in run["val_steps"]] if med else []
    # time after warm-up in intervals slower than STALL x the median step: another process on the cores,
    # a resume's second warm-up, ...
    run["stall_s"], prev = 0.0, 0
    for i, r in enumerate(train):
        n, m = r["step"] - prev, r.get("ms_per_step")
        prev = r["step"]
        if i > 0 and med and _finite(m) and m > STALL * med:
            run["stall_s"] += n * (m - med) / 1000
    run["gates"] = {k.split("/", 2)[2]: v for k, v in (train[-1] if train else {}).items()
                    if k.startswith("attn/mean/")}
    run["checks"] = sanity_checks(run, train, val, _reference_loss(config))
    return run


def _reference_loss(config):
    """The dataset's reference losses (synthetic datasets write them to meta.json), or None."""
    if not config or not config.get("data_dir"):
        return None
    meta = Path(config["data_dir"]) / "meta.json"
    try:
        return json.loads(meta.read_text()).get("reference_loss")
    except (OSError, json.JSONDecodeError):
        return None


def sanity_checks(run, train, val, reference=None):
    """The sanity rung's checks on one run; each is {ok: bool or None (not applicable), detail: str}."""
    checks = {}
    finished = run["status"] in OK_STATUSES
    checks["finished"] = {"ok": finished, "detail": run["status"]}
    losses = [r["loss"] for r in train]
    if len(losses) >= 2:
        first, last = losses[0], losses[-1]
        fell = _finite(first) and _finite(last) and last < 0.99 * first
        checks["loss fell"] = {"ok": fell, "detail": f"{first:.3f} -> {last:.3f}"}
    else:
        checks["loss fell"] = {"ok": False, "detail": f"{len(losses)} logged train losses (need >= 2)"}
    bad = []
    for r in train + val:
        for k, v in r.items():
            if (k in ("loss", "aux_loss", "val_loss", "grad_norm") or k.startswith("attn/")) and not _finite(v):
                bad.append(f"{k}={v} at step {r['step']}")
    checks["finite"] = {"ok": not bad, "detail": "; ".join(bad[:3]) or "loss, val loss, aux loss, attn metrics"}
    out_of_range, seen = [], set()
    for r in train:
        for k, v in r.items():
            name = k.rsplit("/", 1)[-1]
            if k.startswith("attn/") and name in GATE_RANGES:
                seen.add(name)
                lo, hi = GATE_RANGES[name]
                if _finite(v) and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                    out_of_range.append(f"{k}={v:.4g} at step {r['step']}")
    ranges = ", ".join(f"{n} in [{GATE_RANGES[n][0]:g}, {'inf' if GATE_RANGES[n][1] is None else GATE_RANGES[n][1]:g}]"
                       if GATE_RANGES[n][1] is not None else f"{n} >= {GATE_RANGES[n][0]:g}" for n in sorted(seen))
    checks["gates in range"] = {"ok": not out_of_range if seen else None,
                                "detail": "; ".join(out_of_range[:3]) or ranges or "no gate metrics"}
    if reference and val and _finite(val[-1]["val_loss"]):
        v, floor, bound = val[-1]["val_loss"], reference.get("ideal"), reference.get("no_attention_bound")
        if floor is not None:
            checks["causal"] = {"ok": v >= floor - LEAK_MARGIN,
                                "detail": f"val {v:.3f} vs ideal floor {floor:.3f}" +
                                ("" if v >= floor - LEAK_MARGIN else ": below the floor, the model sees the future")}
        if bound is not None:  # informational: short sanity runs need not get there
            checks["attention used"] = {"ok": None, "info": v < bound,
                                        "detail": f"val {v:.3f} {'<' if v < bound else '>='} no-attention bound {bound:.3f}"}
    return checks


def run_passes(run):
    return all(c["ok"] is not False for c in run["checks"].values())


# ----------------------------------------------------------------------------- variants

def _key(config):
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in IGNORED_FIELDS))


def group_runs(runs, order=None):
    """[(label, [runs])]: runs with equal configs (up to seed and bookkeeping fields) are one variant.
    The label is the attention name, plus the fields that tell apart variants of one attention."""
    groups = {}
    for r in runs:
        if r["config"] is not None:
            groups.setdefault(_key(r["config"]), []).append(r)
    by_attn = {}
    for key, rs in groups.items():
        by_attn.setdefault(rs[0]["attn"], []).append(key)
    labelled = []
    for attn, keys in by_attn.items():
        if len(keys) == 1:
            labelled.append((attn, groups[keys[0]]))
            continue
        dicts = [dict(k) for k in keys]
        differ = sorted(f for f in set().union(*dicts) if len({d.get(f) for d in dicts}) > 1)
        for k, d in zip(keys, dicts):
            labelled.append((f"{attn} ({', '.join(f'{f}={json.loads(d[f]) if f in d else None}' for f in differ)})",
                             groups[k]))
    # runs that failed before train.py wrote config.json join their attention's first variant
    for r in runs:
        if r["config"] is None:
            for label, rs in labelled:
                if rs[0]["attn"] == r["attn"]:
                    rs.append(r)
                    break
            else:
                labelled.append((r["attn"], [r]))
    order = order or []
    rank = {name: i for i, name in enumerate(order)}
    labelled.sort(key=lambda lr: (lr[1][0]["attn"] != "sdpa", rank.get(lr[1][0]["attn"], len(rank)),
                                  lr[1][0]["attn"], lr[0]))
    for _, rs in labelled:
        rs.sort(key=lambda r: (r["seed"] is None, r["seed"] if r["seed"] is not None else 0, r["name"]))
    return labelled


def unlike_fields(groups):
    """Non-attention config fields whose values differ between variants (the comparison is then not like for like)."""
    configs = [rs[0]["config"] for _, rs in groups if rs[0]["config"]]
    fields = set().union(*configs) if configs else set()
    return sorted(f for f in fields - IGNORED_FIELDS
                  if f != "attn" and not f.startswith("ra_") and f != "sdpa_backend"
                  and len({json.dumps(c.get(f), sort_keys=True) for c in configs}) > 1)


def build_results(runs, baseline=None, order=None, meta=None, time_axis="measured", margin=MARGIN):
    """The comparison of run dicts (load_run) as a JSON-able dict: variants, deltas, verdicts.
    time_axis: "measured" (train_time_s) or "steady" (step x median ms/step) for the equal-time comparison."""
    if time_axis not in TIME_KEYS:
        raise ValueError(f"time_axis={time_axis!r}: use {' or '.join(TIME_KEYS)}")
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
            "passes": all(run_passes(r) for r in rs),
            "runs": [{k: r[k] for k in ("name", "dir", "seed", "status", "ok", "steps", "train_time_s", "warmup_s",
                                         "final_val", "ms_per_step", "stall_s", "gates", "checks", "notes")} for r in rs],
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
               "lr_decays": any((r["config"] or {}).get("max_time_min", 0) == 0 for r in ok_runs)}
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


def _mean_gates(runs):
    names = sorted({k for r in runs for k in r["gates"]})
    return {k: statistics.fmean([r["gates"][k] for r in runs if k in r["gates"]]) for k in names}


# ----------------------------------------------------------------------------- verdicts

def _fmt_delta(d, cell=False):
    """A paired delta as text; cell=True: the short form of the tables ('-' when missing)."""
    if not d or d["n"] == 0:
        return "-" if cell else "no paired seeds"
    if d["n"] == 1:
        return f"{d['mean']:+.4f} (n=1, no CI)"
    interval = f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
    return interval if cell else f"{interval} (95% CI, n={d['n']})"


def _said(d):
    """"+0.0123 [-0.01, +0.03] (95% CI, n=3): no difference" without repeating "n=1, no CI"."""
    text = _fmt_delta(d)
    return text if d is None or d["verdict"] in ("n=1, no CI", "not run") else f"{text}: {d['verdict']}"


def _find(results, attn):
    return next((v for v in results["variants"] if v["attn"] == attn), None)


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


def _fmt_speed(s, ref):
    if not s or not s["n"]:
        return f"ms/step vs {ref}: -"
    if s["lo"] is None:
        return f"ms/step x{s['ratio']:.2f} of {ref} (n=1)"
    return f"ms/step x{s['ratio']:.2f} [{s['lo']:.2f}, {s['hi']:.2f}] of {ref}: {s['verdict']}"


def noninferior(d, margin):
    """Is the variant at most `margin` nats worse? 'yes' when the whole 95% CI is below +margin, 'no' when
    it is above 0 (significantly worse) without that, else 'undecided' (the CI is too wide to tell);
    'n=1' with one seed. "No difference" with a CI of +-0.5 is not evidence of keeping the loss."""
    if not d or d["n"] == 0:
        return "not run"
    if d["n"] == 1:
        return "n=1"
    if d["hi"] <= margin:
        return "yes"
    return "no" if d["lo"] > 0 else "undecided"


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

    # 1. Phase 1: does R=8 keep the val loss? Non-inferiority within the margin, not mere "no difference"
    R = sf["ra_R"] if sf else 8
    q = f"R={R} keeps val loss (within noise)?"
    if missing("sdpa", "ra_same_flop"):
        lines.append({"question": q, "answer": "not run", "detail": f"needs finished runs of "
                      f"{' and '.join(missing('sdpa', 'ra_same_flop'))} (--variants sdpa,ra_same_flop)"})
    else:
        d = sf["vs_baseline"]
        ni = noninferior(d, margin)
        ans = {"yes": "YES", "no": "NO"}.get(ni, "UNDECIDED")
        why = {"yes": f"the CI lies below +{margin:g}", "no": "the CI lies above 0",
               "undecided": f"the CI reaches past +{margin:g} and below 0: too wide to tell",
               "n=1": ""}[ni]
        nxt = {"YES": "proceed to Phase 2 (head-selective)", "NO": "try R=12 (--train-args \"--ra-R 12\")",
               "UNDECIDED": "more seeds (--seeds 5) or a longer rung"}[ans]
        note = f" (the roadmap asks about R=8; this run used ra_R={R})" if R != 8 else ""
        speed = speed_ratio(runs_of[sf["label"]], runs_of[base["label"]])
        lines.append({"question": q, "answer": ans, "detail": f"ra_same_flop - sdpa final val = {_said(d)}{f' ({why})' if why else ''}; "
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
        elif keeps_sf == "yes" and speed["verdict"] in ("slower", "no difference"):
            ans = "NO"
        else:
            ans = "UNDECIDED"
        frac = hs["gates"].get("ra_frac")
        nxt = {"YES": "ship it", "NO": "evaluate whether Phase 1 (ra_same_flop) speed is acceptable",
               "UNDECIDED": "more seeds (--seeds 5) or a longer rung"}[ans]
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
        ans = {"better": "YES", "no difference": "NO (no difference)", "worse": "NO (worse)",
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


def _ratio(x):
    return f"{x:.2f}" if x is not None else "?"


# ----------------------------------------------------------------------------- markdown

def _f(x, nd=4):
    return f"{x:.{nd}f}" if _finite(x) else "-"


def render_tables(results):
    """The comparison tables and verdicts (the part that compare.py must reproduce exactly)."""
    base = results["baseline"] or "(no baseline)"
    out = ["## Final validation loss", "",
           f"Mean ± std over seeds; Δ = variant − {base}, paired by seed, with its 95% CI (t, n−1 dof). "
           "An interval containing 0 is \"no difference\".", "",
           f"| variant | seeds ok | val loss | Δ vs {base} [95% CI] | verdict | ms/step | × {base} | steps | train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        mean = _f(v["final_val_mean"]) + (f" ± {_f(v['final_val_std'])}" if v["final_val_std"] is not None else "")
        if v["n_ok"] == 0:
            mean = "FAILED"
        verdict = "baseline" if v.get("is_baseline") else v.get("vs_baseline", {}).get("verdict", "-")
        ratio = "1.00" if v.get("is_baseline") else _ratio(v.get("ms_ratio")) if v.get("ms_ratio") else "-"
        out.append(f"| {v['label']} | {v['n_ok']}/{v['n_runs']} | {mean} | "
                   f"{'-' if v.get('is_baseline') else _fmt_delta(v.get('vs_baseline'), cell=True)} | {verdict} | "
                   f"{_f(v['ms_per_step'], 1)} | {ratio} | {_f(v['steps'], 0)} | {_f(v['train_time_s'], 1)} |")
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
            out.append(f"| {v['label']} | {_f(v['val_at_step_mean'])} | - | baseline | - | - | baseline |")
            continue
        a, t = v.get("vs_baseline_at_step"), v.get("vs_baseline_at_time")
        out.append(f"| {v['label']} | {_f(v['val_at_step_mean'])} | {_fmt_delta(a, cell=True)} | {(a or {}).get('verdict', '-')} | "
                   f"{_f((t or {}).get('time_s'), 1)} | {_fmt_delta(t, cell=True)} | {(t or {}).get('verdict', '-')} |")
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
    out += ["", "## Verdicts (the roadmap's decision tree)", "",
            "Each answer with the numbers that decided it. YES to \"better\" needs the whole 95% CI below 0; a CI "
            "that contains 0 is \"no difference\"; with one seed nothing is decided.", ""]
    for line in results["verdicts"]:
        out.append(f"- **{line['question']}** {line['answer']}: {line['detail']}")
    return "\n".join(out) + "\n"


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
            runs.append(f"| {v['label']} | {r['seed']} | {r['status']} | {r['steps']} | {_f(r['final_val'])} | "
                        f"{_f(r['ms_per_step'], 1)} | {_f(r['train_time_s'], 1)} | {_f(r['warmup_s'], 1)} | {r['dir']} |")
    plots = meta.get("plots")
    if plots:
        runs += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(head) + "\n\n" + render_tables(results) + "\n".join(runs) + "\n"


# ----------------------------------------------------------------------------- plots

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


def write_plots(groups, out_dir, baseline=None, time_axis="measured", reference=None):
    """val loss vs step and vs training time, one line per variant (mean over seeds) with a min-max band.
    Returns the file names written ([] with a notice when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed, skipping them (pip install matplotlib, or run "
              "`python compare.py <ladder folder>` where it is)")
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


def write_report(runs, out_dir, baseline=None, order=None, meta=None, title="Quality comparison", plots=True,
                 time_axis="measured", margin=MARGIN):
    """Build the results from loaded runs and write results.json, results.md and the plots into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if "reference_loss" not in meta:
        refs = [_reference_loss(r["config"]) for r in runs if r["config"]]
        meta["reference_loss"] = next((x for x in refs if x), None)
    groups = group_runs(runs, order)
    results = build_results(runs, baseline=baseline, order=order, meta=meta, time_axis=time_axis, margin=margin)
    if plots:
        meta["plots"] = write_plots(groups, out_dir, results["baseline"], time_axis, meta.get("reference_loss"))
    results["meta"] = meta
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = render_markdown(results, title)
    (out_dir / "results.md").write_text(md)
    return results, md
