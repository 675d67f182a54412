"""
Where does DDP lose time against one GPU? Times train.py's training step (TrainStep) on random batches
under several ways of combining torch.compile and DDP, in one torchrun:

    torchrun --standalone --nproc_per_node=2 tools/ddp_overlap.py                    # GPT-2 124M, 16 x 1024
    torchrun --standalone --nproc_per_node=2 tools/ddp_overlap.py --attn ra_same_flop --steps 30
    torchrun --standalone --nproc_per_node=2 tools/ddp_overlap.py --preset tiny --device cpu \\
        --compile-backend eager --steps 3 --warmup 1                                 # a CPU smoke run (gloo)

Configurations (--configs, comma list):
  single        rank 0 alone, the compiled model without DDP (the others wait): the one-GPU reference
  single:eager  the same, not compiled (the reference for fsdp, which train.py runs eagerly)
  inside        torch.compile(model), then DDP around it: train.py today. The compiled backward hands DDP
                every gradient at once when it returns, so the all-reduce cannot overlap it
  outside       DDP(model), then torch.compile of the DDP module: dynamo's DDPOptimizer splits the graph
                at DDP's bucket boundaries, so each bucket's all-reduce can start while the backward of
                the earlier layers still runs
  X:view        X with gradient_as_bucket_view=True (the gradients live in DDP's buckets: no copy)
  X:bMB         X with bucket_cap_mb=MB (DDP's default 25)
  X:solo        X with every rank in a DDP group of its own (world size 1): DDP's machinery and the compiled
                graph's cuts at its buckets without any communication, so `of linear` is the share of one GPU's
                speed that they leave; rank 0 trains as `single` does (same loss)
  X:bf16        X with DDP's bf16_compress_hook: gradients all-reduced in bf16, half the bytes (numerics
                change: the sum is rounded to bf16 before the optimizer sees it)
  X:aN          X with N micro-steps per optimizer step (--grad-accum N per rank; under DDP only the last one
                all-reduces): DDP's cost is paid once per N micro-steps, as in a run with a larger batch. A DDP
                row's `of linear` compares it with the one-GPU row of the same kind that trains the same global
                batch (single:a(world x N)) if there is one, else with single at the same N (also single:aN)
  X:graph       X's whole step (the all-reduce included) recorded as one CUDA graph and replayed, as train.py
                --cuda-graph does: no host launches, so no rank waits for the other's host (also single:graph;
                GPU only)
  manual        no DDP: the compiled model, and after the backward ONE all-reduce of all gradients, flattened
                into one buffer (what DDP's cost is beyond the all-reduce itself)
  fsdp          FSDP2 as train.py --fsdp builds it (fully_shard per Block, bf16 parameters, fp32 reduction), eager
  fsdp:compile  the same with each Block's forward compiled before it is sharded (train.py --fsdp --compile)
e.g. --configs single,inside,outside,outside:view,outside:b100,outside:bf16,single:graph,inside:graph;
single:graph:a4,outside:view:b100:graph:a2 (2 GPUs at accumulation 2 against one GPU with the same batch).

Before the configurations, rank 0 prints how long one all-reduce of the model's gradients takes (fp32 and
bf16, all ranks): the communication a DDP step has to hide behind its backward. --profile N: N more steps
of each configuration under torch.profiler; rank 0 prints its top kernels, the NCCL kernels' total and all
other kernels' total (the compute stream's busy time: against `single` it says whether DDP lengthens the compute
or leaves the GPU idle); --profile-out DIR also writes every kernel of each configuration to DIR/<config>.txt.
After the table, each DDP row's fastest and slowest rank (their medians).

--dataset NAME: the steps train on that dataset's windows, new ones before every step as train.py loads them (the
copies inside the timed step), instead of fixed random tokens; token ids with real text's repetitions change the
embedding's backward. The loss column then differs between rows (each row reads on from where the last stopped).

Per configuration: --warmup steps (compilation), then --steps timed steps (CUDA events, or perf_counter on
the CPU); rank 0 prints the median ms/step over steps (the slowest rank's), the global tokens/s, the
fraction of linear scaling against `single` (world x its tokens/s; with aN, the single row with the same global
batch if the list has one), and the mean loss of the timed steps:
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
from trainer import fsdp  # noqa: E402
from trainer.common import exit_process, init_device  # noqa: E402
from trainer.config import parse_args  # noqa: E402
from trainer.step import TrainStep, launcher, load_batches  # noqa: E402


def parse_config(spec):
    """'outside:view:b100' -> ('outside', {'gradient_as_bucket_view': True, 'bucket_cap_mb': 100})."""
    order, *opts = spec.strip().split(":")
    accum = [o for o in opts if o.startswith("a") and o[1:].isdigit()]
    if accum:
        if len(accum) > 1 or int(accum[0][1:]) < 1:
            raise SystemExit(f"--configs: {spec!r}: one aN option with N >= 1 (micro-steps per optimizer step)")
        if order in ("manual", "fsdp"):
            raise SystemExit(f"--configs: {spec!r}: {order} has no aN option (no accumulation in its step here)")
        order, kw = parse_config(":".join([order, *[o for o in opts if o not in accum]]))
        return order, {**kw, "accum": int(accum[0][1:])}
    if order not in ("single", "inside", "outside", "manual", "fsdp"):
        raise SystemExit(f"--configs: {spec!r}: starts with single, inside, outside, manual or fsdp")
    graph = "graph" in opts
    if graph:
        if order == "fsdp":
            raise SystemExit(f"--configs: {spec!r}: fsdp has no graph option (train.py refuses --fsdp --cuda-graph)")
        opts = [o for o in opts if o != "graph"]
        order, kw = parse_config(":".join([order, *opts]))
        if kw.get("eager"):
            raise SystemExit(f"--configs: {spec!r}: a graph is recorded from the compiled step, not the eager one")
        return order, {**kw, "graph": True}
    if order == "single" and opts == ["eager"]:
        return order, {"eager": True}
    if order == "fsdp" and opts == ["compile"]:
        return order, {"compile": True}
    if order in ("fsdp", "manual") and opts:
        raise SystemExit(f"--configs: {spec!r}: {order} has no options" + (" but compile" if order == "fsdp" else ""))
    kw = {}
    for o in opts:
        if o == "bf16":
            kw["bf16"] = True
        elif o == "solo":
            kw["solo"] = True
        elif o == "view":
            kw["gradient_as_bucket_view"] = True
        elif o.startswith("b") and o[1:].isdigit():
            kw["bucket_cap_mb"] = int(o[1:])
        else:
            raise SystemExit(f"--configs: {spec!r}: option {o!r} is not view, bf16, solo, bMB (e.g. b100) or aN (e.g. a2)")
    if order == "single" and kw:
        raise SystemExit(f"--configs: {spec!r}: single has no DDP options (only single:eager)")
    return order, kw


def build(order, ddp_kw, mc, tc, device, backend, autocast, xbs, ybs):
    """A fresh model from the same seed, its optimizer and TrainStep, wrapped as `order` says -> launch(), one
    training step (trainer.step.launcher: the grads reset after it, or the step replayed as a CUDA graph)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch._dynamo.reset()
    torch.manual_seed(tc.seed)
    raw = GPT(mc).to(device)
    kw = dict(ddp_kw)
    eager, bf16, compile_blocks = kw.pop("eager", False), kw.pop("bf16", False), kw.pop("compile", False)
    kw.pop("accum", None)  # TrainStep runs one micro-step per batch in xbs
    if kw.pop("solo", False):  # every rank makes every group (new_group is collective); each takes its own
        kw["process_group"] = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    graph = kw.pop("graph", False)
    if graph and device.type != "cuda":
        raise SystemExit("a :graph config needs a CUDA GPU")
    if order == "fsdp":  # as train.py --fsdp [--compile] builds it; before the optimizer
        fsdp.shard(raw, "bfloat16" if device.type == "cuda" else "float32", compile_blocks=compile_blocks,
                   compile_backend=backend)
    opt = raw.configure_optimizer(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type, capturable=graph)
    if graph:  # as train.py --cuda-graph: the recorded optimizer step reads its lr from a tensor
        for group in opt.param_groups:
            group["lr"] = torch.tensor(tc.lr, device=device)
    # train.py's rule: DDP built on the stream that warms up and records the step
    stream = torch.cuda.Stream(device) if graph else None
    ids = [device.index] if device.type == "cuda" else None
    after_backward = None
    if order == "single":
        model = raw if eager else torch.compile(raw, backend=backend)
    elif order == "manual":
        model = torch.compile(raw, backend=backend)
        after_backward = lambda: flat_allreduce(raw.parameters())  # noqa: E731
    elif order == "fsdp":
        model = raw
    else:
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            ddp = DDP(raw if order == "outside" else torch.compile(raw, backend=backend), device_ids=ids, **kw)
        if bf16:
            ddp.register_comm_hook(None, bf16_allreduce)
        model = torch.compile(ddp, backend=backend) if order == "outside" else ddp
    scaler = torch.amp.GradScaler(enabled=False)
    step = TrainStep(model, raw, opt, scaler, autocast, raw.aux_loss, xbs, ybs, tc.grad_clip,
                     ddp=order in ("inside", "outside"), after_backward=after_backward)
    launch = launcher(step, opt, graphed=graph, stream=stream, warmup=11 if order in ("inside", "outside") else 3)
    launch.step = step
    return launch


def refilled(launch, loader, xbs, ybs):
    """launch, with the loader's next micro-batches copied into xbs, ybs before each step."""
    def run(marks=None):
        load_batches(loader, xbs, ybs)
        launch(marks)
    run.step, run.release = launch.step, launch.release
    return run


def flat_allreduce(params):
    """The mean of every gradient over the ranks with one all-reduce: copied into one flat buffer, reduced,
    copied back (DDP's buckets, as one bucket, without DDP's hooks)."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads]).div_(dist.get_world_size())
    dist.all_reduce(flat)
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def bf16_allreduce(_, bucket):
    """A DDP comm hook: the bucket's mean all-reduced in bf16 (half the bytes of fp32), written back into the
    bucket. torch's bf16_compress_hook does the same on CUDA only; this one also runs on gloo (the CPU test)."""
    buf = bucket.buffer()
    low = buf.div(dist.get_world_size()).to(torch.bfloat16)
    return dist.all_reduce(low, async_op=True).get_future().then(lambda f: buf.copy_(f.value()[0]))


def allreduce_ms(n, dtype, device, reps=10):
    """Median ms of one all-reduce of n elements of dtype over every rank."""
    buf = torch.ones(n, dtype=dtype, device=device)
    dist.all_reduce(buf)  # warm-up: NCCL builds its channels
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def top_kernels(launch, n, device, k=8, out_path=None):
    """Run n steps under torch.profiler -> (lines of the top k kernels (CPU: ops), NCCL kernels' ms per step,
    all other kernels' ms per step (both None on the CPU)). The other kernels' sum is the compute stream's busy
    time: against one GPU's it says whether DDP makes the compute itself longer (lost fusions at its graph
    cuts, its own kernels, kernels slowed while an all-reduce shares the GPU) or leaves the GPU idle."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            launch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    # kernels only: ranges such as nccl:all_reduce or DistributedDataParallel.forward also show up on the GPU
    # timeline (user annotations) and would count their kernels twice
    evs = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0 and not getattr(e, "is_user_annotation", False)
           and (device.type != "cuda" or e.device_type.name == "CUDA")]
    evs.sort(key=lambda e: getattr(e, attr), reverse=True)
    nccl = other = None
    if device.type == "cuda":
        nccl = sum(getattr(e, attr) for e in evs if e.key.startswith("nccl")) / 1e3 / n
        other = sum(getattr(e, attr) for e in evs if not e.key.startswith("nccl")) / 1e3 / n
    lines = [f"{getattr(e, attr) / 1e3 / n:8.2f} ms x{e.count // n:<4d} {e.key[:90]}" for e in evs]
    if out_path:
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")
    return lines[:k], nccl, other


def time_steps(launch, n, device):
    """ms of each of n steps."""
    out = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            launch()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            launch()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="single,inside,outside,outside:view")
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the preset's)")
    p.add_argument("--dataset", default=None, help="train on this dataset's windows (e.g. prose), new ones every "
                   "step as train.py does (the copies timed with the step); default: fixed random tokens")
    p.add_argument("--data-root", default=None, help="with --dataset: train.py's --data-root")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: dynamo only)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile", type=int, default=0, metavar="N", help="N more steps per config under torch.profiler")
    p.add_argument("--profile-out", default=None, metavar="DIR",
                   help="with --profile: rank 0 writes every kernel's ms per step to DIR/<config>.txt")
    args = p.parse_args(argv)
    configs = [parse_config(c) for c in args.configs.split(",") if c.strip()]
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if args.profile_out and args.profile < 1:
        raise SystemExit("--profile-out writes what --profile N records: add --profile 3 (or another N >= 1)")

    train_argv = ["--preset", args.preset, "--attn", args.attn, "--device", args.device]
    if args.batch_size:
        train_argv += ["--batch-size", str(args.batch_size)]
    if args.dataset:
        train_argv += ["--dataset", args.dataset] + (["--data-root", args.data_root] if args.data_root else [])
    tc, mc, _, _ = parse_args(train_argv)
    ddp, rank, world, device = init_device(tc.device)
    n_micro = max(kw.get("accum", 1) for _, kw in configs)  # the most micro-steps a config takes (aN: the first N)
    loader = None
    if args.dataset:  # as train.py opens it: rank 0 prepares, every rank reads its own micro-batches
        from data.loader import load_meta
        from trainer.runs import RunError, ensure_data, open_splits

        try:
            data_dir = ensure_data(tc, print if rank == 0 else (lambda *a, **k: None), rank == 0, ddp)
            mc.vocab_size = load_meta(data_dir)["vocab_size"]
            tc.grad_accum = n_micro
            loader, _ = open_splits(data_dir, tc, mc, rank, world, pin_memory=device.type == "cuda")
        except RunError as e:
            raise SystemExit(f"--dataset {args.dataset}: {e}")
    if not ddp and any(o != "single" for o, _ in configs):
        print("one process: only `single` runs; the DDP and FSDP rows need torchrun --nproc_per_node=N (N >= 2)")
        configs = [c for c in configs if c[0] == "single"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # the batches of rank r: the same in every configuration, different across ranks
    g = torch.Generator().manual_seed(1234 + rank)
    B, T = tc.batch_size, mc.block_size
    xbs = [torch.randint(0, mc.vocab_size, (B, T), generator=g).to(device) for _ in range(n_micro)]
    ybs = [torch.randint(0, mc.vocab_size, (B, T), generator=g).to(device) for _ in range(n_micro)]

    if ddp:
        with device:  # built where it trains (a 1B model's init on the CPU takes long); only its size is needed
            n_grad = sum(p.numel() for p in GPT(mc).parameters())
        ar = {dt: allreduce_ms(n_grad, dt, device) for dt in (torch.float32, torch.bfloat16)}
        if rank == 0:
            for dt, ms in ar.items():
                size = n_grad * torch.tensor([], dtype=dt).element_size()
                print(f"all-reduce of the gradients, {n_grad / 1e6:.1f}M {str(dt)[6:]} ({size / 1e6:.0f} MB) over "
                      f"{world} ranks: {ms:.2f} ms, {size / ms / 1e6:.1f} GB/s algorithm bandwidth")
    rows, profiles, spreads = [], [], []
    for order, kw in configs:
        label = order + "".join(f" {k}={v}" for k, v in kw.items())
        ms, loss = float("nan"), float("nan")
        if order == "single" and rank != 0:
            pass  # rank 0 alone; the others wait at the barrier below
        else:
            accum = kw.get("accum", 1)
            launch = build(order, kw, mc, tc, device, args.compile_backend, autocast, xbs[:accum], ybs[:accum])
            if loader is not None:  # new windows into the step's buffers before each step, as train.py loads them
                launch = refilled(launch, loader, xbs, ybs)  # all of them: the loader counts whole steps
            time_steps(launch, args.warmup + (11 if kw.get("graph") else 0), device)  # (a graph: warm-up, record)
            launch.step.loss_sum.zero_()
            ms = statistics.median(time_steps(launch, args.steps, device))
            loss = launch.step.loss_sum.item() / args.steps
            if args.profile:
                out_path = None
                if args.profile_out and rank == 0:
                    os.makedirs(args.profile_out, exist_ok=True)
                    out_path = os.path.join(args.profile_out, label.replace(" ", "_").replace("=", "-") + ".txt")
                profiles.append((label, *top_kernels(launch, args.profile, device, out_path=out_path)))
            launch.release()  # a graph holding captured collectives would hang destroy_process_group
        if ddp:
            worst = torch.tensor([ms if order != "single" else 0.0], device=device)
            best = worst.clone()
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            dist.all_reduce(best, op=dist.ReduceOp.MIN)
            if order != "single":
                ms = worst.item()
                spreads.append(f"{label}: {best.item():.2f}-{ms:.2f} ms")
            dist.barrier()
        # which one-GPU row a row compares with: single:graph for graphs, single:eager for eager fsdp, else single
        ref = "graph" if kw.get("graph") else "eager" if kw.get("eager", order == "fsdp" and not kw.get("compile")) else ""
        rows.append((order, ref, kw.get("accum", 1), label, ms, loss))

    if rank == 0:
        # the one-GPU reference of each row: compiled single for DDP, manual and fsdp:compile, single:eager for
        # fsdp, single:graph for the graphed rows; of those, the one that trains the same global batch (world x
        # this row's accumulation), else the one at the same accumulation
        single = {(ref, a): B * T * a / (ms / 1e3) for o, ref, a, _, ms, _ in rows if o == "single"}  # tokens/s
        print(f"device {device} x {world}, torch {torch.__version__}, {args.preset} attn={args.attn}, "
              f"{B} x {T} tokens per rank and micro-step (x accum per step), compile backend {args.compile_backend}")
        print("| config | ms/step | tokens/s | of linear | mean loss |")
        print("|---|---|---|---|---|")
        for order, ref, a, label, ms, loss in rows:
            n = 1 if order == "single" else world
            tps = n * B * T * a / (ms / 1e3)
            one = single.get((ref, a)) if order == "single" else single.get((ref, world * a), single.get((ref, a)))
            lin = f"{tps / (n * one):.3f}" if one else "-"  # of world x one GPU's tokens/s
            print(f"| {label} | {ms:.2f} | {tps:,.0f} | {lin} | {loss:.6f} |")
        if spreads:
            print("\nmedian ms/step of the fastest and the slowest rank (the table shows the slowest):")
            print("\n".join(spreads))
        for label, lines, nccl, other in profiles:
            what = (f"NCCL kernels {nccl:.2f} ms, all other kernels {other:.2f} ms per step" if nccl is not None
                    else "CPU ops by self time")
            print(f"\n{label}: top kernels per step (rank 0), {what}")
            print("\n".join(lines))
    if ddp:
        dist.barrier()  # rank 0 has printed before any rank tears down (a gloo rank can abort at exit otherwise)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_process(main())
