"""
Speed of every registered attention variant against the sdpa baseline, measured in one run.

    python bench.py                          # attn + step at the default shapes (a GPU; CPU: smoke run)
    python bench.py --what attn --variants sdpa,ra_same_flop --out runs/bench.json
    python bench.py --what step --compile    # eager and torch.compile rows
    python bench.py --sweep R --sweep heads  # only those sweeps
    python bench.py --what all --out runs/bench.json   # attn, step and the sweeps R, T, heads, exact
    python bench.py --sweep exact            # exact RA against plain SDPA at T 1024..4096, D 64 and 128
    python bench.py --what step --compile --cuda-graph --no-eager --interleave 3 --profile 3 --clocks
                                             # + where the GPU time goes, and each variant's SM clock and power
    python bench.py --device cpu --what all  # SMOKE RUN: tiny shapes, wall clock, not results

Sections (each a markdown table on stdout; all rows also in --out JSON):
  attn   per variant, the attention module alone (QKV projection + attention + output
         projection, built from GPTConfig(n_head=H, n_embd=H*D), x: [B, T, C]) and the bare
         attention function where one exists (q, k, v: [B, H, T, D]), forward and forward+backward
         (fwd runs with autograd on, as in training; fwd+bwd adds torch.autograd.grad w.r.t.
         the input and the parameters, so nothing accumulates between calls).
  step   the full GPT: forward + backward + grad clip 1.0 + AdamW (fused on CUDA) step, bf16
         autocast, on random token batches; eager, and torch.compile(model) with --compile.
  sweep  R: ra_same_flop and the roadmap's unfused form at ra_R in 4, 8, 12, 16;
         T: every variant at T, 2T, 4T; heads: head_selective variants with 0/25/50/100% RA heads;
         exact: at T, 2T, 4T and head dims D, 2D, the functions sdpa (the baseline of that
         T and D), `exact bound` (SDPA on pre-built q' = [q, k], k' = [a k, b q] of head dim 2D and v:
         the floor of any exact-RA path handing SDPA folded operands), reciprocal_attention (the
         plain fold, from q, k, v), ctr_attention (the Triton kernel; GPU only), and the span rows
         from the projection's outputs to the attention's output: `sdpa span` (q, k, v views of one
         (B, T, 3, H, D) output) and `exact span (dense)` (ra_exact's default operands: q' and v
         from the projection, k' built inside); their ms ratio is exact RA's span cost.
         Sweeps time the attention module and function (as the attn section does); exact: functions only.

The arithmetic:
  attention FLOPs, forward   = 4 * B * H * T * T * D / 2 * attn_flop_mult   (QK^T and PV, causal half)
  attention FLOPs, backward  = 2.5 * forward                                 (flash convention)
  module FLOPs add 2 * B * T * N_linear forward and twice that backward, N_linear = the module's
  nn.Linear weights (the 6N rule of model.flops_per_token). attn_flop_mult is the module's
  attribute (default 1.0; exact RA is 1.5: its QK^T is done twice).
  step: tokens/s = B * T / (s per step); MFU = model.flops_per_token(T) * tokens/s / peak bf16.
  ratio ("x sdpa") = ms of the row / ms of sdpa in the same section, pass and setting (>1: slower).
  time = median over --reps calls after --warmup calls, each call on the next of --n-inputs input
  sets (so the L2 cache does not flatter), timed with CUDA events (wall clock on CPU). On a GPU the
  attention rows replay each call as a CUDA graph (one per input set; --no-graphs: eager calls), so
  they time the kernels rather than Python's kernel launches; the step rows time eager or compiled
  calls as train.py makes them.
  memory = attn: peak allocated above what the inputs and module hold; step: peak allocated.

Variants come from attention.names() (new names are picked up without editing this file) plus
`roadmap_unfused` (benchmarks/variants.py). One that cannot be built or run is reported in its row.
The heads sweep runs every registered variant that declares `head_selective` and sets its RA heads
with `set_heads_mask(mask)` (mask: bool [H], True = RA head; the contract in attention/__init__.py).
"""

import argparse
import dataclasses
import itertools
import shutil
import sys
import time

import torch

from benchmarks.profile import kernel_category  # noqa: F401  (tests)
from benchmarks.report import meta, profile_table, section_table, summary
from benchmarks.runner import Bench
from benchmarks.sections import SWEEPS, section_attn, section_step
from benchmarks.timing import cycle, time_ms  # noqa: F401  (time_ms: tools/step_overhead.py)
from benchmarks.variants import build_model, roadmap_unfused_attention, variant_names  # noqa: F401  (tests, tools)
from model import GPTConfig
from trainer.step import TrainStep, launcher, mark

# ----------------------------------------------------------------------------
# the training step (train.py's, for the step rows and tools/step_overhead.py)

def make_train_step(model, cfg, B, T, compiled, autocast, n_inputs, compile_options=None, graphed=False,
                    graph_pool=None):
    """train.py's training step (trainer/step.py) for `model` (on its device), without grad accumulation,
    lr schedule and data loading: fused AdamW, forward for the loss only, the modules' aux_loss, grad clip
    1.0, the grad scaler when autocast is fp16, over n_inputs random batches (drawn on the CPU, see
    randn()). autocast: a function returning the autocast context. train_step(marks=None) appends
    time.perf_counter() after each phase (forward, backward, clip, optimizer) to marks if given
    (tools/step_overhead.py). graphed: as train.py --cuda-graph (3 warm-up calls, then the step recorded
    in graph_pool, if given, and replayed), each call copying its batch into the step's input buffer first."""
    dev = next(model.parameters()).device
    opt = model.configure_optimizer(weight_decay=0.1, lr=6e-4, betas=(0.9, 0.95), device_type=dev.type,
                                    capturable=graphed)
    fwd = torch.compile(model, options=compile_options) if compiled else model
    aux_loss = torch.compile(model.aux_loss, options=compile_options) if compiled else model.aux_loss  # as train.py
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, B, T), generator=gen).to(dev) for _ in range(n_inputs)]
    nxt, it = cycle(batches), itertools.count()
    xy = torch.empty_like(batches[0])  # the batch the step reads (a graph reads fixed tensors)
    ctx = autocast()
    scaler = torch.amp.GradScaler(enabled=isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.float16)
    step = TrainStep(fwd, model, opt, scaler, ctx, aux_loss, [xy[0]], [xy[1]], grad_clip=1.0)
    launch = launcher(step, opt, graphed=graphed, pool=graph_pool)

    def train_step(marks=None):
        xy.copy_(nxt())
        mark(marks)
        model.set_step(next(it))
        launch(marks)
        mark(marks)

    return train_step


# ----------------------------------------------------------------------------

GPU_DEFAULTS = dict(B=8, H=12, T=1024, D=64, batch=16, step_T=1024, n_layer=12, n_head=12, n_embd=768,
                    vocab_size=50257, warmup=10, reps=50, step_warmup=5, step_reps=20, n_inputs=4, dtype="bf16")
CPU_DEFAULTS = dict(B=2, H=4, T=64, D=32, batch=2, step_T=64, n_layer=2, n_head=2, n_embd=64,
                    vocab_size=1024, warmup=1, reps=3, step_warmup=1, step_reps=3, n_inputs=2, dtype="fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", help="comma list of attn, step, all (default: attn,step; none if --sweep is given)")
    p.add_argument("--sweep", action="append", default=[], help="R, T, heads or exact (repeat or comma list)")
    p.add_argument("--variants", help="comma list of variants (sdpa is always measured as the baseline)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: smoke run with tiny defaults)")
    p.add_argument("--dtype", choices=DTYPES, help="autocast dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="step: also time torch.compile(model)")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="step: build all variants, then time them in N alternating rounds; reports the median "
                        "of the per-round ratios to sdpa and their range")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="step: also run N steps under torch.profiler and print where the GPU time goes")
    p.add_argument("--clocks", action="store_true",
                   help="step, with --interleave: sample the GPU's SM clock and power (nvidia-smi) during each "
                        "variant's timed rounds and its --profile steps")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="step: only the compiled rows (with --compile)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="step: replay each training step as one CUDA graph, as train.py --cuda-graph (GPU only)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="attn/sweeps: time eager calls with CUDA events instead of CUDA-graph replays")
    p.add_argument("--out", help="write the JSON here (rewritten after every section)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: table by device name)")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE", help="GPTConfig override, e.g. ra_R=12")
    p.add_argument("--ra-heads", type=int, metavar="K",
                   help="step: in the head-selective variants, the first K heads of every layer are RA heads "
                        "(set_heads_mask), the others plain (default: the variant's own init)")
    for k in GPU_DEFAULTS:
        if k != "dtype":
            p.add_argument("--" + k.replace("_", "-"), dest=k, type=int,
                           help=f"default {GPU_DEFAULTS[k]} (GPU), {CPU_DEFAULTS[k]} (CPU)")
    args = p.parse_args(argv)
    args.argv = list(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device not in ("cuda", "cpu") or (args.device == "cuda" and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: use cuda (available: {torch.cuda.is_available()}) or cpu")
    for k, v in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    sweeps = [s for item in args.sweep for s in item.split(",") if s]
    what = [w for w in (args.what or ("" if sweeps else "attn,step")).split(",") if w]
    if "all" in what:
        what, sweeps = ["attn", "step"], list(SWEEPS)
    for w in what:
        if w not in ("attn", "step"):
            p.error(f"--what {w!r}: use attn, step or all (comma list)")
    for s in sweeps:
        if s not in SWEEPS:
            p.error(f"--sweep {s!r}: use one of {', '.join(SWEEPS)}")
    args.what, args.sweep = what, list(dict.fromkeys(sweeps))

    valid = variant_names()
    if args.variants:
        chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in chosen if v not in valid]
        if bad:
            p.error(f"unknown variant(s) {', '.join(bad)}; valid: {', '.join(valid)}")
        args.names = ["sdpa"] + [v for v in valid if v in chosen and v != "sdpa"]
    else:
        args.names = valid

    if args.clocks:
        if args.device != "cuda":
            p.error("--clocks samples a GPU's clock (nvidia-smi): it needs --device cuda")
        if not args.interleave:
            p.error("--clocks samples the timed rounds of --interleave N: add --interleave (e.g. 3)")
        if shutil.which("nvidia-smi") is None:
            print("[bench] --clocks: nvidia-smi is not on the PATH; no clocks are recorded", file=sys.stderr)

    fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    overrides = {}
    for kv in args.cfg:
        key, _, val = kv.partition("=")
        if key not in fields or not _:
            p.error(f"--cfg {kv!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        typ = type(fields[key].default)
        overrides[key] = val.lower() in ("1", "true", "yes") if typ is bool else typ(val)
    args.overrides = overrides
    n_head = overrides.get("n_head", args.n_head)
    if args.ra_heads is not None and not 0 <= args.ra_heads <= n_head:
        p.error(f"--ra-heads {args.ra_heads}: use 0..{n_head} (the heads per layer)")
    if args.peak_flops is None and args.device == "cuda":
        try:
            from trainer.common import peak_flops  # a table of dense bf16 peaks by device name
            args.peak_flops = peak_flops(torch.device("cuda"))
        except Exception as e:
            print(f"[bench] no peak FLOP/s for MFU (trainer.common.peak_flops: {e}); pass --peak-flops", file=sys.stderr)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    smoke = device.type == "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    info = meta(args, device)
    bench = Bench(args, device, dtype, info, make_train_step)
    banner = "SMOKE RUN (CPU): not results -- tiny shapes, wall clock" if smoke else ""
    print(f"# bench.py {' '.join(info['argv'])}\n{banner}\ndevice {info['device_name']}, torch {info['torch']}, "
          f"triton {info['triton']}, CUDA {info['cuda']}, {info['date']}, commit {info['git_commit']}, "
          f"autocast {args.dtype}, peak {args.peak_flops}\nvariants: {', '.join(args.names)}\n")

    attn_cfg = GPTConfig(n_head=args.H, n_embd=args.H * args.D, block_size=args.T, **args.overrides)
    step_cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, vocab_size=args.vocab_size,
                         block_size=args.step_T, **args.overrides)
    plan = [("attn", f"attention only: B={args.B} H={args.H} T={args.T} D={args.D}", section_attn, attn_cfg, args.B, args.T),
            ("step", f"training step: batch {args.batch} x {args.step_T}, {args.n_layer} layers, {args.n_head} heads, "
                     f"n_embd {args.n_embd}, vocab {args.vocab_size}", section_step, step_cfg, args.batch, args.step_T)]
    plan = [s for s in plan if s[0] in args.what]
    plan += [(f"sweep_{s}", f"sweep {s}: attention only, B={args.B} H={args.H} T={args.T} D={args.D}",
              SWEEPS[s], attn_cfg, args.B, args.T) for s in args.sweep]

    for section, title, run, cfg, B, T in plan:
        t0 = time.perf_counter()
        run(bench, args.names, cfg, B, T)
        bench.add_ratios()
        print(f"## {title} ({time.perf_counter() - t0:.0f} s)\n")
        print(section_table([r for r in bench.rows if r["section"] == section]) + "\n", flush=True)
        if section == "step" and args.profile and device.type == "cuda":
            print(f"## where the step time goes: GPU kernel time per step from torch.profiler ({args.profile} steps)\n")
            print(profile_table([r for r in bench.rows if r["section"] == section]) + "\n", flush=True)

    print(f"## summary: time / sdpa time (lower is faster) -- {info['device_name']}, {info['date']}"
          + (f"\n{banner}" if smoke else "") + "\n")
    print(summary(bench))
    if args.out:
        print(f"\nwrote {args.out}")
    if bench.dead:
        print(f"\n{bench.dead}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
