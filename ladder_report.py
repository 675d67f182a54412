"""
The quality ladder's report, built only from run folders (config.json, log.jsonl, summary.json of
train.py, plus ladder_run.json where quick_quality_test.py ran the run): quick_quality_test.py and
compare.py both call build_results() and write_report(), so a ladder's results.md and compare.py's
table from the same folders are the same. Statistics: ladder/stats.py; plots: ladder/plots.py.

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
Gate ranges, head selectivity and the options a variant reads come from its attention class
(ladder/variants.py), never from its name.
"""

import json
import math
import statistics
from pathlib import Path

from ladder import plots as ladder_plots
from ladder import variants as attn_info
from ladder.stats import (classify, decide_note, finite, interp, mean_std, noninferior,  # noqa: F401
                          paired_delta, seeds_needed, speed_ratio, t_quantile)

OK_STATUSES = ("done", "time budget reached")
# config fields that do not make two runs different variants (seeds of one variant differ in them)
IGNORED_FIELDS = {"seed", "run_name", "out_dir", "data_root", "data_dir", "resume", "wandb", "wandb_project",
                  "wandb_group", "wandb_tags", "log_every", "eval_every", "ckpt_every"}
TIME_KEYS = ladder_plots.TIME_KEYS  # the run fields of each time axis
STALL = 3.0  # an interval slower than this many median steps is a stall (see stall_s)
MARGIN = 0.02  # nats: "keeps the val loss" = the 95% CI of the loss difference lies below +MARGIN
LEAK_MARGIN = 0.1  # nats: a val loss this far under the dataset's ideal floor means the model sees the future


_finite = finite


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
    # per-head gates over training, from train.py's "gates" records: {"l3/w_rec": [per head], ...}
    logged = [r for r in train if isinstance(r.get("gates"), dict)]
    keys = sorted({k for r in logged for k in r["gates"]})
    run["gate_history"] = {"steps": [r["step"] for r in logged],
                           "values": {k: [r["gates"].get(k) for r in logged] for k in keys}}
    run["repeat_of"] = ladder.get("repeat_of")
    run["heads_off"] = heads_off(train) if attn_info.head_selective(run["attn"]) else None
    run["checks"] = sanity_checks(run, train, val, _reference_loss(config))
    return run


def heads_off(train):
    """For a head-selective run: {"step": first logged step at which no head is an RA head any more
    (the layer mean of ra_frac is 0), or None, "stayed": whether it stayed 0 to the end, "final": the
    last ra_frac}; None when the run logged no ra_frac."""
    fracs = [(r["step"], r["attn/mean/ra_frac"]) for r in train if _finite(r.get("attn/mean/ra_frac"))]
    if not fracs:
        return None
    off = next((s for s, f in fracs if f <= 0), None)
    return {"step": off, "stayed": off is not None and all(f <= 0 for s, f in fracs if s >= off),
            "final": fracs[-1][1]}


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
    ranges = attn_info.gate_ranges(run["attn"])
    out_of_range, seen = [], set()
    for r in train:
        # the layer metrics attn/l{i}/NAME and attn/mean/NAME, and the per-head "gates" lists l{i}/NAME
        values = [(k, k.rsplit("/", 1)[-1], v) for k, v in r.items() if k.startswith("attn/")]
        values += [(f"gates/{k}[{h}]", k.rsplit("/", 1)[-1], v) for k, vs in (r.get("gates") or {}).items()
                   for h, v in enumerate(vs or [])]
        for key, name, v in values:
            if not _finite(v):
                if key.startswith("gates/"):  # the attn/ metrics were checked above
                    bad.append(f"{key}={v} at step {r['step']}")
                continue
            if name not in ranges:
                continue
            seen.add(name)
            lo, hi = ranges[name]
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                out_of_range.append(f"{key}={v:.4g} at step {r['step']}")
    checks["finite"] = {"ok": not bad, "detail": "; ".join(bad[:3]) or "loss, val loss, aux loss, attn metrics, gates"}
    checks["gates in range"] = {"ok": not out_of_range if seen else None,
                                "detail": "; ".join(out_of_range[:3]) or _ranges_text(ranges, seen)
                                or "no gate metrics"}
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


def _ranges_text(ranges, names):
    out = []
    for n in sorted(names):
        lo, hi = ranges[n]
        lo = None if lo is None or lo == -math.inf else lo
        out.append(f"{n} in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else
                   f"{n} >= {lo:g}" if lo is not None else f"{n} <= {hi:g}" if hi is not None else f"{n} finite")
    return ", ".join(out)


def run_passes(run):
    return all(c["ok"] is not False for c in run["checks"].values())


# ----------------------------------------------------------------------------- variants

def _key(config):
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in IGNORED_FIELDS))


def group_runs(runs, order=None):
    """[(label, [runs])]: runs with equal configs (up to seed and bookkeeping fields) are one variant.
    The label is the attention name, plus the fields that tell apart variants of one attention."""
    runs = [r for r in runs if not r.get("repeat_of")]  # a --repeat run is noise, not a seed of its variant
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
    own = attn_info.all_options()  # each variant's own attention settings may differ
    return sorted(f for f in fields - IGNORED_FIELDS - own
                  if f != "attn" and len({json.dumps(c.get(f), sort_keys=True) for c in configs}) > 1)


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


def repeat_deltas(runs):
    """The --repeat runs against the runs they repeat (same config and seed, another process): the final
    val difference and the largest difference over the val curve at the steps both evaluated."""
    by_name = {r["name"]: r for r in runs}
    out = []
    for r in runs:
        if not r.get("repeat_of"):
            continue
        o = by_name.get(r["repeat_of"])
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
            "n_min": min(d["n"] for d in ds), "n_max": max(d["n"] for d in ds)}


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


def _mde(d):
    """"MDE ±0.0123, n=3": the smallest difference this comparison resolves, and its seed count."""
    if not d or not d["n"]:
        return "n=0"
    return f"MDE ±{d['half_width']:.4f}, n={d['n']}" if d["half_width"] is not None else f"n={d['n']}, no MDE"


def _verdict_cell(d):
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
    text = _fmt_delta(d)
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
    return (f"more seeds: ~{n} would decide it at this spread (--seeds {n} with the same --out-dir reuses the "
            f"finished runs)" if n else "a longer rung: no seed count would decide it at this spread")


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
           "MDE: the CI's half-width, the smallest difference this comparison resolves. An interval containing 0 "
           "is \"undecided\", with the seeds that would decide it if the observed mean and spread held.", "",
           f"| variant | seeds ok | val loss | Δ vs {base} [95% CI] | verdict (MDE, n) | ms/step | × {base} | steps | "
           f"train s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for v in results["variants"]:
        mean = _f(v["final_val_mean"]) + (f" ± {_f(v['final_val_std'])}" if v["final_val_std"] is not None else "")
        if v["n_ok"] == 0:
            mean = "FAILED"
        verdict = "baseline" if v.get("is_baseline") else _verdict_cell(v.get("vs_baseline"))
        ratio = "1.00" if v.get("is_baseline") else _ratio(v.get("ms_ratio")) if v.get("ms_ratio") else "-"
        out.append(f"| {v['label']} | {v['n_ok']}/{v['n_runs']} | {mean} | "
                   f"{'-' if v.get('is_baseline') else _fmt_delta(v.get('vs_baseline'), cell=True)} | {verdict} | "
                   f"{_f(v['ms_per_step'], 1)} | {ratio} | {_f(v['steps'], 0)} | {_f(v['train_time_s'], 1)} |")
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
            out.append(f"| {v['label']} | {_f(v['val_at_step_mean'])} | - | baseline | - | - | baseline |")
            continue
        a, t = v.get("vs_baseline_at_step"), v.get("vs_baseline_at_time")
        out.append(f"| {v['label']} | {_f(v['val_at_step_mean'])} | {_fmt_delta(a, cell=True)} | {_verdict_cell(a)} | "
                   f"{_f((t or {}).get('time_s'), 1)} | {_fmt_delta(t, cell=True)} | {_verdict_cell(t)} |")
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
            runs.append(f"| {v['label']} | {r['seed']} | {r['status']} | {r['steps']} | {_f(r['final_val'])} | "
                        f"{_f(r['ms_per_step'], 1)} | {_f(r['train_time_s'], 1)} | {_f(r['warmup_s'], 1)} | {r['dir']} |")
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
        refs = [_reference_loss(r["config"]) for r in runs if r["config"]]
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
