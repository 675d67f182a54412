"""
Train a GPT-2-style model with a named attention implementation.

    python train.py --attn ra_headsel --max-steps 1000
    torchrun --standalone --nproc_per_node=8 train.py --attn sdpa

Every field of TrainConfig below and of model.GPTConfig is a flag (dashes or
underscores). Values resolve as: dataclass default < preset (config/NAME.json)
< command line. A run writes runs/<run-name>/: config.json, log.jsonl (one JSON
object per logged step) and ckpt.pt (atomic, resumable with --resume). A folder
that holds a run is not written into without --resume or --overwrite, and a lock
(train.lock) keeps two processes out of the same folder.
"""

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import random
import re
import signal
import socket
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
class TrainConfig:  # every field is a flag; what each does: HELP below
    preset: str = "auto"
    dataset: str = "shakespeare"
    tokenizer: str = "gpt2"
    data_root: str = "data"
    out_dir: str = "runs"
    run_name: str = ""
    seed: int = 1337
    max_steps: int = 1000
    max_time_min: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    lr_decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 1000
    resume: bool = False
    overwrite: bool = False
    compile: bool = False
    cuda_graph: bool = False
    device: str = "auto"
    dtype: str = "auto"
    wandb: bool = False
    wandb_project: str = "ra-gpt"
    wandb_group: str = ""
    wandb_tags: str = ""


# what --help says about each flag; a GPTConfig field missing here falls back to its comment in model.py
HELP = {
    # training
    "preset": "a values file in config/ (tiny, gpt2-124m); auto: gpt2-124m with a GPU, tiny without",
    "dataset": "shakespeare, tinystories, fineweb-edu, openwebtext, synthetic-recall, synthetic-copy or "
               "files:GLOB (local .txt/.jsonl/.parquet); prepared into --data-root on first use",
    "tokenizer": "gpt2 (tiktoken, 50257 tokens) or bytes (256 symbols)",
    "data_root": "folder of prepared datasets (<data-root>/<dataset>/<tokenizer>/)",
    "out_dir": "runs go to <out-dir>/<run-name>/",
    "run_name": "the run's folder name; empty: <attn>-<preset>-s<seed>",
    "seed": "seeds the initial weights, the batch order and dropout",
    "max_steps": "optimizer steps in total (with --resume: the new total)",
    "max_time_min": "stop after this many minutes of training time, counted across resumes (0: no limit)",
    "batch_size": "sequences per micro-step per process",
    "grad_accum": "micro-steps per optimizer step",
    "lr": "peak learning rate, reached after the warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear learning-rate warmup",
    "lr_decay_steps": "length of the cosine decay in steps (0: --max-steps)",
    "weight_decay": "AdamW weight decay (on weights with 2 or more dims only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "eval_every": "val loss every this many steps, and at the end (0: only at the end)",
    "eval_batches": "batches per val evaluation, from a fixed set of val windows",
    "log_every": "one log line every this many steps, with the loss averaged over them",
    "ckpt_every": "checkpoint every this many steps (0: only at the end and on SIGINT/SIGTERM)",
    "resume": "continue the run in <out-dir>/<run-name> from its ckpt.pt, with its saved config",
    "overwrite": "start a new run in a folder that holds one: the old run is moved to <run-name>.old-N first",
    "compile": "torch.compile the model",
    "cuda_graph": "replay each optimizer step as one CUDA graph (one GPU; see cuda_graph.py)",
    "device": "auto, cuda, cuda:N, mps or cpu",
    "dtype": "auto (bfloat16 on CUDA, float32 elsewhere), bfloat16, float16 or float32",
    "wandb": "log to Weights & Biases (offline without an API key)",
    "wandb_project": "wandb project",
    "wandb_group": "wandb group (e.g. one per comparison)",
    "wandb_tags": "comma-separated wandb tags, added to the automatic ones (attn, dataset, preset)",
    # model
    "block_size": "context length in tokens",
    "vocab_size": "set from the dataset's tokenizer (a value given here is replaced)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads per block",
    "n_embd": "model width (divisible by --n-head)",
    "dropout": "dropout probability (0: off)",
    "bias": "biases in the linear layers and LayerNorms",
    "attn": "the attention implementation",
    "sdpa_backend": "auto, flash, cudnn, efficient or math: force one SDPA backend",
    "ra_R": "rank of the reciprocal channel (the last R dims of each head)",
    "ra_fused": "fold the reciprocal channel into the QKV weight",
    "ra_w_std_init": "initial per-head weight of the standard term",
    "ra_w_rec_init": "initial per-head weight of the reciprocal term",
    "ra_l1": "L1 weight on mean(w_rec) (head-selective variants)",
    "ra_threshold": "heads with w_rec below this become plain heads (head-selective variants)",
    "ra_route_every": "0: route heads on the device every step; N: refresh the routing every N steps",
    "ra_token_frac": "target fraction of tokens that use the reciprocal channel (ra_tokensel)",
    "ra_token_penalty": "weight of the token-fraction penalty (ra_tokensel)",
    "ra_quant": "none or int8: precision of the reciprocal channel",
}

# the shared model fields; every other GPTConfig field is an attention option (a variant lists the ones it reads)
MODEL_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "attn")
# flags whose saved value a resume keeps: they define the model, the data stream or the batches it draws
FIXED_ON_RESUME = ("preset", "dataset", "tokenizer", "seed", "batch_size", "grad_accum") + tuple(
    f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "sdpa_backend"))
# files that mean a folder holds a run (the quality ladder puts its own train.log there first)
RUN_FILES = ("config.json", "log.jsonl", "ckpt.pt", "summary.json")


class RunError(Exception):
    """A run that cannot start or go on for a reason the message explains (python train.py prints it
    without a traceback; train.main callers such as the quality ladder get it as an exception)."""


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


def flag(name):
    return f"--{name.replace('_', '-')}"


def describe(name):
    """The flag's description: HELP, else the field's comment in model.py."""
    if name in HELP:
        return HELP[name]
    source = Path(sys.modules[GPTConfig.__module__].__file__).read_text()
    m = re.search(rf"^\s+{re.escape(name)}:[^#\n]*#\s*(.+)$", source, re.M)
    return m.group(1).strip() if m else ""


def build_parser(preset="auto", preset_values=None):
    """Every config field as a flag. Its help shows the value it takes when not given: the preset's
    where the preset sets it, else the dataclass default. Flags default to None, so that the values
    given on the command line can be told apart."""
    preset_values = preset_values or {}
    p = argparse.ArgumentParser(
        description=__doc__ + f"\nDefaults below are those of preset {preset!r} (--preset NAME --help for another).",
        formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    seen = set()
    for title, cls in (("training", TrainConfig), ("model", GPTConfig)):
        group = p.add_argument_group(title)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            flags = [flag(f.name)] + ([f"--{f.name}"] if "_" in f.name else [])
            help_ = describe(f.name)
            if f.name == "attn":
                help_ += f": one of {', '.join(attention.names())}"
            if f.name == "preset":
                help_ += f" (this help: {preset})"
            elif f.name in preset_values:
                help_ += f" (preset {preset}: {preset_values[f.name]})"
            else:
                help_ += f" (default: {f.default!r})" if isinstance(f.default, str) else f" (default: {f.default})"
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


def parse_args(argv=None):
    """(TrainConfig, GPTConfig, notes, given): given holds the flags on the command line, by field name.
    The preset is read first, so that --help can show its values. Raises SystemExit on bad input."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    preset = pre.parse_known_args(argv)[0].preset or TrainConfig.preset
    notes = []
    if preset == "auto":
        preset = "gpt2-124m" if torch.cuda.is_available() else "tiny"
        notes.append(f"preset: {preset} ({'GPU found' if preset == 'gpt2-124m' else 'no GPU: the CPU-sized preset'};"
                     f" --preset gpt2-124m or --preset tiny to choose)")
    try:
        values, preset_error = load_preset(preset), None
    except ValueError as e:
        values, preset_error = {}, str(e)
    parser = build_parser(preset, values)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if preset_error:
        parser.error(preset_error)
    values.update(given)
    values["preset"] = preset
    if "preset" in given:
        given["preset"] = preset
    tnames = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = TrainConfig(**{k: v for k, v in values.items() if k in tnames})
    mc = GPTConfig(**{k: v for k, v in values.items() if k not in tnames})
    try:
        check_config(tc, mc)
    except ValueError as e:
        parser.error(str(e))
    notes += unused_option_warnings(mc, given)
    return tc, mc, notes, given


def resolve_config(argv=None):
    """Parse the command line into (TrainConfig, GPTConfig, notes). Raises SystemExit on bad input."""
    return parse_args(argv)[:3]


def check_config(tc, mc):
    """Reject values that cannot work, before any work starts."""
    mc.validate()  # attention name, head divisibility, ...
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
        if getattr(tc, name) <= 0:
            raise ValueError(f"{flag(name)}={getattr(tc, name)} must be positive")
    for name in ("eval_every", "ckpt_every", "warmup_steps", "lr_decay_steps", "max_time_min", "grad_clip"):
        if getattr(tc, name) < 0:
            raise ValueError(f"{flag(name)}={getattr(tc, name)} must be >= 0")
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
    if tc.resume and tc.overwrite:
        raise ValueError("--resume continues the run in the folder, --overwrite moves it aside: give one of them")
    check_attention(mc)


def check_attention(mc):
    """Build one attention module on the meta device (no memory, no init): the variant's constructor
    checks its own options, so a bad one is an error here rather than after the run folder is written."""
    cls = attention.get_class(mc.attn)  # imports the variant now, so a broken one fails here
    try:
        with torch.device("meta"):
            cls(mc)
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(mc.attn) else f"--attn {mc.attn}: {e}") from None


def unused_option_warnings(mc, given):
    """Warnings for attention options given on the command line, away from their default, that the chosen
    attention does not read. Warnings, not errors: the quality ladder passes the same flags to every variant."""
    options = getattr(attention.get_class(mc.attn), "options", None)
    if options is None:
        return []
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    unused = [k for k in given if k in defaults and k not in MODEL_FIELDS and k not in options
              and given[k] != defaults[k]]
    return [f"warning: {flag(k)} {given[k]} has no effect: --attn {mc.attn} does not use it (its options: "
            f"{', '.join(flag(o) for o in options) or 'none'})" for k in unused]


# ----------------------------------------------------------------------------- run folder

class RunLock:
    """An exclusive lock on a run folder (<run>/train.lock, flock'ed), so two processes never write the
    same run. The kernel drops a flock when its process dies, so a lock file left by a killed run is
    stale by construction and is taken over. release() is idempotent; the file names the holder."""

    def __init__(self, run_dir):
        self.path = run_dir / "train.lock"
        self.created_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd, self.took_over = None, None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunError(f"{run_dir} is in use by another run ({self.holder()}); wait for it to end or stop "
                               f"it, or pick another --run-name") from None
            try:  # the holder before us may have unlinked the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.read(fd, 4096).decode(errors="replace").strip()
            if old:
                self.took_over = old
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode(), 0)
            self.fd = fd

    def holder(self):
        for _ in range(20):  # the holder writes its name just after it takes the lock
            try:
                h = json.loads(self.path.read_text())
                return f"pid {h['pid']} on {h['host']}, started {h['started']}; lock file {self.path}"
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        return f"lock file {self.path}"

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            with contextlib.suppress(OSError):  # a run that stopped before writing anything leaves no folder
                self.path.parent.rmdir()


def move_aside(run_dir, keep=("train.lock",)):
    """--overwrite: move the old run's files into a new sibling <run>.old-N; returns that folder."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in keep:
            os.replace(entry, aside / entry.name)
    return aside


def cut_log(run_dir, ckpt_step, tc):
    """Resume: keep the log an uninterrupted run would have at ckpt_step. Lines written after the checkpoint
    (a kill -9) and off-grid lines at it (a run's last step, an eval at the time budget) move to
    log.discarded.jsonl, since the resumed run writes them again. Returns how many lines moved."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            drop.append(line)  # a line cut off mid-write by a kill
            continue
        on_grid = (step % tc.log_every == 0) if "loss" in rec else bool(tc.eval_every and step % tc.eval_every == 0)
        (keep if step < ckpt_step or (step == ckpt_step and on_grid) else drop).append(line)
    if drop:
        with open(run_dir / "log.discarded.jsonl", "a") as f:
            f.write("".join(x + "\n" for x in drop))
        write_atomic(path, "".join(x + "\n" for x in keep))
    return len(drop)


def write_atomic(path, text):
    """Write a small text file through a temp name unique to this process, then rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """ckpt.pt as a dict, or a RunError that names the file and what to do."""
    fix = (f"Restore a good copy of it, or start the run over with --overwrite (moves {path.parent} aside) "
           f"or under another --run-name")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, empty, or not a torch file: each raises something different
        raise RunError(f"--resume: cannot read the checkpoint {path} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]}; {path.stat().st_size} bytes). {fix}") from None
    need = ("model", "optimizer", "scaler", "loader", "rng", "step", "model_config", "train_config")
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"--resume: {path} is not a train.py checkpoint (it lacks {', '.join(missing)}). {fix}")
    return ckpt


def resume_config(ckpt, tc, mc, given):
    """The saved config with the flags given now on top; a flag that cannot change on resume is an error."""
    saved = {**ckpt["train_config"], **ckpt["model_config"]}
    now = {**asdict(tc), **asdict(mc)}
    changed = [k for k in FIXED_ON_RESUME if k in given and k in saved and now[k] != saved[k]]
    if changed:
        raise RunError("--resume continues the saved run, whose " + ", ".join(
            f"{flag(k)} is {saved[k]!r} (given: {now[k]!r})" for k in changed) + "; these cannot change on resume. "
            "Drop them to continue the run, or start a new one (another --run-name, or --overwrite)")
    tnames = {f.name for f in dataclasses.fields(TrainConfig)}
    train_saved = {k: v for k, v in ckpt["train_config"].items() if k in tnames}
    tc = TrainConfig(**{**train_saved, **{k: v for k, v in given.items() if k in tnames}})
    mnames = {f.name for f in dataclasses.fields(GPTConfig)}
    mc = GPTConfig(**{**{k: v for k, v in ckpt["model_config"].items() if k in mnames},
                      **{k: v for k, v in given.items() if k == "sdpa_backend"}})
    return tc, mc


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
    """Write atomically: a crash mid-write leaves the previous checkpoint intact. The temp name is unique to
    the process, so no two writers ever share one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    ra_opts = {k: getattr(mc, k) for k in attention.get_class(mc.attn).options}  # the chosen attention's own
    tags = [mc.attn, tc.dataset, tc.preset] + [t for t in tc.wandb_tags.split(",") if t]
    return wandb.init(project=tc.wandb_project, group=tc.wandb_group or None, name=run_name, dir=str(run_dir),
                      config={**asdict(tc), **asdict(mc), "ra_options": ra_opts}, tags=tags)


# ----------------------------------------------------------------------------- training

def main(argv=None):
    """Train; returns the exit status. Raises RunError (a message, no traceback needed) when the run cannot
    start or go on. The run folder's lock is released on return and on any exception, so a caller may call
    main again in the same process (the quality ladder does)."""
    tc, mc, notes, given = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        return train(tc, mc, notes, given, cleanup)


def ensure_data(tc, log):
    """The prepared dataset's folder, prepared or generated first if needed (data/prepare.py)."""
    from data.prepare import PrepareError, ensure_dataset

    try:
        return ensure_dataset(tc.dataset, tc.tokenizer, tc.data_root, log)
    except PrepareError as e:
        raise RunError(f"data: {e}") from None


def open_splits(data_dir, tc, mc, rank, world, pin_memory):
    """Both splits' loaders, checked before the first step: every shard's header and size, and at least one
    window of block_size + 1 tokens in each split (else a run would stop at its first eval, minutes in)."""
    from data.loader import TokenLoader
    from data.shards import ShardError

    try:
        train = TokenLoader(data_dir, "train", tc.batch_size, mc.block_size, rank=rank, world_size=world,
                            seed=tc.seed, pin_memory=pin_memory)
        val = TokenLoader(data_dir, "val", tc.batch_size, mc.block_size, rank=rank, world_size=world, seed=0)
        val.val_windows(tc.eval_batches)
    except (ShardError, ValueError, FileNotFoundError) as e:
        raise RunError(f"data: {e}") from None
    return train, val


def train(tc, mc, notes, given, cleanup):
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

    # ---- run folder: locked by rank 0 for the whole run; a new run never writes into an old one
    run_name = tc.run_name or f"{mc.attn}-{tc.preset}-s{tc.seed}"
    run_dir = ROOT / tc.out_dir / run_name if not os.path.isabs(tc.out_dir) else Path(tc.out_dir) / run_name
    ckpt_path = run_dir / "ckpt.pt"
    if master:
        lock = RunLock(run_dir)
        cleanup.callback(lock.release)
        if lock.took_over:
            log(f"run folder: took over the lock of a run that is no longer running ({lock.took_over})")
    ckpt = None
    if tc.resume:  # continue with the saved config, overridden only by the flags given now
        if not ckpt_path.exists():
            raise RunError(f"--resume: no checkpoint at {ckpt_path} (check --out-dir and --run-name; a run stopped "
                           f"before its first checkpoint starts over with --overwrite)")
        ckpt = load_checkpoint(ckpt_path)
        tc, mc = resume_config(ckpt, tc, mc, given)
        try:  # the saved values with today's flags: e.g. a --cuda-graph run resumed with --device cpu
            check_config(tc, mc)
        except ValueError as e:
            raise RunError(f"--resume: {e} (the saved config is in {run_dir / 'config.json'}; a flag given now "
                           "overrides it)") from None
        log(f"resuming {run_name} from step {ckpt['step']}")
    else:
        found = [f for f in RUN_FILES if (run_dir / f).exists()]
        if found and not tc.overwrite:
            raise RunError(f"{run_dir} already holds a run ({', '.join(found)}). Continue it with --resume (and a "
                           f"larger --max-steps), start over with --overwrite (moves the old run to "
                           f"{run_name}.old-N), or pick another --run-name")
        if found and master:
            log(f"--overwrite: moved the old run to {move_aside(run_dir)}")

    # ---- data: prepared on first use (rank 0 prepares, the others then find it); both splits checked now
    if master:
        data_dir = ensure_data(tc, log)
    if ddp:
        dist.barrier()
    if not master:
        data_dir = ensure_data(tc, log)
    from data.loader import load_meta

    meta = load_meta(data_dir)
    mc.vocab_size = meta["vocab_size"]
    # pinned host batches make the copy truly asynchronous; a pageable copy would sync the host every step
    loader, val_loader = open_splits(data_dir, tc, mc, rank, world, pin_memory=device.type == "cuda")
    if master:
        write_atomic(run_dir / "config.json", json.dumps({**asdict(tc), **asdict(mc), "run_name": run_name,
                                                          "world_size": world, "data_dir": str(data_dir)}, indent=2))
        if ckpt is not None and ckpt["step"] < tc.max_steps:
            moved = cut_log(run_dir, ckpt["step"], tc)
            if moved:
                log(f"log: moved {moved} lines from after the checkpoint (step {ckpt['step']}) to "
                    f"{run_dir / 'log.discarded.jsonl'}; the resumed run writes those steps again")

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
    step = 0
    train_time = 0.0  # seconds spent in training steps (not eval, not checkpoints), over all resumes
    # the running sums of the log interval under way; a checkpoint keeps them, so the line after a resume
    # averages the same steps as an uninterrupted run's
    loss_acc = torch.zeros((), device=device)
    aux_acc = torch.zeros((), device=device)
    interval_time, interval_steps = 0.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"][rank] if rank < len(ckpt["loader"]) else ckpt["loader"][0])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        train_time = ckpt.get("train_time_s", 0.0)
        if "interval" in ckpt:
            loss_acc.copy_(ckpt["interval"]["loss"])
            aux_acc.copy_(ckpt["interval"]["aux"])
            interval_time, interval_steps = ckpt["interval"]["time_s"], ckpt["interval"]["steps"]
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
    log_file = cleanup.enter_context(open(run_dir / "log.jsonl", "a")) if master else None

    def log_record(rec):
        if master:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if wb is not None:
                # per-head gate lists stay in log.jsonl; wandb gets their per-layer means from metrics()
                wb.log({k: v for k, v in rec.items() if k not in ("step", "gates")}, step=rec["step"])

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
            interval = {"loss": loss_acc.cpu(), "aux": aux_acc.cpu(), "time_s": interval_time,
                        "steps": interval_steps}
            save_checkpoint(ckpt_path, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scaler": scaler.state_dict(), "loader": loaders, "rng": rngs,
                                        "step": at_step, "model_config": asdict(mc), "train_config": asdict(tc),
                                        "train_time_s": train_time, "interval": interval})

    @torch.no_grad()
    def evaluate():
        model.eval()
        total, n = torch.zeros((), device=device), 0
        for x, y in val_loader.val_batches(tc.eval_batches):
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

    for sig in (signal.SIGINT, signal.SIGTERM):
        cleanup.callback(signal.signal, sig, signal.getsignal(sig))
        signal.signal(sig, on_signal)

    # ---- the loop
    model.train()
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
    head_selective = attention.get_class(mc.attn).head_selective
    heads_off_said = False  # said once per run, in its stdout (the ladder's report reads ra_frac from the log)
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
        on_grid = step % tc.log_every == 0
        if on_grid or is_last:
            loss_val = (loss_acc / interval_steps).item()  # the one host sync per log interval
            aux_val = (aux_acc / interval_steps).item()
            interval_time += time.perf_counter() - t0
            ms = 1000 * interval_time / interval_steps
            rec = {"step": step, "loss": loss_val, "aux_loss": aux_val, "lr": lr, "grad_norm": float(grad_norm),
                   "ms_per_step": ms, "tokens_per_s": tokens_per_step / (ms / 1000),
                   "train_time_s": train_time + interval_time}
            if peak:
                rec["mfu"] = flops_per_step / (ms / 1000) / (peak * world)
            rec.update(raw_model.metrics())
            gates = raw_model.gate_values()  # per head and layer: where reciprocity survives (ladder plots)
            if gates:
                rec["gates"] = gates
            log_record(rec)
            if head_selective and rec.get("attn/mean/ra_frac") == 0.0 and not heads_off_said:
                heads_off_said = True
                log(f"note: every RA head has switched off by step {step} (ra_frac 0): from here on this run is "
                    "plain attention; a smaller --ra-l1 or --ra-threshold keeps them on")
            log(f"step {step:6d} | loss {loss_val:.4f} | aux {aux_val:.4f} | lr {lr:.2e} | {ms:7.1f} ms/step | "
                f"{rec['tokens_per_s']:9.0f} tok/s" + (f" | mfu {100 * rec['mfu']:.1f}%" if peak else ""))
            if on_grid:  # an off-grid last line leaves the interval open: a resume with more steps completes it
                train_time += interval_time
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
        summary = {"status": status, "step": step, "train_time_s": train_time + interval_time,
                   "run_dir": str(run_dir)}
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        if wb is not None:
            wb.finish()
    if ddp:
        # all ranks reach the teardown together: a gloo rank that tears down while its peer is still
        # writing the summary can abort at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return 0 if status != "non-finite loss" else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RunError as e:
        sys.exit(f"error: {e}")
