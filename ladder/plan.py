"""
The ladder's plan: which variants (select_variants, --sweep: variant_specs), each rung's train.py flags
(rung_args; the short GPU rung's one pass over the corpus: one_pass), one run dict per variant and seed
(plan_runs: key, attn, seed, run folder, train.py argv, repeat_of), every command line through train.py's
own parser before any run (resolve), and the --gpus check (check_gpus). quick_quality_test.py is the CLI.
"""

import math
import os
import sys

import attention
from ladder import variants as attn_info
from ladder import workers
from ladder.runs import IGNORED_FIELDS


def on_gpu(passthrough):
    """Will the runs train on a CUDA GPU: one is visible and no --device flag says otherwise."""
    import torch

    device = dict(flag_pairs(passthrough)).get("device", "auto")
    return torch.cuda.is_available() and (device or "auto").startswith(("auto", "cuda"))


def select_variants(spec):
    """The variants to run, sdpa (the baseline) first and always included."""
    names = attn_info.default_variants() if not spec else [v.strip() for v in spec.split(",") if v.strip()]
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
        elif name not in IGNORED_FIELDS:  # bookkeeping (data root, intervals) makes no tag
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
