"""
Train a GPT-2-style model with a named attention implementation.

    python train.py --attn ra_headsel --max-steps 1000
    torchrun --standalone --nproc_per_node=8 train.py --attn sdpa

Every field of TrainConfig below and of model.GPTConfig is a flag (dashes or
underscores). Values resolve as: dataclass default < preset (config/NAME.json)
< command line. A run writes runs/<run-name>/: config.json, log.jsonl (one JSON
object per logged step) and ckpt.pt (atomic, resumable with --resume).
"""

import argparse
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import attention
import cuda_graph
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    preset: str = "auto"  # a file in config/; auto: gpt2-124m with a GPU, tiny without
    dataset: str = "shakespeare"  # see data/prepare.py: shakespeare, tinystories, fineweb-edu, openwebtext, files:GLOB
    tokenizer: str = "gpt2"  # gpt2 | bytes
    data_root: str = "data"
    out_dir: str = "runs"
    run_name: str = ""  # default: <attn>-<preset>-s<seed>
    seed: int = 1337
    max_steps: int = 1000
    max_time_min: float = 0.0  # stop after this many minutes of training (0: no limit)
    batch_size: int = 16  # sequences per micro-step per process
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    lr_decay_steps: int = 0  # cosine decay length; 0: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 1000  # 0: only at the end and on SIGINT/SIGTERM
    resume: bool = False
    compile: bool = False
    cuda_graph: bool = False  # replay each optimizer step as one CUDA graph (one GPU; see cuda_graph.py)
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | bfloat16 | float16 | float32
    wandb: bool = False
    wandb_project: str = "ra-gpt"
    wandb_group: str = ""
    wandb_tags: str = ""  # comma-separated, added to the automatic ones


# ----------------------------------------------------------------------------- configuration

def _parse_bool(s):
    if isinstance(s, bool):
        return s
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    seen = set()
    for title, cls in (("training", TrainConfig), ("model", GPTConfig)):
        group = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
            help_ = f"default: {f.default}"
            if f.name == "attn":
                help_ += f"; one of {', '.join(attention.names())}"
            if f.type in (bool, "bool"):
                group.add_argument(*flags, dest=f.name, type=_parse_bool, nargs="?", const=True, default=None,
                                   metavar="BOOL", help=help_)
            else:
                typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
                group.add_argument(*flags, dest=f.name, type=typ, default=None, help=help_)
    return p


def load_preset(name):
    path = ROOT / "config" / f"{name}.json"
    if not path.exists():
        have = sorted(x.stem for x in (ROOT / "config").glob("*.json"))
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(have)}")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    valid = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(GPTConfig)}
    bad = sorted(set(values) - valid)
    if bad:
        raise ValueError(f"preset {path} has unknown fields {bad}")
    return values


def resolve_config(argv=None):
    """Parse the command line into (TrainConfig, GPTConfig, notes). Raises SystemExit on bad input."""
    parser = build_parser()
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    notes = []
    preset = args.get("preset", TrainConfig.preset)
    if preset == "auto":
        preset = "gpt2-124m" if torch.cuda.is_available() else "tiny"
        notes.append(f"preset: {preset} ({'GPU found' if preset == 'gpt2-124m' else 'no GPU: the CPU-sized preset'};"
                     f" --preset gpt2-124m or --preset tiny to choose)")
    try:
        values = load_preset(preset)
    except ValueError as e:
        parser.error(str(e))
    values.update(args)
    values["preset"] = preset
    tnames = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in values.items() if k in tnames})
    mc = GPTConfig(**{k: v for k, v in values.items() if k not in tnames})
    try:
        check_config(tc, mc)
    except ValueError as e:
        parser.error(str(e))
    return tc, mc, notes


def check_config(tc, mc):
    """Reject values that cannot work, before any work starts."""
    mc.validate()  # attention name, head divisibility, ...
    attention.get_class(mc.attn)  # import the variant now, so a broken one fails here
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
        if getattr(tc, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(tc, name)} must be positive")
    for name in ("eval_every", "ckpt_every", "warmup_steps", "lr_decay_steps", "max_time_min", "grad_clip"):
        if getattr(tc, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(tc, name)} must be >= 0")
    if not tc.lr > 0 or tc.min_lr < 0 or tc.min_lr > tc.lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0 (got lr={tc.lr}, min_lr={tc.min_lr})")
    if tc.tokenizer not in ("gpt2", "bytes"):
        raise ValueError(f"--tokenizer={tc.tokenizer!r}: use gpt2 or bytes")
    if tc.device not in ("auto", "cuda", "mps", "cpu") and not tc.device.startswith("cuda:"):
        raise ValueError(f"--device={tc.device!r}: use auto, cuda, mps or cpu")
    if tc.dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype={tc.dtype!r}: use auto, bfloat16, float16 or float32")
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda but torch sees no CUDA GPU (use --device cpu)")
    if tc.cuda_graph:
        if tc.device in ("cpu", "mps") or not torch.cuda.is_available():
            raise ValueError("--cuda-graph needs a CUDA GPU (it records the training step's kernels); drop it here")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--cuda-graph runs on one GPU; under torchrun drop it (DDP's gradient all-reduce is not "
                             "captured here)")
        if tc.dtype == "float16":
            raise ValueError("--cuda-graph with --dtype float16: the fp16 grad scaler checks for inf on the host every "
                             "step, which a graph cannot do; use --dtype bfloat16")
    bad = [c for c in tc.run_name if not (c.isalnum() or c in "-_.")]
    if bad:
        raise ValueError(f"--run-name={tc.run_name!r} may use letters, digits, '-', '_' and '.' only")


# ----------------------------------------------------------------------------- helpers

# dense bf16 peak FLOP/s of the chips we know; MFU is left out on anything else rather than guessed
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
              "L40S": 362e12, "RTX 4090": 165e12}


def peak_flops(device):
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


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".pt.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def setup_wandb(tc, mc, run_dir, run_name):
    import wandb  # only when asked for: the GPU machines have no wandb

    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        try:
            logged_in = bool(wandb.api.api_key)
        except Exception:
            logged_in = False
        if not logged_in:
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no API key found, logging offline (sync later with `wandb sync`)")
    ra_opts = {k: v for k, v in asdict(mc).items() if k.startswith("ra_")}
    tags = [mc.attn, tc.dataset, tc.preset] + [t for t in tc.wandb_tags.split(",") if t]
    return wandb.init(project=tc.wandb_project, group=tc.wandb_group or None, name=run_name, dir=str(run_dir),
                      config={**asdict(tc), **asdict(mc), "ra_options": ra_opts}, tags=tags)


# ----------------------------------------------------------------------------- training

def main(argv=None):
    tc, mc, notes = resolve_config(argv)

    # ---- distributed setup: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and tc.device in ("auto", "cuda")
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        if tc.device == "auto":
            device = torch.device("cuda" if torch.cuda.is_available()
                                  else "mps" if torch.backends.mps.is_available() else "cpu")
        else:
            device = torch.device(tc.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    for n in notes:
        log(n)

    # ---- run folder; --resume continues with the saved config, overridden only by the flags given now
    run_name = tc.run_name or f"{mc.attn}-{tc.preset}-s{tc.seed}"
    run_dir = ROOT / tc.out_dir / run_name if not os.path.isabs(tc.out_dir) else Path(tc.out_dir) / run_name
    ckpt_path = run_dir / "ckpt.pt"
    ckpt = None
    if tc.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path} (check --out-dir and --run-name)")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        given = {k for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
        tc = TrainConfig(**{**ckpt["train_config"], **{k: getattr(tc, k) for k in given if hasattr(tc, k)}})
        mc = GPTConfig(**ckpt["model_config"])  # the architecture cannot change on resume
        try:  # the saved values with today's flags: e.g. a --cuda-graph run resumed with --device cpu
            check_config(tc, mc)
        except ValueError as e:
            raise SystemExit(f"--resume: {e} (the saved config is in {run_dir / 'config.json'}; a flag given now "
                             "overrides it)")
        log(f"resuming {run_name} from step {ckpt['step']}")

    # ---- data: prepared on first use (rank 0 prepares, the others wait)
    from data.loader import TokenLoader, load_meta
    from data.prepare import dataset_dir, prepare

    data_dir = dataset_dir(tc.dataset, tc.tokenizer, tc.data_root)
    if master and not (data_dir / "meta.json").exists():
        log(f"data: {data_dir} is missing, preparing it (python data/prepare.py {tc.dataset} --tokenizer {tc.tokenizer})")
        prepare(tc.dataset, tokenizer=tc.tokenizer, out_root=tc.data_root)
    if ddp:
        dist.barrier()
    meta = load_meta(data_dir)
    mc.vocab_size = meta["vocab_size"]
    if master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps({**asdict(tc), **asdict(mc), "run_name": run_name,
                                                         "world_size": world, "data_dir": str(data_dir)}, indent=2))

    # ---- precision
    dtype = tc.dtype if tc.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    ptdtype = getattr(torch, dtype)
    autocast = (torch.autocast(device_type=device.type, dtype=ptdtype) if dtype != "float32" else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler(enabled=(dtype == "float16"))

    # ---- model and optimizer; the same seed on every rank gives the same init
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = GPT(mc).to(device)
    optimizer = model.configure_optimizer(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type,
                                          capturable=tc.cuda_graph)
    # pinned host batches make the copy truly asynchronous; a pageable copy would sync the host every step
    loader = TokenLoader(data_dir, "train", tc.batch_size, mc.block_size, rank=rank, world_size=world, seed=tc.seed,
                         pin_memory=device.type == "cuda")
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"][rank] if rank < len(ckpt["loader"]) else ckpt["loader"][0])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
    if tc.cuda_graph:  # a recorded optimizer step reads its lr from a tensor, refilled before every replay
        for group in optimizer.param_groups:
            group["capturable"] = True  # also when the checkpoint was written without --cuda-graph
            group["lr"] = torch.tensor(tc.lr, device=device)
    raw_model = model
    aux_loss = raw_model.aux_loss
    if tc.compile:
        model = torch.compile(model)
        # the attention regularizers too: eagerly they are a few tiny kernels per layer, forward and
        # backward, each a launch the GPU waits for; compiled, one fused kernel each way
        aux_loss = torch.compile(aux_loss)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * world
    flops_per_step = raw_model.flops_per_token(mc.block_size) * tokens_per_step
    peak = peak_flops(device)
    log(f"model: {raw_model.num_params() / 1e6:.2f}M params, attn={mc.attn}, device={device}, dtype={dtype}, "
        f"world={world}, tokens/step={tokens_per_step}, compile={tc.compile}, cuda_graph={tc.cuda_graph}")

    wb = setup_wandb(tc, mc, run_dir, run_name) if (tc.wandb and master) else None
    log_file = open(run_dir / "log.jsonl", "a") if master else None

    def log_record(rec):
        if master:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if wb is not None:
                wb.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])

    def gather_states(state):
        if not ddp:
            return [state]
        out = [None] * world
        dist.all_gather_object(out, state)
        return out

    def checkpoint(at_step):
        # every rank contributes its loader position and RNG so a resume continues each exactly
        loaders, rngs = gather_states(loader_state), gather_states(rng_state())
        if master:
            save_checkpoint(ckpt_path, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "loader": loaders, "rng": rngs,
                                        "step": at_step, "model_config": asdict(mc), "train_config": asdict(tc)})

    @torch.no_grad()
    def evaluate():
        model.eval()
        total, n = torch.zeros((), device=device), 0
        val = TokenLoader(data_dir, "val", tc.batch_size, mc.block_size, rank=rank, world_size=world, seed=0)
        for x, y in val.val_batches(tc.eval_batches):
            x, y = x.to(device), y.to(device)
            with autocast:
                _, loss = model(x, y, return_logits=False)
            total += loss.float()
            n += 1
        stats = torch.tensor([total.item(), float(n)], device=device)
        if ddp:
            dist.all_reduce(stats)
        model.train()
        return (stats[0] / stats[1]).item() if stats[1] > 0 else float("nan")

    # SIGINT/SIGTERM: finish the current step, checkpoint, exit cleanly
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    # ---- the loop
    model.train()
    train_time = 0.0  # seconds spent in training steps (not eval, not checkpoints)
    interval_time, interval_steps = 0.0, 0
    loss_acc = torch.zeros((), device=device)
    aux_acc = torch.zeros((), device=device)
    grad_norm = torch.zeros((), device=device)
    # one optimizer step's micro-batches, in fixed device buffers (a CUDA graph reads fixed tensors; one
    # tensor per micro-step, as views at different offsets could recompile the compiled model)
    xbs = [torch.empty((tc.batch_size, mc.block_size), dtype=torch.long, device=device) for _ in range(tc.grad_accum)]
    ybs = [torch.empty_like(x) for x in xbs]
    loader_state = None

    def load_next_batches():
        # the checkpoint stores the loader state from BEFORE these batches, so a resume re-draws them
        nonlocal loader_state
        loader_state = loader.state_dict()
        for xb, yb in zip(xbs, ybs):  # ordered after the running step's kernels: the GPU is not waited for
            x, y = loader.next_batch()
            xb.copy_(x, non_blocking=True)
            yb.copy_(y, non_blocking=True)

    def train_step():
        """One optimizer step on xbs, ybs; --cuda-graph records exactly this. No host sync in here."""
        for micro in range(tc.grad_accum):
            sync = (micro == tc.grad_accum - 1)  # DDP all-reduces only on the last micro-step
            with (model.no_sync() if (ddp and not sync) else nullcontext()):
                with autocast:
                    _, loss = model(xbs[micro], ybs[micro], return_logits=False)
                    aux = aux_loss()
                scaler.scale((loss + aux) / tc.grad_accum).backward()
            loss_acc.add_(loss.detach() / tc.grad_accum)
            aux_acc.add_(aux.detach() / tc.grad_accum)
        if tc.grad_clip > 0:
            scaler.unscale_(optimizer)
            grad_norm.copy_(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip))
        scaler.step(optimizer)
        scaler.update()

    def launched_step():
        train_step()
        optimizer.zero_grad(set_to_none=True)

    # --cuda-graph: 3 normal steps (compile, autotune, allocate), then train_step recorded and replayed
    run_step = cuda_graph.graphed(train_step, optimizer) if tc.cuda_graph else launched_step
    load_next_batches()
    last_good_ckpt_step = ckpt["step"] if ckpt else None
    status = "done"
    while step < tc.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            if tc.cuda_graph:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        raw_model.set_step(step)
        run_step()
        load_next_batches()
        step += 1
        interval_steps += 1

        is_last = step == tc.max_steps
        if step % tc.log_every == 0 or is_last or stop["signal"]:
            loss_val = (loss_acc / interval_steps).item()  # the one host sync per log interval
            aux_val = (aux_acc / interval_steps).item()
            interval_time += time.perf_counter() - t0
            train_time += interval_time
            ms = 1000 * interval_time / interval_steps
            rec = {"step": step, "loss": loss_val, "aux_loss": aux_val, "lr": lr, "grad_norm": float(grad_norm),
                   "ms_per_step": ms, "tokens_per_s": tokens_per_step / (ms / 1000), "train_time_s": train_time}
            if peak:
                rec["mfu"] = flops_per_step / (ms / 1000) / (peak * world)
            rec.update(raw_model.metrics())
            log_record(rec)
            log(f"step {step:6d} | loss {loss_val:.4f} | aux {aux_val:.4f} | lr {lr:.2e} | {ms:7.1f} ms/step | "
                f"{rec['tokens_per_s']:9.0f} tok/s" + (f" | mfu {100 * rec['mfu']:.1f}%" if peak else ""))
            loss_acc.zero_()
            aux_acc.zero_()
            interval_time, interval_steps = 0.0, 0
            if not math.isfinite(loss_val):
                status = "non-finite loss"
                log(f"stopping: the loss is {loss_val} at step {step}. The last good checkpoint "
                    f"({'step ' + str(last_good_ckpt_step) if last_good_ckpt_step else 'none yet'}) is kept at "
                    f"{ckpt_path}; try a lower --lr, --grad-clip 1.0 or --dtype bfloat16")
                break
        else:
            interval_time += time.perf_counter() - t0

        out_of_time = tc.max_time_min > 0 and train_time + interval_time >= 60 * tc.max_time_min
        if (tc.eval_every and step % tc.eval_every == 0) or is_last or out_of_time:
            val_loss = evaluate()
            log_record({"step": step, "val_loss": val_loss, "train_time_s": train_time + interval_time})
            log(f"step {step:6d} | val loss {val_loss:.4f}")
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or is_last or stop["signal"] or out_of_time:
            checkpoint(step)
            last_good_ckpt_step = step
        if stop["signal"]:
            status = f"stopped by signal {stop['signal']}"
            log(f"{status}: checkpoint at step {step} in {ckpt_path}; continue with --resume")
            break
        if out_of_time:
            status = "time budget reached"
            log(f"{status} ({tc.max_time_min} min): stopping at step {step}")
            break

    if ddp:
        # cheap end-of-run consistency check: every rank must hold the same weights
        vec = torch.cat([p.detach().float().flatten() for p in raw_model.parameters()])
        checksum = torch.stack([vec.sum(), (vec * vec).sum()])
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(sums, checksum)
        same = all(torch.equal(s, sums[0]) for s in sums)
        log(f"ddp: parameters {'identical' if same else 'DIFFER'} across {world} ranks")
    if master:
        summary = {"status": status, "step": step, "train_time_s": train_time, "run_dir": str(run_dir)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log_file.close()
        if wb is not None:
            wb.finish()
    if ddp:
        # all ranks reach the teardown together: a gloo rank that tears down while its peer is still
        # writing the summary can abort at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return 0 if status != "non-finite loss" else 1


if __name__ == "__main__":
    sys.exit(main())
