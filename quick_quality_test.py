"""
The quality ladder: train the attention variants with the same seeds, initialization and data order,
then compare their validation loss with confidence intervals paired by seed.

    python quick_quality_test.py --steps 100                # sanity: minutes on a CPU
    python quick_quality_test.py --rung short               # real data, 1000 steps, 3 seeds
    python quick_quality_test.py                            # full: 60 min of training per run, 3 seeds
    python quick_quality_test.py --rung short --variants ra_same_flop,ra_headsel --train-args "--ra-R 12"
    python quick_quality_test.py --rung short --compile --batch-size 8      # unknown flags go to train.py
    python quick_quality_test.py --rung full --budget-min 20 --dry-run      # print the plan and the commands

Rungs (each run is train.py with a command line: `python train.py ARGS` in a subprocess, or, for the
sanity rung, train.main(ARGS) in this process to skip ~10 s of start-up per run (--launch); either way
one training code path, and the same numbers: in-process and subprocess logs match bit for bit on CPU):
  sanity  (--steps N implies it; N = 100 by default) a synthetic associative-recall task made in-process
          (data/synthetic.py, no download) on a 2-layer version of the tiny preset, 1 seed. Every run
          must finish, lower its train loss, keep every loss and attention metric finite, keep its gates
          in range (w_rec, w_std >= 0; ra_frac, tok_frac in [0, 1]) and not beat the task's ideal
          floor (a causality leak); ms/step is reported. Exit status 1 when any check fails.
          Measured: all 7 variants in 32 s on 2 CPU cores, 60 s on an H100 (20 s of it ra_ctr's
          first Triton compile).
  short   real data (--dataset, default shakespeare), --steps 1000, 3 seeds, train.py's auto preset
          (gpt2-124m with a GPU, tiny without); val every steps/10.
  full    a wall-clock budget per run (--budget-min 60 -> train.py --max-time-min 60), 3 seeds. The
          budget binds (max-steps 1e9), so the cosine schedule barely moves: the LR is constant after
          warm-up for every variant, and val losses at equal steps and at equal time compare like for
          like. Cost: variants x seeds x budget, e.g. 7 x 3 x 60 min = 21 h; --dry-run prints it.

Seeds: seed index i runs train.py --seed (--seed0 + i) for every variant: the same batches in the same
order, and the same initial values of the weights a variant shares with sdpa (model.py draws each
shared weight from a generator keyed by its name; the ladder builds every model once to check, and
results.md says if a variant differs: then the seed pairs its data, not its init). Runs go seed by seed (all variants of seed 0, then seed 1, ...) so slow drift of the machine
spreads over the variants.

Output in --out-dir (default runs/ladder-<id>): one train.py run folder per variant and seed
(<variant>-s<seed>/, with train.log, train.py's stdout), results.json, results.md (tables and the
roadmap's decision tree as verdicts) and val_loss_vs_{step,time}.png. See ladder_report.py for the
statistics. compare.py rebuilds the same report from run folders. Re-running with the same
--out-dir reuses finished runs and resumes interrupted ones from their checkpoint.

Flags for train.py: --train-args "..." and any flag this script does not know are appended to every
train.py command after the ladder's own, so they override it (e.g. --block-size, --eval-every).
The ladder owns --attn, --seed, --run-name, --out-dir, --max-steps and --max-time-min (use --variants,
--seeds/--seed0, --steps, --budget-min).
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import attention  # noqa: E402
import ladder_report  # noqa: E402

RUNGS = ("sanity", "short", "full")
OWNED = {"--attn": "--variants", "--seed": "--seeds / --seed0", "--run-name": "(fixed: <variant>-s<seed>)",
         "--run_name": "(fixed)", "--out-dir": "--out-dir of this script", "--out_dir": "--out-dir",
         "--max-steps": "--steps", "--max_steps": "--steps", "--max-time-min": "--budget-min",
         "--max_time_min": "--budget-min", "--resume": "(automatic for interrupted runs)",
         "--wandb-group": "(ladder-<id>)", "--wandb_group": "(ladder-<id>)"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # no prefixes: --seed must not mean --seeds
    p.add_argument("--rung", choices=RUNGS, default=None, help="default: sanity with --steps, else full")
    p.add_argument("--steps", type=int, default=None, help="max steps per run (sanity 100, short 1000)")
    p.add_argument("--budget-min", type=float, default=60.0, help="full rung: minutes of training per run")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated (default: sdpa and every RA variant: {', '.join(default_variants())})")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: 1 sanity, 3 short/full)")
    p.add_argument("--seed0", type=int, default=1337, help="seed index i uses train.py --seed SEED0+i")
    p.add_argument("--dataset", default=None, help="default: synthetic-recall (sanity), shakespeare (short/full)")
    p.add_argument("--out-dir", default=None, help="default: runs/ladder-<id>")
    p.add_argument("--id", default=None, help="ladder id (default: <date>-<time>-<rung>)")
    p.add_argument("--train-args", default="", help="extra train.py flags for every run, e.g. \"--ra-R 12 --compile\"")
    p.add_argument("--wandb", action="store_true", help="log every run to wandb, one group ladder-<id>")
    p.add_argument("--drop-ckpt", action="store_true", help="delete each finished run's ckpt.pt (saves ~1.5 GB "
                                                             "per gpt2-124m run)")
    p.add_argument("--launch", choices=("auto", "inprocess", "subprocess"), default="auto",
                   help="run train.main(argv) in this process (no per-run start-up: torch import, CUDA init) or "
                        "`python train.py` per run (isolated, killable); auto: inprocess for sanity, else subprocess")
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
    if args.steps is None:
        args.steps = {"sanity": 100, "short": 1000, "full": None}[args.rung]
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps={args.steps} must be positive")
    if args.seeds is None:
        args.seeds = 1 if args.rung == "sanity" else 3
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds} must be >= 1")
    if args.rung == "full" and not args.budget_min > 0:
        p.error(f"--budget-min={args.budget_min} must be positive")
    for tok in args.passthrough:
        flag = tok.split("=", 1)[0]
        if flag in OWNED:
            p.error(f"{flag} is set by the ladder for every run; use {OWNED[flag]} instead")
    if args.launch == "auto":
        args.launch = "subprocess" if args.rung != "sanity" or args.run_timeout_min > 0 else "inprocess"
    if args.launch == "inprocess" and args.run_timeout_min > 0:
        p.error("--run-timeout-min needs --launch subprocess (a run in this process cannot be killed)")
    args.dataset = args.dataset or ("synthetic-recall" if args.rung == "sanity" else "shakespeare")
    try:
        args.variants = select_variants(args.variants)
    except ValueError as e:
        p.error(str(e))
    return args


def default_variants():
    return ["sdpa"] + [n for n in attention.names() if n.startswith("ra")]


def select_variants(spec):
    """The variants to run, sdpa (the baseline) first and always included."""
    names = default_variants() if not spec else [v.strip() for v in spec.split(",") if v.strip()]
    bad = [n for n in names if n not in attention.names()]
    if bad:
        raise ValueError(f"unknown attention {', '.join(map(repr, bad))}; registered: {', '.join(attention.names())}")
    if "sdpa" not in names:
        print("variants: adding the baseline sdpa (every comparison is against it)")
    return ["sdpa"] + [n for n in dict.fromkeys(names) if n != "sdpa"]


def rung_args(args):
    """The ladder's train.py flags for this rung (before the pass-through flags, which override them)."""
    if args.rung == "sanity":
        s = args.steps
        # the tiny preset with 2 layers and 64-token windows: a few seconds for 100 steps on a CPU, and
        # enough to learn the recall task (val below its no-attention bound) within ~100 steps
        return ["--preset", "tiny", "--dataset", args.dataset, "--tokenizer", "bytes", "--n-layer", "2",
                "--block-size", "64", "--max-steps", str(s), "--warmup-steps", str(max(1, min(20, s // 5))),
                "--eval-every", str(max(1, s // 10)), "--eval-batches", "8", "--log-every", str(max(1, s // 20))]
    if args.rung == "short":
        return ["--dataset", args.dataset, "--max-steps", str(args.steps), "--eval-every", str(max(1, args.steps // 10))]
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


def wandb_tags(args, seed_index):
    """The ladder, rung, seed index and the pass-through options ("ra-R=12", "compile"); train.py adds the
    attention name, dataset and preset. The user's own --wandb-tags are kept."""
    tags = ["ladder", f"rung-{args.rung}", f"seed-index-{seed_index}"]
    for flag, value in flag_pairs(args.passthrough):
        name = flag.replace("-", "_")
        if name == "wandb_tags":
            tags += [t for t in (value or "").split(",") if t]
        elif name not in ladder_report.IGNORED_FIELDS:  # bookkeeping (data root, intervals) makes no tag
            tags.append(flag if value is None else f"{flag}={value}")
    return ",".join(t.replace(",", ";")[:64] for t in tags)


def plan_runs(args, ladder_id, out_dir):
    """[(variant, seed_index, seed, run_dir, argv)] in run order: seed by seed, variants in order."""
    runs = []
    for i in range(args.seeds):
        seed = args.seed0 + i
        for v in args.variants:
            name = f"{v}-s{seed}"
            argv = ["--attn", v, "--seed", str(seed), "--run-name", name, "--out-dir", str(out_dir),
                    *rung_args(args)]
            if args.wandb:
                argv += ["--wandb", "--wandb-group", f"ladder-{ladder_id}", "--wandb-tags", wandb_tags(args, i)]
            # with --wandb the user's --wandb-tags are merged into the ladder's (a second one would replace them)
            argv += strip_flag(args.passthrough, ("--wandb-tags", "--wandb_tags")) if args.wandb else args.passthrough
            runs.append((v, i, seed, out_dir / name, argv))
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
    """Make the dataset once before the runs, so no run's timing includes it."""
    from data.loader import load_meta
    from data.prepare import PrepareError, dataset_dir, prepare
    from data.synthetic import make_synthetic, task_of

    task = task_of(tc.dataset)
    if task is not None:
        if tc.tokenizer != "bytes":
            sys.exit(f"error: {tc.dataset} is a bytes dataset; drop --tokenizer {tc.tokenizer}")
        out = make_synthetic(task, tc.data_root)
    else:
        out = dataset_dir(tc.dataset, tc.tokenizer, tc.data_root)
        if not (out / "meta.json").exists():
            print(f"data: preparing {tc.dataset} ({tc.tokenizer}) into {out}")
            try:
                prepare(tc.dataset, tokenizer=tc.tokenizer, out_root=tc.data_root)
            except PrepareError as e:
                sys.exit(f"error: {e}")
    return load_meta(out)


def init_check(plan, resolved, vocab_size):
    """{variant: (identical, shared)}: how many of the weights a variant shares with sdpa (same name and shape)
    start from the same values at the first seed. train.py seeds the global RNG and builds GPT(mc); a variant
    whose constructor draws from that RNG shifts every later draw, and then the seed pairs only the data order."""
    import torch

    from model import GPT

    def initial(mc, seed):
        mc = dataclasses.replace(mc, vocab_size=vocab_size)
        torch.manual_seed(seed)  # as train.py does, before GPT(mc)
        return GPT(mc).state_dict()

    out, base = {}, None
    for (v, i, seed, _, _), (tc, mc) in zip(plan, resolved):
        if i != 0:
            continue
        sd = initial(mc, tc.seed)
        if v == "sdpa":
            base = sd
            continue
        # the randomly initialized ones (LayerNorm weights and biases start constant in every variant)
        shared = [k for k in sd if k in base and sd[k].shape == base[k].shape and base[k].numel() > 1
                  and base[k].float().std() > 0]
        out[v] = (sum(torch.equal(sd[k], base[k]) for k in shared), len(shared))
    return out


def existing_state(run_dir, planned):
    """'fresh', 'reuse' (finished, same config), 'resume' (interrupted, has ckpt.pt) or raise on another config."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return "fresh"
    old = json.loads(cfg_path.read_text())
    skip = ladder_report.IGNORED_FIELDS | {"vocab_size", "run_name", "world_size", "data_dir", "wandb_tags"}
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


class _Tee(io.TextIOBase):
    """train.py's output (in-process) into train.log, echoing its val lines (all lines with --verbose)."""

    def __init__(self, log, verbose):
        self.log, self.verbose, self.buf, self.tail = log, verbose, "", []

    def write(self, text):
        self.log.write(text)
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            _echo(line, self.verbose)
            self.tail = (self.tail + [line])[-30:]
        return len(text)

    def flush(self):
        self.log.flush()


def _echo(line, verbose):
    if verbose or "val loss" in line or line.startswith(("stopping", "time budget")):
        print(f"    {line.rstrip()}", file=sys.__stdout__, flush=True)


def run_inprocess(argv, run_dir, attn, seed, args):
    """train.main(ARGV) in this process: the same code path as `python train.py`, without its start-up."""
    import gc

    import torch

    import train

    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ python train.py {shlex.join(argv)}   (in-process: quick_quality_test.py --launch inprocess)\n")
        tee = _Tee(log, args.verbose)
        try:
            with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
                rc = train.main(argv)
        except Exception:  # noqa: BLE001 - a broken variant is a result to report, not the end of the ladder
            tee.write(traceback.format_exc() + "\n")
            rc = 1
        finally:
            for sig, handler in handlers.items():  # train.main installs its own SIGINT/SIGTERM handlers
                signal.signal(sig, handler)
            tee.flush()
    torch._dynamo.reset()  # a fresh torch.compile cache per run: no cache-limit fallback to eager later on
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return _record(run_dir, attn, seed, argv, rc, t0, tee.tail, None, "inprocess")


def _record(run_dir, attn, seed, argv, rc, t0, tail, forced_status, launch):
    summary = run_dir / "summary.json"
    if forced_status:
        status = forced_status
    else:
        status = json.loads(summary.read_text())["status"] if summary.exists() else f"failed (exit {rc})"
    record = {"attn": attn, "seed": seed, "argv": argv, "launch": launch, "returncode": rc, "status": status,
              "wall_s": round(time.time() - t0, 1), "log": "train.log"}
    if rc != 0:
        record["error_tail"] = tail
    (run_dir / "ladder_run.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def run_subprocess(argv, run_dir, attn, seed, args):
    """One `python train.py ARGV`; its output goes to RUN_DIR/train.log. Writes RUN_DIR/ladder_run.json."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
                _echo(line, args.verbose)
            rc = proc.wait()
        except KeyboardInterrupt:  # pass it on (a terminal's Ctrl-C reaches both): train.py checkpoints and exits
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    forced = f"timed out after {args.run_timeout_min:g} min" if timed_out.is_set() else None
    return _record(run_dir, attn, seed, argv, rc, t0, tail, forced, "subprocess")


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
    ladder_id = args.id or time.strftime("%Y%m%d-%H%M%S") + f"-{args.rung}"
    out_dir = Path(args.out_dir) if args.out_dir else ROOT / "runs" / f"ladder-{ladder_id}"
    out_dir = out_dir.resolve()
    plan = plan_runs(args, ladder_id, out_dir)

    # every run's flags through train.py's own parser first: a typo fails now, not after hours of runs
    resolved = [resolve(argv) for *_, argv in plan]
    tc0, mc0 = resolved[0]
    import torch

    device = tc0.device if tc0.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name(0)})"
    per_run = (f"{args.steps} steps" if args.rung != "full" else
               f"{args.budget_min:g} min" + (f" or {args.steps} steps" if args.steps else ""))
    print(f"ladder {ladder_id}: rung {args.rung}, {len(args.variants)} variants x {args.seeds} seed(s) = "
          f"{len(plan)} runs of {per_run} (dataset {tc0.dataset}, preset {tc0.preset}, {mc0.n_layer}x{mc0.n_embd}, "
          f"block {mc0.block_size}, batch {tc0.batch_size}, device {device})")
    if args.rung == "full":
        print(f"  cost: {len(plan)} runs x {args.budget_min:g} min = {len(plan) * args.budget_min / 60:.1f} h of "
              f"training, plus evals and start-up")
    print(f"  variants: {', '.join(args.variants)}; seeds: {', '.join(str(args.seed0 + i) for i in range(args.seeds))}")
    print(f"  output: {out_dir}")
    if args.dry_run:
        for v, i, seed, run_dir, argv in plan:
            print(f"  python train.py {shlex.join(argv)}")
        return 0

    meta = prepare_data(tc0)
    init = init_check(plan, resolved, meta["vocab_size"])
    differ = {v: f"{a}/{n}" for v, (a, n) in init.items() if a < n}
    init_note = ("init: every variant starts from sdpa's values for the weights it shares with sdpa" if not differ else
                 f"init: {', '.join(f'{v} ({x} random shared tensors equal)' for v, x in differ.items())} start from other "
                 f"values than sdpa for the weights they share (their constructors draw from the seeded RNG before "
                 f"GPT's init): the seed pairs their data order, not their initialization")
    print(f"  {init_note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    for k, ((v, i, seed, run_dir, argv), (tc, mc)) in enumerate(zip(plan, resolved)):
        state = existing_state(run_dir, {**dataclasses.asdict(tc), **dataclasses.asdict(mc)})
        head = f"[{k + 1}/{len(plan)}] {v} seed {seed}"
        if state == "reuse":
            print(f"{head}: reusing the finished run in {run_dir}")
            continue
        if state == "resume":
            print(f"{head}: resuming the interrupted run from {run_dir / 'ckpt.pt'}")
            argv = argv + ["--resume"]
        else:
            for f in ("log.jsonl", "summary.json", "config.json", "ladder_run.json", "train.log"):
                (run_dir / f).unlink(missing_ok=True)  # a fresh start: train.py appends to log.jsonl
            print(f"{head}: python train.py {shlex.join(argv)}" + ("  (in-process)" if args.launch == "inprocess"
                                                                     else ""), flush=True)
        launch = run_inprocess if args.launch == "inprocess" else run_subprocess
        try:
            rec = launch(argv, run_dir, v, seed, args)
        except KeyboardInterrupt:
            rec = {"status": "stopped by signal 2"}
        if rec["status"].startswith("stopped by signal"):
            print(f"{head}: interrupted; it checkpointed. Run the same command again to continue: finished runs "
                  f"are reused, this one resumes", flush=True)
            return 130
        run = ladder_report.load_run(run_dir)
        print(f"{head}: {rec['status']} in {rec['wall_s']:.1f} s, val {ladder_report._f(run['final_val'])}, "
              f"{ladder_report._f(run['ms_per_step'], 1)} ms/step", flush=True)
        if rec["returncode"] != 0:
            print("    " + "\n    ".join(rec.get("error_tail", [])[-12:]))
        if args.drop_ckpt and rec["status"] in ladder_report.OK_STATUSES:
            (run_dir / "ckpt.pt").unlink(missing_ok=True)

    runs = [ladder_report.load_run(run_dir) for *_, run_dir, _ in plan]
    report_meta = {
        "command": "python quick_quality_test.py " + shlex.join(sys.argv[1:] if cli_argv is None else cli_argv),
        "ladder_id": ladder_id, "rung": args.rung, "dataset": tc0.dataset, "device": device,
        "torch": torch.__version__, "python": platform.python_version(), "git": git_describe(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.time() - t_start, 1),
        "variants": args.variants, "seeds": [args.seed0 + i for i in range(args.seeds)],
        "train_args": args.passthrough, "reference_loss": meta.get("reference_loss"),
        "init_identical_to_sdpa": {v: {"equal": a, "shared": n} for v, (a, n) in init.items()},
        "notes": [f"timings are from this device ({device}); compare ms/step only within one device", init_note]
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
