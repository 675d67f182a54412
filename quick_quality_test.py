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
non-determinism. The paired spread pooled over the undecided variants gives the MDE 3, 5 and 8 seeds
would reach. To decide an undecided comparison, re-run with more --seeds and the same --out-dir:
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
gates over training). compare.py rebuilds the report from run folders.
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
import platform
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

import attention
from ladder import plan as ladder_plan
from ladder import variants as attn_info
from ladder import workers
from ladder.init_check import init_check, init_note
from ladder.report import render_tables, write_report
from ladder.results import MARGIN
from ladder.runs import load_run, run_passes
from ladder.state import check_state, corpus_identity, existing_state, ladder_flags, prepare_data, prepared_meta
from trainer.gitinfo import git_describe

ROOT = Path(__file__).resolve().parent
RUNGS = ("sanity", "short", "full")
OWNED = {"--attn": "--variants", "--seed": "--seeds / --seed0", "--run-name": "(fixed: <variant>-s<seed>)",
         "--run_name": "(fixed)", "--out-dir": "--out-dir of this script", "--out_dir": "--out-dir",
         "--max-steps": "--steps", "--max_steps": "--steps", "--max-time-min": "--budget-min",
         "--max_time_min": "--budget-min", "--resume": "(automatic for interrupted runs)",
         "--overwrite": "(the ladder starts unfinished runs over itself)",
         "--wandb-group": "(ladder-<id>)", "--wandb_group": "(ladder-<id>)"}


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
    p.add_argument("--margin", type=float, default=MARGIN,
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
    args.on_gpu = ladder_plan.on_gpu(args.passthrough)
    if args.dataset is None:
        args.dataset = ("synthetic-recall" if args.rung == "sanity" else
                        "prose" if args.rung == "short" and args.on_gpu else "shakespeare")
    try:
        args.variants = ladder_plan.select_variants(args.variants)
        args.specs = ladder_plan.variant_specs(args.variants, args.sweep)
    except ValueError as e:
        p.error(str(e))
    return args


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


def main(cli_argv=None):
    args = parse_args(cli_argv)
    ladder_plan.check_gpus(args)
    ladder_id = args.id or time.strftime("%Y%m%d-%H%M%S") + f"-{args.rung}"
    out_dir = (Path(args.out_dir) if args.out_dir else ROOT / "runs" / f"ladder-{ladder_id}").resolve()

    # every run's flags through train.py's own parser first: a typo fails now, not after hours of runs
    plan = ladder_plan.plan_runs(args, ladder_id, out_dir)
    resolved = [ladder_plan.resolve(r["argv"]) for r in plan]
    tc0, mc0 = resolved[0]
    meta = prepared_meta(tc0) if args.dry_run else prepare_data(tc0)[0]
    if meta is None:  # a dry run prepares nothing: the plan below is without the corpus's numbers
        print(f"dry run: {tc0.dataset} is not prepared yet; its token counts decide the short rung's steps, and "
              f"the ladder folder's corpus check waits for it")
        return print_plan(args, plan, None, out_dir)
    one_pass_rung = args.rung == "short" and args.on_gpu and args.steps is None
    if one_pass_rung:  # now that the corpus is known: its one pass and its whole val split
        steps, eval_batches = ladder_plan.one_pass(meta, tc0, mc0)
        plan = ladder_plan.plan_runs(args, ladder_id, out_dir, steps, eval_batches)
        resolved = [ladder_plan.resolve(r["argv"]) for r in plan]
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
        rc = workers.run_sequential(todo, args)
    if rc == 130:
        print("interrupted: the running runs checkpointed. Run the same command again to continue: finished runs "
              "are reused, interrupted ones resume", flush=True)
        return 130
    note = init_note(init)
    print(f"  {note}")

    runs = [load_run(Path(r["run_dir"])) for r in plan]
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
    results, md = write_report(runs, out_dir, order=attention.names(), meta=report_meta,
                               title=f"Quality ladder {ladder_id} ({args.rung})", time_axis=args.time_axis,
                               margin=args.margin)
    print()
    print(render_tables(results))
    print(f"wrote {out_dir / 'results.md'}, results.json" +
          (f" and {', '.join(results['meta']['plots'])}" if results["meta"].get("plots") else ""))
    failed = [r["name"] for r in runs if not r["ok"]]
    if args.rung == "sanity":
        failed = [r["name"] for r in runs if not run_passes(r)]
        print(f"sanity: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)} "
              f"({len(runs) - len(failed)}/{len(runs)} runs pass every check)")
    elif failed:
        print(f"runs that did not finish: {', '.join(failed)} (see their train.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
