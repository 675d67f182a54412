"""
Helpers shared by train.py, bench.py and the tools: the device (and the process group under torchrun),
peak FLOP/s for MFU, the learning-rate schedule, RNG state for exact resumes, stopping on a signal.
"""

import math
import os
import random
import signal
import sys

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


def exit_process(status):
    """sys.exit(status), except in a torchrun worker: there, after a clean barrier and destroy_process_group,
    a gloo rank can still abort in the interpreter's own teardown ("terminate called without an active
    exception"; about 1 run in 10 under load, not root-caused: docs/ddp.md), when every result is already
    written. So a worker flushes its streams and leaves with os._exit, which skips that teardown."""
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


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


def gpt_params_floor(mc):
    """A floor on a GPT's parameter count from its config alone (building one draws from the RNG): the token
    and position embeddings (the head is tied) and 12 C^2 per layer (attention 4 C^2, MLP 8 C^2); biases,
    norms and the variants' gates are left out."""
    return (mc.vocab_size + mc.block_size) * mc.n_embd + 12 * mc.n_layer * mc.n_embd ** 2


def state_bytes_per_gpu(n_params, world, fsdp, ddp_buckets):
    """A floor on one GPU's training state in bytes: fp32 parameters, gradients and AdamW's two moments, 16
    bytes per parameter (sharded over the ranks under --fsdp), plus DDP's fp32 gradient buckets, 4 bytes per
    parameter (ddp_buckets: DDP without --ddp-bucket-view). Activations come on top of it."""
    return 16 * n_params / (world if fsdp else 1) + (4 * n_params if ddp_buckets else 0)


def memory_shortfall(n_params, free_bytes, world, tc, preset):
    """The error message for a model whose training state alone does not fit one GPU's free memory (None if
    it fits): what it needs, what is free, and what would fit."""
    ddp_buckets = world > 1 and not tc.fsdp and not tc.ddp_bucket_view
    need = state_bytes_per_gpu(n_params, world, tc.fsdp, ddp_buckets)
    if need <= free_bytes:
        return None
    gib = 2 ** 30
    hint = (f"with --fsdp on N GPUs it is {16 * n_params / gib:.1f} GiB / N" if not tc.fsdp
            else "more GPUs divide it further")
    return (f"--preset {preset} (at least {n_params / 1e6:.0f}M parameters) does not fit: its training state alone "
            f"needs {need / gib:.1f} GiB per GPU (fp32 parameters, gradients and AdamW moments, 16 bytes per "
            f"parameter{', sharded over ' + str(world) + ' ranks' if tc.fsdp else ''}"
            f"{', plus 4 for DDP gradient buckets' if ddp_buckets else ''}), and {free_bytes / gib:.1f} GiB are "
            f"free on the GPU; activations come on top. Use a smaller preset, or shard it: {hint} "
            f"(torchrun --nproc_per_node=N train.py --fsdp ...)")


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

