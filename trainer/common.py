"""
Helpers shared by train.py, bench.py and the tools: the device (and the process group under torchrun),
peak FLOP/s for MFU, the learning-rate schedule, RNG state for exact resumes, stopping on a signal.
"""

import math
import os
import random
import signal

import numpy as np
import torch


def init_device(device="auto"):
    """(ddp, rank, world, device). Under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK) this joins the
    process group: NCCL on a GPU per rank, gloo on CPU. device: auto, cuda, cuda:N, mps or cpu."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
            # the rank's GPU named, so NCCL does not guess it from the rank (it warns, and can hang)
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
        if device == "auto":
            dev = torch.device("cuda" if torch.cuda.is_available()
                               else "mps" if torch.backends.mps.is_available() else "cpu")
        else:
            dev = torch.device(device)
    return ddp, rank, world, dev


def gather_objects(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (one process: [obj])."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks_(tensors, world):
    """Replace each tensor by its mean over the ranks, in place (one all-reduce; one process: nothing). For
    running sums that every rank adds to: once averaged, later averages still count each rank's part once."""
    if world == 1:
        return
    import torch.distributed as dist

    flat = torch.stack([t.detach().float() for t in tensors])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= world
    for t, m in zip(tensors, flat):
        t.copy_(m)


def replicas_agree(model, world):
    """Whether every rank holds the same weights: a cheap end-of-run check of DDP (sum and sum of squares)."""
    import torch.distributed as dist

    vec = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    checksum = torch.stack([vec.sum(), (vec * vec).sum()])
    sums = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(sums, checksum)
    return all(torch.equal(s, sums[0]) for s in sums)


# dense bf16 peak FLOP/s of the chips we know; MFU is left out on anything else rather than guessed
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
              "L40S": 362e12, "RTX 4090": 165e12}


def peak_flops(device):
    """Dense bf16 peak FLOP/s of a CUDA device from PEAK_FLOPS, None for any other."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():  # first match wins: specific names come first
        if key in name:
            return value
    return None


def lr_at(step, tc):
    """Linear warmup, then cosine decay to min_lr over lr_decay_steps (default max_steps)."""
    decay_steps = tc.lr_decay_steps or tc.max_steps
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if step >= decay_steps:
        return tc.min_lr
    progress = (step - tc.warmup_steps) / max(1, decay_steps - tc.warmup_steps)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stop_on_signals(cleanup):
    """SIGINT/SIGTERM set stop["signal"] instead of killing the process, so the loop can finish its step,
    checkpoint and exit cleanly. cleanup (an ExitStack) restores the previous handlers."""
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        cleanup.callback(signal.signal, sig, signal.getsignal(sig))
        signal.signal(sig, on_signal)
    return stop

