"""
Where does DDP lose time against one GPU? Times train.py's training step (TrainStep) on random batches
under several ways of combining torch.compile and DDP, in one torchrun:

    torchrun --standalone --nproc_per_node=2 tools/ddp_overlap.py                    # GPT-2 124M, 16 x 1024
    torchrun --standalone --nproc_per_node=2 tools/ddp_overlap.py --attn ra_same_flop --steps 30
    torchrun --standalone --nproc_per_node=2 tools/ddp_overlap.py --preset tiny --device cpu \\
        --compile-backend eager --steps 3 --warmup 1                                 # a CPU smoke run (gloo)

Configurations (--configs, comma list):
  single        rank 0 alone, the compiled model without DDP (the others wait): the one-GPU reference
  inside        torch.compile(model), then DDP around it: train.py today. The compiled backward hands DDP
                every gradient at once when it returns, so the all-reduce cannot overlap it
  outside       DDP(model), then torch.compile of the DDP module: dynamo's DDPOptimizer splits the graph
                at DDP's bucket boundaries, so each bucket's all-reduce can start while the backward of
                the earlier layers still runs
  X:view        X with gradient_as_bucket_view=True (the gradients live in DDP's buckets: no copy)
  X:bMB         X with bucket_cap_mb=MB (DDP's default 25)
e.g. --configs single,inside,outside,outside:view,outside:b100.

Per configuration: --warmup steps (compilation), then --steps timed steps (CUDA events, or perf_counter on
the CPU); rank 0 prints the median ms/step over steps (the slowest rank's), the global tokens/s, the
fraction of linear scaling against `single` (world x its tokens/s), and the mean loss of the timed steps:
every configuration starts from the same weights and draws the same batches, so on the CPU in fp32 the
DDP rows' losses agree to rounding (tests/test_ddp_overlap.py), on a GPU within bf16 noise.
A diagnostic, not a benchmark of record: measured numbers go to docs/bench.md with the command.
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT  # noqa: E402
from trainer.common import init_device  # noqa: E402
from trainer.config import parse_args  # noqa: E402
from trainer.step import TrainStep  # noqa: E402


def parse_config(spec):
    """'outside:view:b100' -> ('outside', {'gradient_as_bucket_view': True, 'bucket_cap_mb': 100})."""
    order, *opts = spec.strip().split(":")
    if order not in ("single", "inside", "outside"):
        raise SystemExit(f"--configs: {spec!r}: starts with single, inside or outside")
    kw = {}
    for o in opts:
        if o == "view":
            kw["gradient_as_bucket_view"] = True
        elif o.startswith("b") and o[1:].isdigit():
            kw["bucket_cap_mb"] = int(o[1:])
        else:
            raise SystemExit(f"--configs: {spec!r}: option {o!r} is neither view nor bMB (e.g. b100)")
    if order == "single" and kw:
        raise SystemExit(f"--configs: {spec!r}: single has no DDP options")
    return order, kw


def build(order, ddp_kw, mc, tc, device, backend, autocast, xbs, ybs):
    """A fresh model from the same seed, its optimizer and TrainStep, wrapped as `order` says."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    torch.manual_seed(tc.seed)
    raw = GPT(mc).to(device)
    opt = raw.configure_optimizer(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type)
    ids = [device.index] if device.type == "cuda" else None
    if order == "single":
        model = torch.compile(raw, backend=backend)
    elif order == "inside":
        model = DDP(torch.compile(raw, backend=backend), device_ids=ids, **ddp_kw)
    else:
        model = torch.compile(DDP(raw, device_ids=ids, **ddp_kw), backend=backend)
    scaler = torch.amp.GradScaler(enabled=False)
    return TrainStep(model, raw, opt, scaler, autocast, raw.aux_loss, xbs, ybs, tc.grad_clip, ddp=order != "single")


def time_steps(step, n, device):
    """ms of each of n steps."""
    out = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        step.optimizer.zero_grad(set_to_none=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="single,inside,outside,outside:view")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")

    train_argv = ["--preset", args.preset, "--attn", args.attn, "--device", args.device]
    if args.batch_size:
        train_argv += ["--batch-size", str(args.batch_size)]
    tc, mc, _, _ = parse_args(train_argv)
    ddp, rank, world, device = init_device(tc.device)
    if not ddp and any(o != "single" for o, _ in configs):
        print("one process: only `single` runs; the DDP rows need torchrun --nproc_per_node=N (N >= 2)")
        configs = [c for c in configs if c[0] == "single"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # the batches of rank r: the same in every configuration, different across ranks
    g = torch.Generator().manual_seed(1234 + rank)
    B, T = tc.batch_size, mc.block_size
    xbs = [torch.randint(0, mc.vocab_size, (B, T), generator=g).to(device)]
    ybs = [torch.randint(0, mc.vocab_size, (B, T), generator=g).to(device)]

    rows = []
    for order, kw in configs:
        label = order + "".join(f" {k}={v}" for k, v in kw.items())
        ms, loss = float("nan"), float("nan")
        if order == "single" and rank != 0:
            pass  # rank 0 alone; the others wait at the barrier below
        else:
            step = build(order, kw, mc, tc, device, args.compile_backend, autocast, xbs, ybs)
            time_steps(step, args.warmup, device)
            step.loss_sum.zero_()
            ms = statistics.median(time_steps(step, args.steps, device))
            loss = step.loss_sum.item() / args.steps
        if ddp:
            worst = torch.tensor([ms if order != "single" else 0.0], device=device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            if order != "single":
                ms = worst.item()
            dist.barrier()
        rows.append((order, label, ms, loss))

    if rank == 0:
        tokens = B * T  # per rank and step
        single = next((ms for o, _, ms, _ in rows if o == "single"), None)
        print(f"device {device} x {world}, torch {torch.__version__}, {args.preset} attn={args.attn}, "
              f"{B} x {T} tokens per rank and step, compile backend {args.compile_backend}")
        print("| config | ms/step | tokens/s | of linear | mean loss |")
        print("|---|---|---|---|---|")
        for order, label, ms, loss in rows:
            n = 1 if order == "single" else world
            tps = n * tokens / (ms / 1e3)
            lin = f"{single / ms:.3f}" if single else "-"  # = tokens/s / (world x single's per GPU)
            print(f"| {label} | {ms:.2f} | {tps:,.0f} | {lin} | {loss:.6f} |")
    if ddp:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
