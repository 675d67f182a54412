"""
Is a variant's training step slower because of GPU work or because of the host?

    python tools/step_overhead.py --variants sdpa,ra_same_flop                 # host time per phase
    python tools/step_overhead.py --variants sdpa,ra_same_flop --options default,combo --rounds 5
    python tools/step_overhead.py --variants sdpa,ra_same_flop --options default,graph   # + CUDA-graph steps

For every (variant, inductor options) pair it builds bench.py's compiled GPT-2 124M training step
(batch 16 x 1024, bf16 autocast, fused AdamW, grad clip), then prints
  * step ms: CUDA events around free-running steps, in --rounds alternating rounds; the paired
    ratio of each row is to the first variant with the same options, round by round (as bench.py
    --interleave), and "x first" to the very first row;
  * host ms per phase (forward call, backward call, grad clip, optimizer): perf_counter around
    each phase of one step while the GPU is held busy by a sleep kernel, so no launch waits on
    the GPU. Host time close to the step time means the GPU will wait on the host somewhere.
Options: default, combo (inductor combo_kernels: independent small kernels fused horizontally),
cpp (cpp_wrapper: a C++ launcher instead of Python; failed to compile this model with torch 2.11),
graph (the default step replayed as one CUDA graph, train.py --cuda-graph: no host launches, so its
step time is the GPU's; launched minus graph = the time the GPU waited on the host).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import make_train_step  # noqa: E402  (train.py's step on random batches)
from benchmarks.timing import time_ms  # noqa: E402
from benchmarks.variants import build_model  # noqa: E402
from model import GPTConfig  # noqa: E402

OPTIONS = {"default": None, "combo": {"combo_kernels": True}, "cpp": {"cpp_wrapper": True}, "graph": None}
PHASES = ("fwd", "bwd", "clip", "opt")


def make_step(name, cfg, B, T, options, dev, pool):
    """bench.py's training step for one variant, and the host ms of each of its phases (lists)."""
    model = build_model(name, cfg).to(dev).train()
    graphed = options == "graph"
    train_step = make_train_step(model, cfg, B, T, True, lambda: torch.autocast(dev.type, torch.bfloat16), 4,
                                 OPTIONS[options], graphed=graphed, graph_pool=pool)
    host = {p: [] for p in PHASES}

    def step(record=False):
        marks = [] if (record and not graphed) else None  # a replay has no host phases
        train_step(marks)
        if marks is not None:
            for p, t0, t1 in zip(PHASES, marks, marks[1:]):
                host[p].append((t1 - t0) * 1e3)

    return step, host


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="sdpa,ra_same_flop")
    p.add_argument("--options", default="default", help=f"comma list of {', '.join(OPTIONS)}")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=12, help="timed steps per round")
    p.add_argument("--batch", type=int, default=16)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/step_overhead.py needs a CUDA GPU (it times GPU steps and host launch cost)")
    for o in a.options.split(","):
        if o not in OPTIONS:
            sys.exit(f"unknown --options entry {o!r}; use {', '.join(OPTIONS)}")
    torch.backends.cuda.matmul.allow_tf32 = True
    dev, T = torch.device("cuda"), 1024
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=T)
    torch._dynamo.config.cache_size_limit = 64  # every model stays compiled at once
    pool = torch.cuda.graph_pool_handle()  # one memory pool for every graphed step (replayed one at a time)
    built = []
    for o in a.options.split(","):
        for name in a.variants.split(","):
            t0 = time.time()
            step, host = make_step(name, cfg, a.batch, T, o, dev, pool)
            for _ in range(4):  # compile, autotune, allocator warm-up (and the capture, for graph)
                step()
            torch.cuda.synchronize()
            for _ in range(7):  # host phases: the GPU sleeps ~0.5 s ahead of the host
                torch.cuda._sleep(int(1e9))
                step(record=True)
                torch.cuda.synchronize()
            print(f"built {name}/{o} in {time.time() - t0:.0f} s", flush=True)
            built.append((f"{name}/{o}", o, step, host, []))
    for r in range(a.rounds):  # rotated order, so drifts of the machine hit every pair alike
        k = r % len(built)
        for _, _, step, _, ms in built[k:] + built[:k]:
            ms.append(time_ms(step, 2, a.steps, dev))
    first = built[0][4]
    ref = {}  # options -> the round times of the first variant built with them
    for _, o, _, _, ms in built:
        ref.setdefault(o, ms)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {a.batch} x {T}, "
          f"{a.rounds} rounds x {a.steps} steps\n")
    print("| variant/options | step ms | x first variant, same options (paired) [range] | x first row | host ms | "
          + " | ".join(PHASES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(PHASES))
    for label, o, _, host, ms in built:
        paired = [m / b for m, b in zip(ms, ref[o])]
        h = {p: statistics.median(v) if v else float("nan") for p, v in host.items()}  # graph: no host phases
        print(f"| {label} | {statistics.median(ms):.2f} | {statistics.median(paired):.3f} [{min(paired):.3f}, "
              f"{max(paired):.3f}] | {statistics.median(m / b for m, b in zip(ms, first)):.3f} | "
              f"{sum(h.values()):.2f} | " + " | ".join(f"{h[p]:.2f}" for p in PHASES) + " |")


if __name__ == "__main__":
    main()
