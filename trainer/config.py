"""
The training configuration: TrainConfig (with model.GPTConfig, every field a flag), what --help says
about each flag, presets (config/NAME.json), and the checks that reject a config before any work starts.
Values resolve as: dataclass default < preset < command line.
"""

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import attention
from model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository: presets live in ROOT/config


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
    fsdp: bool = False
    ddp_bucket_mb: int = 25
    ddp_overlap: bool = False
    ddp_bucket_view: bool = False
    device: str = "auto"
    dtype: str = "auto"
    wandb: bool = False
    wandb_project: str = "ra-gpt"
    wandb_group: str = ""
    wandb_tags: str = ""


# what --help says about each flag; a GPTConfig field missing here falls back to its comment in model.py
HELP = {
    # training
    "preset": "a values file in config/ (tiny, gpt2-124m, gpt2-350m, gpt2-774m, gpt2-1b); auto: gpt2-124m with a "
              "GPU, tiny without",
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
    "grad_accum": "micro-steps per optimizer step per process: N processes x A read what 1 x N*A reads (docs/ddp.md)",
    "lr": "peak learning rate, reached after the warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear learning-rate warmup",
    "lr_decay_steps": "length of the cosine decay in steps (0: --max-steps)",
    "weight_decay": "AdamW weight decay (on weights with 2 or more dims only)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the gradient norm to this (0: off)",
    "eval_every": "val loss every this many steps, and at the end (0: only at the end)",
    "eval_batches": "batches per val evaluation over all processes, from a fixed set of val windows",
    "log_every": "one log line every this many steps, with the loss averaged over them",
    "ckpt_every": "checkpoint every this many steps (0: only at the end and on SIGINT/SIGTERM)",
    "resume": "continue the run in <out-dir>/<run-name> from its ckpt.pt, with its saved config",
    "overwrite": "start a new run in a folder that holds one: the old run is moved to <run-name>.old-N first",
    "compile": "torch.compile the model (with --fsdp: each Block's forward, before sharding)",
    "cuda_graph": "replay each optimizer step as one CUDA graph, under torchrun DDP's all-reduce included (see "
                  "cuda_graph.py)",
    "fsdp": "shard the parameters, gradients and optimizer state over the processes (FSDP2; under torchrun or "
            "in one process; checkpoints through torch.distributed.checkpoint; docs/ddp.md)",
    "ddp_bucket_mb": "DDP all-reduces the gradients in buckets of this many MB (torch's default 25; docs/ddp.md "
                     "measures others)",
    "ddp_overlap": "with --compile under torchrun: compile around DDP, so that dynamo splits the compiled graph at "
                   "DDP's buckets and each bucket's all-reduce overlaps the rest of the backward (default: DDP "
                   "around the compiled model, whose backward hands DDP every gradient at its end; docs/ddp.md)",
    "ddp_bucket_view": "DDP's gradient_as_bucket_view: the gradients live in DDP's buckets, so no copy into and out "
                       "of them per step (docs/ddp.md)",
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
    "ra_swap_norm": "ra_swap's swapped term: layernorm (LayerNorm(r), the published form; diverges on the prose "
                    "short rung, docs/quality.md) or none (r itself, on the scale of the standard term; trains)",
    "ra_exact_operands": "ra_exact's folded operands: dense (the projection writes q' per head and v, each dense in "
                         "(B, T, H, .) order; k' is one pass over q') or cat (q' = [q, k] and k' = [a k, b q] "
                         "copied from q, k: the plain form, slower)",
    "ra_exact_streams": "ra_exact_headsel on a CUDA GPU: 2 runs the RA and the plain heads' attention at once on two "
                        "streams (attention/two_stream.py; Hopper or newer, cuDNN), 1 one after the other",
}

# the shared model fields; every other GPTConfig field is an attention option (a variant lists the ones it reads)
MODEL_FIELDS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "attn")


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


def build_parser(preset="auto", preset_values=None, description=""):
    """Every config field as a flag. Its help shows the value it takes when not given: the preset's
    where the preset sets it, else the dataclass default. Flags default to None, so that the values
    given on the command line can be told apart. description: the text above the flags (train.py's
    docstring)."""
    preset_values = preset_values or {}
    p = argparse.ArgumentParser(
        description=description + f"\nDefaults below are those of preset {preset!r} "
                                  "(--preset NAME --help for another).",
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


def parse_args(argv=None, description=""):
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
    parser = build_parser(preset, values, description)
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
    for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "log_every", "ddp_bucket_mb"):
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
        if tc.dtype == "float16":
            raise ValueError("--cuda-graph with --dtype float16: the fp16 grad scaler checks for inf on the host every "
                             "step, which a graph cannot do; use --dtype bfloat16")
    if tc.ddp_overlap and not tc.compile:
        raise ValueError("--ddp-overlap changes how --compile and DDP combine; without --compile DDP already overlaps "
                         "its all-reduce with the backward: add --compile or drop --ddp-overlap")
    if tc.fsdp:
        check_fsdp(tc)
    bad = [c for c in tc.run_name if not (c.isalnum() or c in "-_.")]
    if bad:
        raise ValueError(f"--run-name={tc.run_name!r} may use letters, digits, '-', '_' and '.' only")
    if tc.resume and tc.overwrite:
        raise ValueError("--resume continues the run in the folder, --overwrite moves it aside: give one of them")
    check_attention(mc)


def check_fsdp(tc):
    """--fsdp with an option it cannot run with: an error now, not a failure some steps in."""
    for flag_name in ("ddp_overlap", "ddp_bucket_view"):
        if getattr(tc, flag_name):
            raise ValueError(f"--fsdp with {flag(flag_name)}: FSDP does not use DDP (its collectives already overlap "
                             f"per Block); drop {flag(flag_name)}")
    if tc.cuda_graph:
        raise ValueError("--fsdp with --cuda-graph: the graph would have to capture FSDP's per-block all-gathers and "
                         "reduce-scatters, which is not done here; drop one of them")
    if tc.dtype == "float16":
        raise ValueError("--fsdp with --dtype float16: the fp16 grad scaler does not handle sharded gradients here; "
                         "use --dtype bfloat16 (parameters gathered in bf16, gradients reduced in fp32)")
    if tc.device == "mps":
        raise ValueError("--fsdp runs on CUDA GPUs (NCCL) or on the CPU (gloo), not on mps")


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

