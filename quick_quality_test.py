"""
The quality ladder: train the attention variants with the same seeds, initialization and data order,
then compare their validation loss with confidence intervals paired by seed, and say how small a
difference this ladder can resolve.

    python quick_quality_test.py --steps 100                # sanity: a minute on a CPU
    python quick_quality_test.py --rung short --repeat      # GPU: GPT-2 124M, one pass over prose, 3 seeds
    python quick_quality_test.py                            # full: 60 min of training per run, 3 seeds
    python quick_quality_test.py --rung short --variants ra_same_flop --sweep ra_R=4,8,12,16 --seeds 2
    python quick_quality_test.py --rung short --variants ra_same_flop,ra_headsel --train-args "--ra-R 12"
    python quick_quality_test.py --rung full --budget-min 20 --dry-run      # print the plan and the commands

Rungs (each run is train.py with a command line: train.main(ARGV) in a process of the ladder, or
`python train.py ARGV`; one training code path either way):
  sanity  (--steps N implies it; N = 100 by default) a synthetic associative-recall task made locally
          (data/synthetic.py, no download) on a 2-layer version of the tiny preset, 1 seed. Every run
          must finish, lower its train loss, keep every loss, attention metric and gate finite, keep
          its gates in the ranges its class declares (gate_ranges) and not beat the task's ideal floor
          (a causality leak); ms/step is reported. Exit status 1 when any check fails.
  short   with a GPU: dataset prose, GPT-2 124M (preset gpt2-124m), batch 16 x 1024, ONE PASS over the
          train split (steps = train tokens / tokens per step), --compile, val every steps/10 and at the
          end on the whole val split (fixed windows, the same for every run), 3 seeds. Without a GPU:
          shakespeare, 1000 steps, train.py's CPU preset (tiny, bytes), val every 100 steps.
  full    a wall-clock budget per run (--budget-min 60 -> train.py --max-time-min 60), 3 seeds. The
          budget binds (max-steps 1e9), so the cosine schedule barely moves: the LR is constant after
          warm-up for every variant, and val losses at equal steps and at equal time compare like for
          like. Cost: variants x seeds x budget, e.g. 8 x 3 x 60 min = 24 h; --dry-run prints it.

Noise: every verdict carries its MDE (the half-width of the paired 95% CI: the smallest difference the
run resolves) and seed count; a CI that contains 0 is "undecided", with the number of seeds that would
decide it at the observed spread. --repeat runs the baseline's first seed once more in its own folder
and process (<baseline>-s<seed>-repeat): the report states that same-seed difference, the GPU's own
non-determinism. To decide an undecided comparison, re-run with more --seeds and the same --out-dir:
finished runs are reused.

Seeds: seed index i runs train.py --seed (--seed0 + i) for every variant: the same batches in the same
order, and the same initial values of the weights a variant shares with sdpa (model.py draws each
shared weight from a generator keyed by its name; the ladder builds every model once to check, and
results.md says if a variant differs: then the seed pairs its data, not its init).

Launch (--launch): inprocess (the sanity rung's default: every run in this process, seed by seed),
workers (every other rung's default: --gpus N workers at once, one per GPU, each running one
variant's seeds in one process so torch.compile builds its step once; see ladder/workers.py), or
subprocess (`python train.py` per run, seed by seed; needed for --run-timeout-min). --gpus defaults
to every visible GPU (1 on a CPU); asking for more than are visible is an error before any run.

Output in --out-dir (default runs/ladder-<id>): one train.py run folder per variant and seed
(<variant>-s<seed>/, with train.log, train.py's stdout, and ladder_run.json), ladder_state.json (the
corpus identity and training flags this folder was started with: a re-run with another corpus version
or other flags is refused before any run), results.json, results.md (tables with MDEs, the ladder's
own noise, each variant's attention settings, when head-selective runs switched all RA heads off, and
the roadmap's decision tree as verdicts), val_loss_vs_{step,time}.png and gates_<variant>.png (per-head
gates over training). ladder_report.py holds the report, compare.py rebuilds it from run folders.
Re-running with the same --out-dir reuses finished runs and resumes interrupted ones.

Flags for train.py: --train-args "..." and any flag this script does not know are appended to every
train.py command after the ladder's own, so they override it (e.g. --batch-size 8, --eval-every).
The ladder owns --attn, --seed, --run-name, --out-dir, --max-steps, --max-time-min, --resume and
--overwrite (use --variants, --seeds/--seed0, --steps, --budget-min). --sweep FIELD=V1,V2,... runs
every non-baseline variant that reads FIELD (its class's options) once per value, next to one
baseline: e.g. --sweep ra_R=4,8,12,16.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import attention  # noqa: E402
import ladder_report  # noqa: E402
from ladder import variants as attn_info  # noqa: E402
from ladder import workers  # noqa: E402

RUNGS = ("sanity", "short", "full")
OWNED = {"--attn": "--variants", "--seed": "--seeds / --seed0", "--run-name": "(fixed: <variant>-s<seed>)",
         "--run_name": "(fixed)", "--out-dir": "--out-dir of this script", "--out_dir": "--out-dir",
         "--max-steps": "--steps", "--max_steps": "--steps", "--max-time-min": "--budget-min",
         "--max_time_min": "--budget-min", "--resume": "(automatic for interrupted runs)",
         "--overwrite": "(the ladder starts unfinished runs over itself)",
         "--wandb-group": "(ladder-<id>)", "--wandb_group": "(ladder-<id>)"}
STATE_FILE = "ladder_state.json"
# meta.json fields that change when the same corpus is prepared again: not part of its identity
VOLATILE_META = {"created", "seconds", "date", "elapsed_s", "wall_s"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # no prefixes: --seed must not mean --seeds
    p.add_argument("--rung", choices=RUNGS, default=None, help="default: sanity with --steps, else full")
    p.add_argument("--steps", type=int, default=None,
                   help="max steps per run (sanity 100; short: one pass over the train split on a GPU, 1000 on a CPU)")
    p.add_argument("--budget-min", type=float, default=60.0, help="full rung: minutes of training per run")
    p.add_argument("--variants", default=None,
                   help="comma-separated (default: sdpa and every RA-family variant: "
                        f"{', '.join(attn_info.default_variants())})")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: 1 sanity, 3 short/full)")
    p.add_argument("--seed0", type=int, default=1337, help="seed index i uses train.py --seed SEED0+i")
    p.add_argument("--repeat", action="store_true",
                   help="run the baseline's first seed again in its own folder and process: the report states "
                        "the same-seed difference (the GPU's non-determinism)")
    p.add_argument("--sweep", default=None, metavar="FIELD=V1,V2,...",
                   help="run every non-baseline variant that reads FIELD once per value, e.g. ra_R=4,8,12,16")
    p.add_argument("--dataset", default=None,
                   help="default: synthetic-recall (sanity), prose (short with a GPU), shakespeare (otherwise)")
    p.add_argument("--out-dir", default=None, help="default: runs/ladder-<id>")
    p.add_argument("--id", default=None, help="ladder id (default: <date>-<time>-<rung>)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. \"--ra-R 12\"")
    p.add_argument("--gpus", type=int, default=None,
                   help="runs at once, one per GPU, with --launch workers (default: every visible GPU; 1 on a CPU)")
    p.add_argument("--wandb", action="store_true", help="log every run to wandb, one group ladder-<id>")
    p.add_argument("--drop-ckpt", action="store_true", help="delete each finished run's ckpt.pt (saves ~1.5 GB "
                                                             "per gpt2-124m run)")
    p.add_argument("--launch", choices=("auto", "inprocess", "workers", "subprocess"), default="auto",
                   help="inprocess: train.main(argv) in this process, seed by seed; workers: --gpus processes at "
                        "once, one variant's seeds per process; subprocess: `python train.py` per run (killable); "
                        "auto: inprocess for sanity, subprocess with --run-timeout-min, else workers")
    p.add_argument("--run-timeout-min", type=float, default=0.0,
                   help="stop a run after this long (SIGTERM: it checkpoints; 0: never; needs --launch subprocess)")
    p.add_argument("--time-axis", choices=("measured", "steady"), default="measured",
                   help="equal wall-clock on train.py's train_time_s (measured) or on step x median ms/step "
                        "(steady: leaves out warm-up, compile and busy-machine stalls)")
    p.add_argument("--margin", type=float, default=ladder_report.MARGIN,
                   help="nats: \"keeps the val loss\" needs the 95%% CI of the difference below +MARGIN")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the train.py commands, run nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="echo all of train.py's output (default: val lines)")
    args, unknown = p.parse_known_args(argv)
    args.passthrough = shlex.split(args.train_args) + unknown
    if args.rung is None:
        args.rung = "sanity" if args.steps is not None else "full"
    if args.steps is None and args.rung == "sanity":
        args.steps = 100
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps={args.steps} must be positive")
    if args.seeds is None:
        args.seeds = 1 if args.rung == "sanity" else 3
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds} must be >= 1")
    if args.gpus is not None and args.gpus < 1:
        p.error(f"--gpus={args.gpus} must be >= 1")
    if args.rung == "full" and not args.budget_min > 0:
        p.error(f"--budget-min={args.budget_min} must be positive")
    for tok in args.passthrough:
        flag = tok.split("=", 1)[0]
        if flag in OWNED:
            p.error(f"{flag} is set by the ladder for every run; use {OWNED[flag]} instead")
    if args.launch == "auto":
        args.launch = ("inprocess" if args.rung == "sanity" and args.run_timeout_min <= 0 else
                       "subprocess" if args.run_timeout_min > 0 else "workers")
    if args.launch != "subprocess" and args.run_timeout_min > 0:
        p.error("--run-timeout-min needs --launch subprocess (a run inside a ladder process cannot be killed alone)")
    args.on_gpu = on_gpu(args.passthrough)
    if args.dataset is None:
        args.dataset = ("synthetic-recall" if args.rung == "sanity" else
                        "prose" if args.rung == "short" and args.on_gpu else "shakespeare")
    try:
        args.variants = select_variants(args.variants)
        args.specs = variant_specs(args.variants, args.sweep)
    except ValueError as e:
        p.error(str(e))
    return args


def on_gpu(passthrough):
    """Will the runs train on a CUDA GPU: one is visible and no --device flag says otherwise."""
    import torch

    device = dict(flag_pairs(passthrough)).get("device", "auto")
    return torch.cuda.is_available() and (device or "auto").startswith(("auto", "cuda"))


def default_variants():
    return attn_info.default_variants()


def select_variants(spec):
    """The variants to run, sdpa (the baseline) first and always included."""
    names = default_variants() if not spec else [v.strip() for v in spec.split(",") if v.strip()]
    bad = [n for n in names if n not in attention.names()]
    if bad:
        raise ValueError(f"unknown attention {', '.join(map(repr, bad))}; registered: {', '.join(attention.names())}")
    if "sdpa" not in names:
        print("variants: adding the baseline sdpa (every comparison is against it)")
    return ["sdpa"] + [n for n in dict.fromkeys(names) if n != "sdpa"]


def variant_specs(names, sweep=None):
    """[(key, attn, extra train.py flags)]: one per variant, or with --sweep FIELD=V1,V2 one per value for
    every non-baseline variant whose class reads FIELD. key names its run folders (<key>-s<seed>)."""
    if not sweep:
        return [(n, n, []) for n in names]
    field, _, values = sweep.partition("=")
    field = field.strip().lstrip("-").replace("-", "_")
    values = [v.strip() for v in values.split(",") if v.strip()]
    if not field or not values:
        raise ValueError(f"--sweep {sweep!r}: use FIELD=V1,V2,... (e.g. --sweep ra_R=4,8,12,16)")
    readers = [n for n in names[1:] if field in attn_info.options(n)]
    if not readers:
        raise ValueError(f"--sweep {field}: none of the variants {', '.join(names[1:]) or '(none)'} reads {field} "
                         f"(their classes' options); pick variants that do, e.g. --variants ra_same_flop")
    specs = [(names[0], names[0], [])]
    for n in names[1:]:
        if n in readers:
            specs += [(f"{n}-{field}{v}", n, [f"--{field.replace('_', '-')}", v]) for v in values]
        else:
            specs.append((n, n, []))
    return specs


def rung_args(args, steps=None, eval_batches=None):
    """The ladder's train.py flags for this rung (before the pass-through flags, which override them).
    steps/eval_batches: the short GPU rung's one pass and whole val split, once the corpus is known."""
    if args.rung == "sanity":
        s = args.steps
        # the tiny preset with 2 layers and 64-token windows: a few seconds for 100 steps on a CPU, and
        # enough to learn the recall task (val below its no-attention bound) within ~100 steps
        return ["--preset", "tiny", "--dataset", args.dataset, "--tokenizer", "bytes", "--n-layer", "2",
                "--block-size", "64", "--max-steps", str(s), "--warmup-steps", str(max(1, min(20, s // 5))),
                "--eval-every", str(max(1, s // 10)), "--eval-batches", "8", "--log-every", str(max(1, s // 20))]
    if args.rung == "short":
        s = args.steps or steps or 1000
        out = ["--dataset", args.dataset, "--max-steps", str(s), "--eval-every", str(max(1, s // 10))]
        if args.on_gpu:
            out += ["--preset", "gpt2-124m", "--batch-size", "16", "--compile"]
            if eval_batches:
                out += ["--eval-batches", str(eval_batches)]
        return out
    # full: the time budget binds; max-steps only if given
    return ["--dataset", args.dataset, "--max-time-min", str(args.budget_min),
            "--max-steps", str(args.steps if args.steps else 10**9)]


def flag_pairs(toks):
    """["--ra-R", "12", "--compile", "--lr=1e-3"] -> [("ra-R", "12"), ("compile", None), ("lr", "1e-3")]."""
    out, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t.startswith("--"):
            if "=" in t:
                out.append(tuple(t[2:].split("=", 1)))
            elif i + 1 < len(toks) and not toks[i + 1].startswith("--"):
                out.append((t[2:], toks[i + 1]))
                i += 1
            else:
                out.append((t[2:], None))
        i += 1
    return out


def strip_flag(toks, names):
    """toks without the flags in names and their values ("--x v" or "--x=v")."""
    out, skip = [], False
    for t in toks:
        if skip:
            skip = False
        elif t.split("=", 1)[0] in names:
            skip = "=" not in t
        else:
            out.append(t)
    return out


def wandb_tags(args, seed_index, extra=()):
    """The ladder, rung, seed index and the pass-through options ("ra-R=12", "compile"); train.py adds the
    attention name, dataset and preset. The user's own --wandb-tags are kept."""
    tags = ["ladder", f"rung-{args.rung}", f"seed-index-{seed_index}"]
    for flag, value in flag_pairs(list(extra) + args.passthrough):
        name = flag.replace("-", "_")
        if name == "wandb_tags":
            tags += [t for t in (value or "").split(",") if t]
        elif name not in ladder_report.IGNORED_FIELDS:  # bookkeeping (data root, intervals) makes no tag
            tags.append(flag if value is None else f"{flag}={value}")
    return ",".join(t.replace(",", ";")[:64] for t in tags)


def plan_runs(args, ladder_id, out_dir, steps=None, eval_batches=None):
    """[run dict] in run order, seed by seed, variants in order; with --repeat one more run at the end:
    the baseline's first seed in <baseline>-s<seed>-repeat. A run: key (variant), attn, seed_index, seed,
    run_dir, argv, repeat_of."""
    runs = []

    def make(key, attn, extra, i, name, repeat_of=None):
        seed = args.seed0 + i
        argv = ["--attn", attn, "--seed", str(seed), "--run-name", name, "--out-dir", str(out_dir),
                *rung_args(args, steps, eval_batches), *extra]
        if args.wandb:
            argv += ["--wandb", "--wandb-group", f"ladder-{ladder_id}", "--wandb-tags", wandb_tags(args, i, extra)]
        # with --wandb the user's --wandb-tags are merged into the ladder's (a second one would replace them)
        argv += strip_flag(args.passthrough, ("--wandb-tags", "--wandb_tags")) if args.wandb else args.passthrough
        return {"key": key, "attn": attn, "seed_index": i, "seed": seed, "run_dir": str(out_dir / name),
                "argv": argv, "repeat_of": repeat_of}

    for i in range(args.seeds):
        for key, attn, extra in args.specs:
            runs.append(make(key, attn, extra, i, f"{key}-s{args.seed0 + i}"))
    if args.repeat:
        key, attn, extra = args.specs[0]
        runs.append(make(key, attn, extra, 0, f"{key}-s{args.seed0}-repeat", repeat_of=f"{key}-s{args.seed0}"))
    return runs


def resolve(argv):
    """train.py's own resolution of a command line: (TrainConfig, GPTConfig). Bad flags exit here, before any run."""
    import train

    try:
        tc, mc, _ = train.resolve_config(argv)
    except SystemExit:
        print("error: train.py rejected the flags above (they come from the ladder's rung, --train-args or the "
              "unknown flags of this script); `python train.py --help` lists them", file=sys.stderr)
        raise
    return tc, mc


def prepare_data(tc):
    """Make the dataset once before the runs (data.prepare.ensure_dataset), so no run prepares or waits
    for it. Returns (meta, data_dir)."""
    from data.loader import load_meta
    from data.prepare import PrepareError, ensure_dataset

    try:
        out = ensure_dataset(tc.dataset, tc.tokenizer, tc.data_root, print)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    return load_meta(out), out


def split_tokens(meta, split):
    """Token count of a split from meta.json ("tokens": {"train": N, "val": M}, or "<split>_tokens")."""
    n = (meta.get("tokens") or {}).get(split, meta.get(f"{split}_tokens"))
    if not isinstance(n, int) or n <= 0:
        raise SystemExit(f"error: meta.json of {meta.get('name', '?')} gives no {split} token count (looked for "
                         f"tokens.{split} and {split}_tokens); prepare the dataset again with data/prepare.py")
    return n


def one_pass(meta, tc, mc):
    """(steps, eval_batches) of the short GPU rung: one pass over the train split, and every val window."""
    per_step = tc.batch_size * mc.block_size * tc.grad_accum
    steps = split_tokens(meta, "train") // per_step
    if steps < 10:
        raise SystemExit(f"error: {tc.dataset}'s train split ({split_tokens(meta, 'train'):,} tokens) is under 10 "
                         f"steps of {per_step:,} tokens; use a larger dataset or give --steps")
    windows = max(1, (split_tokens(meta, "val") - 1) // mc.block_size)
    return steps, math.ceil(windows / tc.batch_size)


def corpus_identity(meta):
    """What makes a prepared corpus this corpus: a sha256 over meta.json without the fields that change on
    every preparation (VOLATILE_META), with the token counts and per-part sha256s readable beside it."""
    stable = {k: v for k, v in meta.items() if k not in VOLATILE_META}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": meta.get("name") or meta.get("dataset"), "tokenizer": meta.get("tokenizer"),
            "tokens": meta.get("tokens"), "sha256": digest}


def ladder_flags(tc, mc):
    """The baseline's resolved training config without what differs between runs of one ladder (seed, run
    name, attention, bookkeeping): a ladder folder holds runs of one set of flags only."""
    skip = ladder_report.IGNORED_FIELDS | {"attn", "seed", "run_name", "resume", "overwrite", "vocab_size"}
    return {k: v for k, v in {**dataclasses.asdict(tc), **dataclasses.asdict(mc)}.items() if k not in skip}


def check_state(out_dir, state, write=True):
    """Refuse a ladder folder started with another corpus or other training flags; else record this one.
    Raises SystemExit with what differs and what to do, before any run starts."""
    path = Path(out_dir) / STATE_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("corpus", {}).get("sha256") != state["corpus"]["sha256"]:
            o, n = old.get("corpus", {}), state["corpus"]
            raise SystemExit(f"error: {out_dir} holds a ladder on another version of the corpus ({o.get('name')}: "
                             f"tokens {o.get('tokens')}, sha256 {str(o.get('sha256'))[:12]}; now {n['name']}: tokens "
                             f"{n['tokens']}, sha256 {n['sha256'][:12]}). Its runs do not compare with new ones: use "
                             f"another --out-dir, or restore that corpus")
        differ = sorted(k for k in set(old.get("flags", {})) | set(state["flags"])
                        if old.get("flags", {}).get(k) != state["flags"].get(k))
        if differ:
            diffs = ", ".join(f"{k}: {old['flags'].get(k)!r} then, {state['flags'].get(k)!r} now" for k in differ[:5])
            raise SystemExit(f"error: {out_dir} holds a ladder with other training flags ({diffs}). Use another "
                             f"--out-dir for these flags, or give the same flags to continue that ladder")
        return
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=2) + "\n")


def check_gpus(args):
    """--gpus: default every visible GPU (1 on a CPU); more than visible is an error before any run."""
    visible = workers.visible_gpus()
    if args.gpus is None:
        args.gpus = visible if args.launch == "workers" else 1
    if args.gpus > visible:
        where = f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}" if os.environ.get(
            "CUDA_VISIBLE_DEVICES") else "torch.cuda.device_count()"
        raise SystemExit(f"error: --gpus {args.gpus} but {visible} {'GPU is' if visible == 1 else 'GPUs are'} "
                         f"visible ({where}; a CPU counts as 1); use --gpus {visible} or fewer")
    if args.gpus > 1 and args.launch != "workers":
        raise SystemExit(f"error: --gpus {args.gpus} needs --launch workers (--launch {args.launch} runs one run "
                         f"at a time)")


def init_check(plan, resolved, vocab_size):
    """{variant key: (identical, shared)}: how many of the weights a variant shares with sdpa (same name and
    shape) start from the same values at the first seed. train.py seeds the global RNG and builds GPT(mc); a
    variant whose constructor draws from that RNG shifts every later draw, and then the seed pairs only the
    data order."""
    import torch

    from model import GPT

    def initial(mc, seed):
        mc = dataclasses.replace(mc, vocab_size=vocab_size)
        torch.manual_seed(seed)  # as train.py does, before GPT(mc)
        return GPT(mc).state_dict()

    out, base = {}, None
    for run, (tc, mc) in zip(plan, resolved):
        if run["seed_index"] != 0 or run["repeat_of"]:
            continue
        sd = initial(mc, tc.seed)
        if base is None:  # the baseline comes first
            base = sd
            continue
        # the randomly initialized ones (LayerNorm weights and biases start constant in every variant)
        shared = [k for k in sd if k in base and sd[k].shape == base[k].shape and base[k].numel() > 1
                  and base[k].float().std() > 0]
        out[run["key"]] = (sum(torch.equal(sd[k], base[k]) for k in shared), len(shared))
    return out


def init_note(init):
    differ = {v: f"{a}/{n}" for v, (a, n) in init.items() if a < n}
    if not differ:
        return "init: every variant starts from sdpa's values for the weights it shares with sdpa"
    return (f"init: {', '.join(f'{v} ({x} random shared tensors equal)' for v, x in differ.items())} start from other "
            f"values than sdpa for the weights they share (their constructors draw from the seeded RNG before "
            f"GPT's init): the seed pairs their data order, not their initialization")


def existing_state(run_dir, planned):
    """'fresh', 'reuse' (finished, same config), 'resume' (interrupted, has ckpt.pt) or raise on another config."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return "fresh"
    old = json.loads(cfg_path.read_text())
    skip = ladder_report.IGNORED_FIELDS | {"vocab_size", "run_name", "world_size", "data_dir", "wandb_tags",
                                           "overwrite"}
    differ = sorted(k for k in planned if k not in skip and k in old and old[k] != planned[k])
    if differ:
        diffs = ", ".join(f"{k}: {old[k]!r} != {planned[k]!r}" for k in differ[:4])
        raise SystemExit(f"error: {run_dir} holds a run with another config ({diffs}); use another --out-dir "
                         f"(or delete that folder)")
    summary = run_dir / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    if status in ladder_report.OK_STATUSES or status == "non-finite loss":
        return "reuse"
    return "resume" if (run_dir / "ckpt.pt").exists() else "fresh"


def run_subprocess(argv, run_dir, attn, seed, args, extra=None):
    """One `python train.py ARGV`; its output goes to RUN_DIR/train.log. Writes RUN_DIR/ladder_run.json."""
    workers.start_marker(run_dir, attn, seed, extra)
    cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    timeout = 60 * args.run_timeout_min if args.run_timeout_min > 0 else None
    tail, timed_out = [], threading.Event()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

        def kill():  # train.py checkpoints on SIGTERM, so a later ladder with the same --out-dir resumes it
            timed_out.set()
            proc.terminate()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-30:]
                workers.echo(line, args.verbose)
            rc = proc.wait()
        except KeyboardInterrupt:  # pass it on (a terminal's Ctrl-C reaches both): train.py checkpoints and exits
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    forced = f"timed out after {args.run_timeout_min:g} min" if timed_out.is_set() else None
    return workers.record(run_dir, attn, seed, argv, rc, t0, tail, forced, "subprocess", extra)


def run_sequential(todo, args):
    """The runs one after another in this process (inprocess) or as `python train.py` (subprocess).
    Returns 130 when interrupted, else 0."""
    for k, run in enumerate(todo):
        run_dir, head = Path(run["run_dir"]), f"[{k + 1}/{len(todo)}] {Path(run['run_dir']).name}"
        extra = {"repeat_of": run["repeat_of"]} if run["repeat_of"] else None
        print(f"{head}: python train.py {shlex.join(run['argv'])}" +
              ("  (in-process)" if args.launch == "inprocess" else ""), flush=True)
        try:
            if args.launch == "inprocess":
                rec = workers.run_inprocess(run["argv"], run_dir, run["attn"], run["seed"], args.verbose, extra)
            else:
                rec = run_subprocess(run["argv"], run_dir, run["attn"], run["seed"], args, extra)
        except KeyboardInterrupt:
            rec = {"status": "stopped by signal 2"}
        if rec["status"].startswith("stopped by signal"):
            return 130
        r = ladder_report.load_run(run_dir)
        print(f"{head}: {rec['status']} in {rec['wall_s']:.1f} s, val {ladder_report._f(r['final_val'])}, "
              f"{ladder_report._f(r['ms_per_step'], 1)} ms/step", flush=True)
        if rec["returncode"] != 0:
            print("    " + "\n    ".join(rec.get("error_tail", [])[-12:]))
        if args.drop_ckpt and rec["status"] in ladder_report.OK_STATUSES:
            (run_dir / "ckpt.pt").unlink(missing_ok=True)
    return 0


def prepared_meta(tc):
    """meta.json of the dataset if it is prepared (a dry run prepares nothing), else None."""
    from data.loader import load_meta
    from data.prepare import dataset_dir
    from data.synthetic import task_of

    if task_of(tc.dataset) is not None:  # generated in a moment, and its parameters are in its meta.json
        return prepare_data(tc)[0]
    try:
        return load_meta(dataset_dir(tc.dataset, tc.tokenizer, tc.data_root))
    except FileNotFoundError:
        return None


def print_plan(args, todo, states, out_dir):
    """--dry-run: the jobs (with --launch workers) and every train.py command, nothing run."""
    if states is None:
        print(f"  output: {out_dir}")
    jobs = workers.plan_jobs(todo) if args.launch == "workers" else [{"key": None, "runs": todo}]
    for job in jobs:
        if job["key"]:
            print(f"  job {job['key']} ({len(job['runs'])} run(s) in one worker process):")
        for r in job["runs"]:
            print(f"    python train.py {shlex.join(r['argv'])}")
    return 0


def git_describe():
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (uncommitted changes)' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        return None


def main(cli_argv=None):
    args = parse_args(cli_argv)
    check_gpus(args)
    ladder_id = args.id or time.strftime("%Y%m%d-%H%M%S") + f"-{args.rung}"
    out_dir = (Path(args.out_dir) if args.out_dir else ROOT / "runs" / f"ladder-{ladder_id}").resolve()

    # every run's flags through train.py's own parser first: a typo fails now, not after hours of runs
    plan = plan_runs(args, ladder_id, out_dir)
    resolved = [resolve(r["argv"]) for r in plan]
    tc0, mc0 = resolved[0]
    meta = prepared_meta(tc0) if args.dry_run else prepare_data(tc0)[0]
    if meta is None:  # a dry run prepares nothing: the plan below is without the corpus's numbers
        print(f"dry run: {tc0.dataset} is not prepared yet; its token counts decide the short rung's steps, and "
              f"the ladder folder's corpus check waits for it")
        return print_plan(args, plan, None, out_dir)
    one_pass_rung = args.rung == "short" and args.on_gpu and args.steps is None
    if one_pass_rung:  # now that the corpus is known: its one pass and its whole val split
        steps, eval_batches = one_pass(meta, tc0, mc0)
        plan = plan_runs(args, ladder_id, out_dir, steps, eval_batches)
        resolved = [resolve(r["argv"]) for r in plan]
        tc0, mc0 = resolved[0]
    state = {"corpus": corpus_identity(meta), "flags": ladder_flags(tc0, mc0), "rung": args.rung}
    check_state(out_dir, state, write=not args.dry_run)
    states = [existing_state(Path(r["run_dir"]), {**dataclasses.asdict(tc), **dataclasses.asdict(mc)})
              for r, (tc, mc) in zip(plan, resolved)]

    import torch

    device = tc0.device if tc0.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(0)})"
    per_run = (f"{tc0.max_steps} steps" + (" (one pass over the train split)" if one_pass_rung else "")
               if args.rung != "full" else f"{args.budget_min:g} min" + (f" or {args.steps} steps" if args.steps else ""))
    print(f"ladder {ladder_id}: rung {args.rung}, {len(args.specs)} variants x {args.seeds} seed(s)"
          f"{' + 1 repeat' if args.repeat else ''} = {len(plan)} runs of {per_run} (dataset {tc0.dataset}, "
          f"preset {tc0.preset}, {mc0.n_layer}x{mc0.n_embd}, block {mc0.block_size}, batch {tc0.batch_size}, "
          f"compile {tc0.compile}, device {device})")
    if args.rung == "full":
        print(f"  cost: {len(plan)} runs x {args.budget_min:g} min = {len(plan) * args.budget_min / 60:.1f} h of "
              f"training, plus evals and start-up")
    print(f"  variants: {', '.join(k for k, _, _ in args.specs)}; seeds: "
          f"{', '.join(str(args.seed0 + i) for i in range(args.seeds))}")
    todo = [dict(r, state=s) for r, s in zip(plan, states) if s != "reuse"]
    print(f"  runs: {len(plan) - len(todo)} finished (reused), {sum(s == 'resume' for s in states)} to resume, "
          f"{sum(s == 'fresh' for s in states)} to start; launch {args.launch}"
          + (f" on {args.gpus} GPU(s)" if args.launch == "workers" else ""))
    print(f"  output: {out_dir}")
    if args.dry_run:
        return print_plan(args, todo, states, out_dir)
    jobs = workers.plan_jobs(todo) if args.launch == "workers" else None

    for r in todo:
        run_dir = Path(r["run_dir"])
        if r["state"] == "resume":
            r["argv"] = r["argv"] + ["--resume"]
        else:
            for f in ("log.jsonl", "summary.json", "config.json", "ladder_run.json", "train.log"):
                (run_dir / f).unlink(missing_ok=True)  # a fresh start: train.py refuses a folder holding a run
    t_start = time.time()
    if args.launch == "workers":
        # SIGTERM (e.g. `timeout`) reaches only this process: treat it as Ctrl-C, so run_pool passes SIGINT on
        # to the workers and their runs checkpoint, instead of leaving them running without a ladder
        signal.signal(signal.SIGTERM, lambda signum, frame: signal.default_int_handler(signum, frame))
        # the init check builds every model on this process's CPU while the workers train
        init_box = {}
        checker = threading.Thread(target=lambda: init_box.update(init_check(plan, resolved, meta["vocab_size"])),
                                   daemon=True)
        checker.start()
        _, interrupted = workers.run_pool(jobs, workers.gpu_ids(args.gpus), out_dir / ".jobs", args.verbose,
                                          args.drop_ckpt)
        checker.join()
        init, rc = init_box, 130 if interrupted else 0
    else:
        init = init_check(plan, resolved, meta["vocab_size"])
        rc = run_sequential(todo, args)
    if rc == 130:
        print("interrupted: the running runs checkpointed. Run the same command again to continue: finished runs "
              "are reused, interrupted ones resume", flush=True)
        return 130
    note = init_note(init)
    print(f"  {note}")

    runs = [ladder_report.load_run(Path(r["run_dir"])) for r in plan]
    report_meta = {
        "command": "python quick_quality_test.py " + shlex.join(sys.argv[1:] if cli_argv is None else cli_argv),
        "ladder_id": ladder_id, "rung": args.rung, "dataset": tc0.dataset, "device": device,
        "torch": torch.__version__, "python": platform.python_version(), "git": git_describe(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.time() - t_start, 1),
        "variants": [k for k, _, _ in args.specs], "seeds": [args.seed0 + i for i in range(args.seeds)],
        "gpus": args.gpus, "launch": args.launch, "corpus": state["corpus"],
        "train_args": args.passthrough, "reference_loss": meta.get("reference_loss"),
        "init_identical_to_sdpa": {v: {"equal": a, "shared": n} for v, (a, n) in init.items()},
        "notes": [f"timings are from this device ({device}); compare ms/step only within one device", note]
        + ([f"runs spread over {args.gpus} GPUs, one variant per process: a variant's ms/step comes from the GPU "
            f"it ran on (ladder_run.json: gpu)"] if args.launch == "workers" and args.gpus > 1 else [])
        + (["sanity rung: a tiny model on a synthetic task; its verdicts exercise the decision tree, the short and "
            "full rungs decide it"] if args.rung == "sanity" else [])
        + (["ms/step are eager (no --compile): eagerly the RA folds and gates are many small kernels, so the "
            "wall-clock comparisons overstate their cost; rerun with --compile for wall-clock verdicts"]
           if device.startswith("cuda") and not tc0.compile else []),
    }
    results, md = ladder_report.write_report(runs, out_dir, order=attention.names(), meta=report_meta,
                                             title=f"Quality ladder {ladder_id} ({args.rung})",
                                             time_axis=args.time_axis, margin=args.margin)
    print()
    print(ladder_report.render_tables(results))
    print(f"wrote {out_dir / 'results.md'}, results.json" +
          (f" and {', '.join(results['meta']['plots'])}" if results["meta"].get("plots") else ""))
    failed = [r["name"] for r in runs if not r["ok"]]
    if args.rung == "sanity":
        failed = [r["name"] for r in runs if not ladder_report.run_passes(r)]
        print(f"sanity: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} "
              f"({len(runs) - len(failed)}/{len(runs)} runs pass every check)")
    elif failed:
        print(f"runs that did not finish: {', '.join(failed)} (see their train.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
