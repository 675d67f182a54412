"""
Run folders -> run dicts: train.py's config.json, log.jsonl and summary.json, plus ladder_run.json where
quick_quality_test.py ran the run. quick_quality_test.py and compare.py both load runs here, so a ladder's
results.md and compare.py's table from the same folders are the same.

  clock         train.py's train_time_s (training steps only: no eval, no checkpoints), continued over a
                --resume, less the warm-up: the first logged interval's excess over the median step
                (allocator, cuBLAS init, Triton JIT, torch.compile: one-time costs that a long run
                amortizes and that would otherwise decide short comparisons). val_times_steady is
                step x the run's median ms/step instead, which also leaves out mid-run stalls of a
                busy machine (stall_s: the time in intervals slower than STALL x the median step)
  ms/step       the median of the logged ms_per_step intervals, the first one left out (it holds
                warm-up and torch.compile)
  checks        the sanity rung's checks (sanity_checks); gate ranges and head selectivity come from
                the attention class (ladder/variants.py), never from its name
  variants      group_runs: runs whose configs agree up to the seed and bookkeeping (IGNORED_FIELDS)
                are the seeds of one variant; a --repeat run (ladder_run.json: repeat_of) is none
"""

import json
import math
import statistics
from pathlib import Path

from ladder import variants as attn_info
from ladder.stats import finite

OK_STATUSES = ("done", "time budget reached")
# config fields that do not make two runs different variants (seeds of one variant differ in them)
IGNORED_FIELDS = {"seed", "run_name", "out_dir", "data_root", "data_dir", "resume", "wandb", "wandb_project",
                  "wandb_group", "wandb_tags", "log_every", "eval_every", "ckpt_every"}
STALL = 3.0  # an interval slower than this many median steps is a stall (see stall_s)
LEAK_MARGIN = 0.1  # nats: a val loss this far under the dataset's ideal floor means the model sees the future


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


def config_defaults():
    """Every TrainConfig and GPTConfig field with its default. A field added after a run was made is
    missing from its config.json; a new field defaults to the behaviour before it, so the run had that
    default, and its config compares equal to a new run's that leaves the field alone."""
    import dataclasses

    from model import GPTConfig
    from trainer.config import TrainConfig

    return {f.name: f.default for cls in (TrainConfig, GPTConfig) for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


def load_run(path):
    """One run folder -> a dict: config (missing fields at their defaults), status, curves, final values,
    ms/step, sanity checks."""
    path = Path(path)
    ladder = json.loads((path / "ladder_run.json").read_text()) if (path / "ladder_run.json").exists() else {}
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else None
    if config is not None:
        config = {**config_defaults(), **config}
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
    ms = [r["ms_per_step"] for r in train if finite(r.get("ms_per_step"))]
    med = statistics.median(ms[1:] if len(ms) > 1 else ms) if ms else None
    warmup = 0.0
    if med and len(train) > 1 and finite(train[0].get("ms_per_step")):
        warmup = max(0.0, train[0]["step"] * (train[0]["ms_per_step"] - med) / 1000)
    for r in train + val:
        r["_t"] = max(0.0, r["_t"] - warmup)
    status = (summary or {}).get("status") or ladder.get("status") or "incomplete (no summary.json)"
    run = {
        "dir": str(path), "name": path.name, "config": config, "ladder": ladder, "status": status,
        "ok": status in OK_STATUSES and bool(val) and finite(val[-1]["val_loss"]),
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
        if i > 0 and med and finite(m) and m > STALL * med:
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
    run["checks"] = sanity_checks(run, train, val, reference_loss(config))
    return run


def heads_off(train):
    """For a head-selective run: {"step": first logged step at which no head is an RA head any more
    (the layer mean of ra_frac is 0), or None, "stayed": whether it stayed 0 to the end, "final": the
    last ra_frac}; None when the run logged no ra_frac."""
    fracs = [(r["step"], r["attn/mean/ra_frac"]) for r in train if finite(r.get("attn/mean/ra_frac"))]
    if not fracs:
        return None
    off = next((s for s, f in fracs if f <= 0), None)
    return {"step": off, "stayed": off is not None and all(f <= 0 for s, f in fracs if s >= off),
            "final": fracs[-1][1]}


def reference_loss(config):
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
        fell = finite(first) and finite(last) and last < 0.99 * first
        checks["loss fell"] = {"ok": fell, "detail": f"{first:.3f} -> {last:.3f}"}
    else:
        checks["loss fell"] = {"ok": False, "detail": f"{len(losses)} logged train losses (need >= 2)"}
    bad = []
    for r in train + val:
        for k, v in r.items():
            if (k in ("loss", "aux_loss", "val_loss", "grad_norm") or k.startswith("attn/")) and not finite(v):
                bad.append(f"{k}={v} at step {r['step']}")
    ranges = attn_info.gate_ranges(run["attn"])
    out_of_range, seen = [], set()
    for r in train:
        # the layer metrics attn/l{i}/NAME and attn/mean/NAME, and the per-head "gates" lists l{i}/NAME
        values = [(k, k.rsplit("/", 1)[-1], v) for k, v in r.items() if k.startswith("attn/")]
        values += [(f"gates/{k}[{h}]", k.rsplit("/", 1)[-1], v) for k, vs in (r.get("gates") or {}).items()
                   for h, v in enumerate(vs or [])]
        for key, name, v in values:
            if not finite(v):
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
    if reference and val and finite(val[-1]["val_loss"]):
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

def config_key(config):
    """What makes two runs the same variant: their config without the seed and bookkeeping fields."""
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in IGNORED_FIELDS))


def group_runs(runs, order=None):
    """[(label, [runs])]: runs with equal configs (up to seed and bookkeeping fields) are one variant.
    The label is the attention name, plus the fields that tell apart variants of one attention."""
    runs = [r for r in runs if not r.get("repeat_of")]  # a --repeat run is noise, not a seed of its variant
    groups = {}
    for r in runs:
        if r["config"] is not None:
            groups.setdefault(config_key(r["config"]), []).append(r)
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
