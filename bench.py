"""
Speed of every registered attention variant against the sdpa baseline, measured in one run.

    python bench.py                          # attn + step at the default shapes (a GPU; CPU: smoke run)
    python bench.py --what attn --variants sdpa,ra_same_flop --out runs/bench.json
    python bench.py --what step --compile    # eager and torch.compile rows
    python bench.py --sweep R --sweep heads  # only those sweeps
    python bench.py --what all --out runs/bench.json   # attn, step and the sweeps R, T, heads
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
         T: every variant at T, 2T, 4T; heads: head_selective variants with 0/25/50/100% RA heads.
         Sweeps time the attention module and function (as the attn section does).

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
`roadmap_unfused` defined below. One that cannot be built or run is reported in its row.
The heads sweep runs every registered variant that declares `head_selective` and sets its RA heads
with `set_heads_mask(mask)` (mask: bool [H], True = RA head; the contract in attention/__init__.py).
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import inspect
import io
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn as nn

import attention
import cuda_graph
from attention.functional import sdpa_causal
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------
# The roadmap's same-FLOP RA exactly as shared/roadmap.md wrote it (its "2.71 ms, 1.35x"): separate
# Q, K, V projections and a FRESH random W (D, R) on every call. The registered `ra_same_flop` folds
# the reciprocal channel into the QKV weight instead; the two side by side show where the 1.35x went.

def roadmap_unfused_attention(q, k, v, R, backend="auto"):
    """q, k, v (B, H, T, D). Scores q_i.k_j over the first D-R dims plus (k_i W).(q_j W) over R."""
    D = q.size(-1)
    W = torch.randn(D, R, device=q.device, dtype=q.dtype)  # the roadmap bug: new random W per call
    QW, KW = q @ W, k @ W  # (B, H, T, R)
    Qf = torch.cat([q[..., :D - R], KW], dim=-1)
    Kf = torch.cat([k[..., :D - R], QW], dim=-1)
    return sdpa_causal(Qf, Kf, v, backend=backend)


class RoadmapUnfusedRA(nn.Module):
    attn_flop_mult = 1.0  # same FLOPs as sdpa by construction (the small QW, KW matmuls aside)

    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.R, self.backend = cfg.n_head, cfg.ra_R, cfg.sdpa_backend
        C = cfg.n_embd
        self.q_proj = nn.Linear(C, C, bias=cfg.bias)
        self.k_proj = nn.Linear(C, C, bias=cfg.bias)
        self.v_proj = nn.Linear(C, C, bias=cfg.bias)
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.c_proj.residual_proj = True

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = roadmap_unfused_attention(q, k, v, self.R, self.backend)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


EXTRA_VARIANTS = {"roadmap_unfused": RoadmapUnfusedRA}


def variant_names():
    """Registered names, with roadmap_unfused right after ra_same_flop (or last)."""
    names = attention.names()
    at = names.index("ra_same_flop") + 1 if "ra_same_flop" in names else len(names)
    return names[:at] + list(EXTRA_VARIANTS) + names[at:]


def build_attention(name, cfg):
    if name in EXTRA_VARIANTS:
        return EXTRA_VARIANTS[name](cfg)
    return attention.build(name, dataclasses.replace(cfg, attn=name))


def build_model(name, cfg):
    if name not in EXTRA_VARIANTS:
        return GPT(dataclasses.replace(cfg, attn=name))
    model = GPT(dataclasses.replace(cfg, attn="sdpa"))
    for i, block in enumerate(model.transformer.h):  # swap the attention, with GPT's init
        block.attn = EXTRA_VARIANTS[name](cfg)
        for sub, module in block.attn.named_modules():
            model._init_weights(module, f"transformer.h.{i}.attn.{sub}", init_seed=0)
    return model


# ----------------------------------------------------------------------------
# Bare attention functions: (label, the variant it belongs to, where it lives, default flop mult).
# Arguments after q, k, v are filled by parameter name from function_extras(); a required one it
# does not know skips the function with a hint.

FUNCTIONS = [
    ("sdpa", "sdpa", lambda q, k, v, ex: sdpa_causal(q, k, v, backend=ex["backend"]), 1.0),
    ("reciprocal_attention", "ra_exact", "attention.functional:reciprocal_attention", 1.5),
    ("ra_same_flop", "ra_same_flop", "attention.functional:ra_same_flop", 1.0),
    ("roadmap_unfused", "roadmap_unfused", lambda q, k, v, ex: roadmap_unfused_attention(q, k, v, ex["R"], ex["backend"]), 1.0),
    ("ctr_attention", "ra_ctr", "attention.ctr_kernel:ctr_attention", 1.5),
]
# functions that only run on a CUDA GPU: elsewhere their rows say skipped and why, instead of an error
GPU_ONLY = {"ctr_attention": "the CTR kernel is a Triton GPU kernel (the ra_ctr module rows time its PyTorch path)"}


def function_extras(cfg, D, device, dtype):
    """Values for the arguments after q, k, v, by parameter name (per-head weights fp32, like params)."""
    a = torch.full((cfg.n_head,), cfg.ra_w_std_init, device=device, requires_grad=True)
    b = torch.full((cfg.n_head,), cfg.ra_w_rec_init, device=device, requires_grad=True)
    W = (randn(D, cfg.ra_R, device=device, dtype=dtype) / math.sqrt(D)).requires_grad_()
    return dict(a=a, w_std=a, b=b, w_rec=b, W=W, R=cfg.ra_R, backend=cfg.sdpa_backend)


def load_function(where, known):
    """A callable (q, k, v, extras) -> y; raises Skip when the function is not there (yet)."""
    if callable(where):
        return where
    mod_name, attr = where.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise Skip(f"{where} not available ({type(e).__name__}: {e})") from None
    try:
        params = list(inspect.signature(fn).parameters.values())[3:]
    except (TypeError, ValueError):
        params = []
    fill = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in known:
            fill.append(p.name)
        elif p.default is p.empty:
            raise Skip(f"bench.py cannot fill argument {p.name!r} of {where}{inspect.signature(fn)}: "
                       f"add it to function_extras()")
    return lambda q, k, v, ex: fn(q, k, v, **{n: ex[n] for n in fill})


# ----------------------------------------------------------------------------
# timing and rows

def make_train_step(model, cfg, B, T, compiled, autocast, n_inputs, compile_options=None, graphed=False,
                    graph_pool=None):
    """train.py's training step for `model` (on its device), without grad accumulation and data
    loading: fused AdamW, forward for the loss only, the modules' aux_loss, grad clip 1.0, over
    n_inputs random batches (drawn on the CPU, see randn()). train_step(marks=None) appends
    time.perf_counter() after each phase (forward, backward, clip, optimizer) to marks if given
    (tools/step_overhead.py). graphed: as train.py --cuda-graph (cuda_graph.graphed: 3 warm-up
    calls, then the step recorded in graph_pool, if given, and replayed), each call copying its batch
    into the graph's input buffer first."""
    dev = next(model.parameters()).device
    opt = model.configure_optimizer(weight_decay=0.1, lr=6e-4, betas=(0.9, 0.95), device_type=dev.type,
                                    capturable=graphed)
    fwd = torch.compile(model, options=compile_options) if compiled else model
    aux_loss = torch.compile(model.aux_loss, options=compile_options) if compiled else model.aux_loss  # as train.py
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (2, B, T), generator=gen).to(dev) for _ in range(n_inputs)]
    nxt, it = cycle(batches), itertools.count()
    mark = lambda marks: marks.append(time.perf_counter()) if marks is not None else None  # noqa: E731
    xy = torch.empty_like(batches[0])  # the batch the step reads (a graph reads fixed tensors)

    def step_body(marks=None):
        with autocast():
            _, loss = fwd(xy[0], xy[1], return_logits=False)  # as train.py
            aux = aux_loss()
        mark(marks)
        (loss + aux).backward()
        mark(marks)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mark(marks)
        opt.step()

    graph_step = cuda_graph.graphed(step_body, opt, pool=graph_pool) if graphed else None

    def train_step(marks=None):
        xy.copy_(nxt())
        mark(marks)
        model.set_step(next(it))
        if graph_step is None:
            step_body(marks)
            opt.zero_grad(set_to_none=True)
        elif marks is not None:
            raise ValueError("a CUDA-graph step has no host phases to time")
        else:
            graph_step()
        mark(marks)

    return train_step


class Skip(Exception):
    """A variant that does not apply here (missing, not registered, no gate): a reason, not an error."""


def time_ms(fn, warmup, reps, device):
    """Median ms of `reps` calls after `warmup` calls: CUDA events on a GPU, wall clock on CPU."""
    for _ in range(max(warmup, 1)):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class HostSync(RuntimeError):
    """The timed call synchronizes the host with the GPU, so it cannot be a CUDA graph."""


def time_graph_ms(fn, n_graphs, warmup, reps):
    """Median ms of `reps` CUDA-graph replays of fn. One graph per input set (fn rotates its inputs, so
    n_graphs consecutive captures cover them all), replayed in turn. A replay launches the whole call
    at once, so the time is the GPU's: timed eagerly, a call made of many short kernels measures how
    fast Python can launch them. Raises what the capture raises (e.g. a host sync inside fn)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, lazy init, allocator) off the capture
        for _ in range(max(warmup, 2)):
            fn()
        # a host sync cannot be captured; find it here, where failing costs nothing
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            raise HostSync(" ".join(str(e).split())[:160]) from None
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    pool, graphs = torch.cuda.graph_pool_handle(), []
    for _ in range(n_graphs):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            fn()
        graphs.append(g)
    for g in graphs:
        g.replay()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        graphs[i % n_graphs].replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


# kernel name -> category, first match wins (cuBLAS/CUTLASS GEMMs, SDPA's and our attention kernels,
# the optimizer's multi-tensor kernels, then torch.compile's generated Triton kernels)
KERNEL_CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "attn", "attention", "_ctr_")),
    ("gemm", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "wgmma", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("compiled", ("triton_",)),
]


def kernel_category(name):
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def profile_kernels(fn, steps):
    """GPU kernel time per call of fn, from torch.profiler over `steps` calls: {category: ms}, the top
    kernels [(ms per call, launches per call, name)] (and all of them), and the kernel-time total. The step's own
    ms minus that total is time the GPU sat idle (waiting on the host)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    cats, kernels = {}, []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:  # torch < 2.4 names it after CUDA
            us = e.self_cuda_time_total
        if us <= 0:
            continue
        ms = us / 1e3 / steps
        cats[kernel_category(e.key)] = cats.get(kernel_category(e.key), 0.0) + ms
        kernels.append((ms, e.count / steps, e.key))
    kernels.sort(reverse=True)
    # every kernel goes into the JSON (so two variants can be diffed by name); tables print the top
    return dict(categories=cats, top=kernels[:12], kernels=kernels, total_ms=sum(cats.values()))


INPUT_GEN = torch.Generator().manual_seed(0)  # CPU generator for every benchmark input


def randn(*shape, device, dtype, requires_grad=False):
    """Random inputs drawn on the CPU and copied over: the CUDA RNG is left alone, since a CUDA-graph
    capture that fails (see time_graph_ms) leaves it unusable for the rest of the process."""
    return torch.randn(*shape, generator=INPUT_GEN).to(device=device, dtype=dtype).requires_grad_(requires_grad)


def cycle(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def free_memory(device):
    if device.type == "cuda":  # on CPU the refcounts free it; a gc pass per row only costs time
        gc.collect()
        torch.cuda.empty_cache()


class Bench:
    def __init__(self, args, device, dtype, meta):
        self.args, self.device, self.dtype, self.meta = args, device, dtype, meta
        self.rows, self.dead = [], None  # dead: why the CUDA context can no longer be used
        self.shown = set()  # (variant, error) whose traceback went to stderr already
        self.capture_failed = None  # the row whose CUDA-graph capture failed (it breaks the CUDA RNG)
        self.step_pool = None  # the memory pool of the training-step graphs (--cuda-graph)
        self.notes = {}  # variant -> what it printed (e.g. "[ra_ctr] CTR kernel unavailable ..."), kept for later rows

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def guarded(self, rows, fn):
        """Run fn(); on failure mark every row of `rows` skipped/error instead of stopping the run."""
        if self.dead:
            for r in rows:
                r["status"] = f"skipped: {self.dead}"
            return
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said):  # a variant's own notices (a fallback path) go in its rows
                fn()
        except Exception as e:  # one variant must not end the run
            skip = isinstance(e, (Skip, ImportError))
            msg = f"{'skipped' if skip else 'error'}: {'' if isinstance(e, Skip) else type(e).__name__ + ': '}{e}"
            msg = " ".join(msg.split())[:300]
            if self.capture_failed and not skip:
                msg += (f" (after the failed CUDA-graph capture of {self.capture_failed}, which can leave the CUDA "
                        f"RNG unusable: rerun with --no-graphs, or without that variant)")
            for r in rows:
                if r["status"] == "pending":
                    r["status"] = msg
            if not skip and (rows[0]["variant"], msg) not in self.shown:
                self.shown.add((rows[0]["variant"], msg))
                print(f"[bench] {rows[0]['variant']} ({rows[0]['kind']}, {rows[0]['setting'] or rows[0]['section']}) failed:\n"
                      + "".join(traceback.format_exc(limit=-4)), file=sys.stderr)
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception as e2:
                    self.dead = f"CUDA context lost after {rows[0]['variant']} failed ({type(e2).__name__}); rerun without it (--variants)"
        finally:
            free_memory(self.device)
            name = rows[0]["variant"]
            if said.getvalue().strip():
                print(said.getvalue(), end="", file=sys.stderr)
                self.notes[name] = " ".join(said.getvalue().split())[:200]
            for r in rows:
                r["note"] = self.notes.get(name)
            self.save()

    def save(self):
        """Rewrite --out after every variant: a run cut off by a time limit keeps what it measured."""
        if self.args.out:
            self.add_ratios()
            os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
            with open(self.args.out, "w") as f:
                json.dump(dict(meta=self.meta, rows=self.rows), f, indent=1)

    def new_rows(self, section, group, setting, kind, variant, passes, **params):
        rows = [dict(section=section, group=group, setting=setting, kind=kind, variant=variant, passes=p,
                     params=dict(params), ms=None, tflops=None, ratio=None, mem_mib=None, status="pending") for p in passes]
        self.rows += rows
        return rows

    def measure(self, row, fn, warmup, reps, flops, graphs=False):
        """Time fn into row. graphs: replay it as CUDA graphs (attention rows on a GPU, unless
        --no-graphs); a call that cannot be captured is timed eagerly and says so in row["timing"]."""
        dev = self.device
        if dev.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        row["ms"] = time_ms(fn, warmup, reps if not graphs else 3, dev)  # eager: also the memory figure
        row["timing"] = "cuda events" if dev.type == "cuda" else "wall clock"
        if graphs and self.capture_failed:
            row["timing"] += f" (no graphs after the failed capture of {self.capture_failed})"
        if dev.type == "cuda":
            row["mem_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if graphs and not self.capture_failed:  # after a failed capture: eager for the rest of the run
            try:
                row["ms"] = time_graph_ms(fn, self.args.n_inputs, 2, reps)  # warmed up by the eager pass
                row["timing"] = "cuda graph"
            except Exception as e:  # not capturable: keep an eager timing, marked as such
                why = "host sync" if isinstance(e, HostSync) else "graph capture failed"
                row["timing"] = f"cuda events ({why}: {type(e).__name__}: {' '.join(str(e).split())[:120]})"
                if not isinstance(e, HostSync):
                    self.capture_failed = f"{row['variant']} ({row['passes']})"
                torch.cuda.synchronize()
                row["ms"] = time_ms(fn, warmup, reps, dev)
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        row["status"] = "ok"

    # -- attention module / function at one shape ----------------------------

    def time_passes(self, rows, call, inputs, extra, flops_fwd, flops_fwd_bwd, aux_loss=None):
        """rows[0]: y = call(*args) (autograd on, as in training); rows[1]: plus the gradients of y
        (and of aux_loss(), the module's regularizer, as training adds it) w.r.t. args and `extra`
        (autograd.grad: nothing accumulates). inputs: (args, dy), rotated."""
        nxt = cycle(inputs)

        def fwd():
            with self.autocast():
                return call(*nxt()[0])

        def fwd_bwd():
            args, dy = nxt()
            with self.autocast():
                y = call(*args)
            y = y[0] if isinstance(y, tuple) else y
            outs, grads = [y], [dy.to(y.dtype)]
            if aux_loss is not None:
                aux = aux_loss()
                if aux.requires_grad:
                    outs, grads = outs + [aux], grads + [torch.ones_like(aux)]
            return torch.autograd.grad(outs, list(args) + extra, grads, allow_unused=True)

        graphs = self.device.type == "cuda" and self.args.graphs
        self.measure(rows[0], fwd, self.args.warmup, self.args.reps, flops_fwd, graphs)
        self.measure(rows[1], fwd_bwd, self.args.warmup, self.args.reps, flops_fwd_bwd, graphs)

    def attn_module(self, section, group, setting, name, cfg, B, T, prepare=None):
        rows = self.new_rows(section, group, setting, "module", name, ["fwd", "fwd+bwd"], ra_R=cfg.ra_R, T=T)
        dev, C = self.device, cfg.n_embd

        def run():
            with (dev if not self.capture_failed else contextlib.nullcontext()):  # see randn()
                mod = build_attention(name, cfg).to(dev).train()
            if prepare:
                prepare(mod)
            mult = float(getattr(mod, "attn_flop_mult", 1.0))
            attn = 4 * B * cfg.n_head * T * T * cfg.head_dim / 2 * mult
            lin = 2 * B * T * sum(m.weight.numel() for m in mod.modules() if isinstance(m, nn.Linear))
            x = lambda **kw: randn(B, T, C, device=dev, dtype=self.dtype, **kw)
            inputs = [((x(requires_grad=True),), x()) for _ in range(self.args.n_inputs)]
            for r in rows:
                r["params"]["attn_flop_mult"] = mult
            params = [p for p in mod.parameters() if p.requires_grad]
            self.time_passes(rows, mod, inputs, params, attn + lin, 3.5 * attn + 3 * lin, getattr(mod, "aux_loss", None))

        self.guarded(rows, run)

    def attn_function(self, section, group, setting, label, owner, where, default_mult, cfg, B, T):
        rows = self.new_rows(section, group, setting, "function", label, ["fwd", "fwd+bwd"], ra_R=cfg.ra_R, T=T)
        dev, H, D = self.device, cfg.n_head, cfg.head_dim

        def run():
            if label in GPU_ONLY and dev.type != "cuda":
                raise Skip(f"no CUDA GPU: {GPU_ONLY[label]}")
            ex = function_extras(cfg, D, dev, self.dtype)
            fn = load_function(where, ex)
            try:
                mult = float(getattr(attention.get_class(owner), "attn_flop_mult", default_mult))
            except Exception:  # owner not registered (yet)
                mult = default_mult
            attn = 4 * B * H * T * T * D / 2 * mult
            t = lambda **kw: randn(B, H, T, D, device=dev, dtype=self.dtype, **kw)
            inputs = [(tuple(t(requires_grad=True) for _ in "qkv"), t()) for _ in range(self.args.n_inputs)]
            for r in rows:
                r["params"]["attn_flop_mult"] = mult
            self.time_passes(rows, lambda q, k, v: fn(q, k, v, ex), inputs, [ex["a"], ex["b"], ex["W"]],
                             attn, 3.5 * attn)

        self.guarded(rows, run)

    def functions_for(self, names):
        """FUNCTIONS whose variant is in names; with no --variants, also those whose variant is not registered."""
        return [f for f in FUNCTIONS if f[1] in names or (not self.args.variants and f[1] not in variant_names())]

    def attn_all(self, section, group, setting, names, functions, cfg, B, T):
        for name in names:
            self.attn_module(section, group, setting, name, cfg, B, T)
        for label, owner, where, mult in functions:
            self.attn_function(section, group, setting, label, owner, where, mult, cfg, B, T)

    def not_registered(self, section, setting, name):
        for r in self.new_rows(section, section, setting, "module", name, ["fwd", "fwd+bwd"]):
            r["status"] = "skipped: not registered"
        self.save()

    # -- training step ---------------------------------------------------------

    def step(self, name, cfg, B, T, compiled, timed=True):
        """The training step of one variant: build it, run the first step and, if timed, time it.
        Returns (row, train_step) (train_step None if it failed), for --interleave to time later."""
        a, dev = self.args, self.device
        graphed = a.cuda_graph and dev.type == "cuda"
        passes = ("compile" if compiled else "eager") + ("+graph" if graphed else "")
        rows = self.new_rows("step", "step", "", "model", name, [passes], B=B, T=T)
        row = rows[0]
        built = {}

        def run():
            if compiled and timed:  # a fresh cache per model (else the recompile limit falls back to eager)
                torch._dynamo.reset()
                free_memory(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with (dev if not self.capture_failed else contextlib.nullcontext()):  # on the device: faster; see randn()
                model = build_model(name, cfg).to(dev).train()
            if graphed and self.step_pool is None:  # one memory pool for every variant's graph (never concurrent)
                self.step_pool = torch.cuda.graph_pool_handle()
            train_step = make_train_step(model, cfg, B, T, compiled, self.autocast, a.n_inputs, graphed=graphed,
                                         graph_pool=self.step_pool)
            t0 = time.perf_counter()
            for _ in range(4 if graphed else 1):  # compilation, autotuning, allocator growth (and the capture)
                train_step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row["first_step_s"] = time.perf_counter() - t0
            fpt = model.flops_per_token(T)
            row["params"].update(n_params=model.num_params(), flops_per_token=fpt)
            if dev.type == "cuda":
                row["mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if not timed:
                built["train_step"] = train_step
                return
            self.finish_step(row, time_ms(train_step, a.step_warmup, a.step_reps, dev), train_step)

        self.guarded(rows, run)
        return row, built.get("train_step")

    def finish_step(self, row, ms, train_step):
        a = self.args
        B, T = row["params"]["B"], row["params"]["T"]
        row["ms"] = ms
        row["tokens_per_s"] = B * T / (ms * 1e-3)
        row["tflops"] = row["params"]["flops_per_token"] * row["tokens_per_s"] / 1e12
        row["mfu"] = row["tflops"] * 1e12 / a.peak_flops if a.peak_flops else None
        if a.profile and self.device.type == "cuda":  # after the timing: the profiler's overhead is not in it
            row["profile"] = profile_kernels(train_step, a.profile)
        row["status"] = "ok"

    def interleaved_steps(self, names, cfg, B, T, compiled):
        """--interleave N: build every variant's step first, then time them in N rounds, each round
        every variant for step_reps/N steps (rotated order), so slow drifts of the machine (clocks,
        heat, neighbours) hit all variants alike. Ratios to sdpa are then taken per round and the
        median reported with their range: a ~1% difference needs that pairing to be seen at all."""
        a, dev = self.args, self.device
        if compiled:  # every model stays compiled at once: one dynamo cache entry each
            torch._dynamo.reset()
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(names) + 4)
        built = [(row, fn) for row, fn in (self.step(n, cfg, B, T, compiled, timed=False) for n in names) if fn]
        per_round = max(2, a.step_reps // a.interleave)
        for r in range(a.interleave):
            k = r % len(built)
            for row, fn in built[k:] + built[:k]:
                try:
                    row.setdefault("rounds_ms", []).append(time_ms(fn, 2, per_round, dev))
                except Exception as e:  # noqa: BLE001 - one variant must not end the run
                    row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        base = next((row for row, _ in built if row["variant"] == "sdpa" and row["status"] == "pending"), None)
        for row, fn in built:
            if row["status"] != "pending":
                continue
            self.finish_step(row, statistics.median(row["rounds_ms"]), fn)
            if base is not None:
                paired = [m / b for m, b in zip(row["rounds_ms"], base["rounds_ms"])]
                row["ratio_paired"] = statistics.median(paired)
                row["ratio_range"] = [min(paired), max(paired)]
        self.save()
        del built
        torch._dynamo.reset()
        free_memory(dev)

    def add_ratios(self):
        base = {(r["group"], r["kind"], r["passes"]): r["ms"] for r in self.rows
                if r["variant"] == "sdpa" and r["status"] == "ok"}
        for r in self.rows:
            b = base.get((r["group"], r["kind"], r["passes"]))
            r["ratio"] = r["ms"] / b if (b and r["ms"] is not None) else None


# ----------------------------------------------------------------------------
# sections

def section_attn(bench, names, cfg, B, T):
    bench.attn_all("attn", "attn", "", names, bench.functions_for(names), cfg, B, T)


def section_step(bench, names, cfg, B, T):
    for compiled in [m for m in ([False, True] if bench.args.compile else [False]) if m or bench.args.eager]:
        if bench.args.interleave:
            bench.interleaved_steps(names, cfg, B, T, compiled)
            continue
        for name in names:
            bench.step(name, cfg, B, T, compiled)
    torch._dynamo.reset()  # its caches hold the last compiled model


def sweep_R(bench, names, cfg, B, T):
    """The roadmap's benchmark_same_flop_ratios: folded ra_same_flop and the roadmap's unfused form."""
    bench.attn_all("sweep_R", "sweep_R", "", ["sdpa"], [FUNCTIONS[0]], cfg, B, T)
    swept = ["ra_same_flop", "roadmap_unfused"]
    for R in (4, 8, 12, 16):
        for name in swept:
            if name not in variant_names():
                bench.not_registered("sweep_R", f"R={R}", name)
            elif name in names:
                bench.attn_all("sweep_R", "sweep_R", f"R={R}", [name], [f for f in FUNCTIONS if f[1] == name],
                               dataclasses.replace(cfg, ra_R=R), B, T)


def sweep_T(bench, names, cfg, B, T):
    for t in (T, 2 * T, 4 * T):
        bench.attn_all("sweep_T", f"sweep_T/T={t}", f"T={t}", names, bench.functions_for(names),
                       dataclasses.replace(cfg, block_size=t), B, t)


def ra_heads_setter(mask):
    """Make the heads in mask (bool [H]) RA heads, through the module's set_heads_mask(mask)."""
    def prepare(mod):
        mod.set_heads_mask(mask.to(next(mod.parameters()).device))
    return prepare


def head_selective_names():
    """The registered variants that declare head_selective (attention/__init__.py), in registry order;
    one whose module cannot be imported here is left out."""
    out = []
    for name in attention.names():
        try:
            if attention.get_class(name).head_selective:
                out.append(name)
        except ImportError:
            pass
    return out


def sweep_heads(bench, names, cfg, B, T):
    bench.attn_module("sweep_heads", "sweep_heads", "", "sdpa", cfg, B, T)
    for name in head_selective_names():
        if bench.args.variants and name not in names:
            continue
        for frac in (0.0, 0.25, 0.5, 1.0):
            k = round(frac * cfg.n_head)
            mask = torch.arange(cfg.n_head) < k
            bench.attn_module("sweep_heads", "sweep_heads", f"ra_heads={k}/{cfg.n_head}", name, cfg, B, T,
                              prepare=ra_heads_setter(mask))


SWEEPS = {"R": sweep_R, "T": sweep_T, "heads": sweep_heads}


# ----------------------------------------------------------------------------
# output

def fmt(v, spec):
    return "" if v is None else format(v, spec)


def fmt_flops(v):
    return "" if v is None else (f"{v:.1f}" if v >= 1 else f"{v:.3g}")


def markdown(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])


def status(r):
    return r["status"] + (f" -- printed: {r['note']}" if r.get("note") else "")


def section_table(rows):
    if rows[0]["section"] == "step":
        header = ["variant", "mode", "ms/step", "tokens/s", "TFLOP/s", "MFU", "x sdpa", "peak MiB", "1st step s", "status"]
        lines = [[r["variant"], r["passes"], fmt(r["ms"], ".2f"), fmt(r.get("tokens_per_s"), ",.0f"),
                  fmt_flops(r["tflops"]), fmt(r.get("mfu"), ".1%"), fmt(r["ratio"], ".3f"),
                  fmt(r["mem_mib"], ",.0f"), fmt(r.get("first_step_s"), ".1f"), status(r)] for r in rows]
        if any("ratio_paired" in r for r in rows):  # --interleave
            header.insert(7, "x sdpa paired [range]")
            for line, r in zip(lines, rows):
                rng = r.get("ratio_range")
                line.insert(7, f"{r['ratio_paired']:.3f} [{rng[0]:.3f}, {rng[1]:.3f}]" if "ratio_paired" in r else "")
    else:
        header = ["kind", "variant", "setting", "pass", "ms", "TFLOP/s", "x sdpa", "mem MiB", "timing", "status"]
        lines = [[r["kind"], r["variant"], r["setting"], r["passes"], fmt(r["ms"], ".3f"), fmt_flops(r["tflops"]),
                  fmt(r["ratio"], ".3f"), fmt(r["mem_mib"], ",.0f"), r.get("timing", ""), status(r)] for r in rows]
    return markdown(header, lines)


def profile_table(rows):
    """Where the step time goes (--profile): kernel ms per category, and each variant's difference
    to sdpa in the same mode, so "1.02x" becomes "+0.4 ms of compiled kernels, +0.3 ms idle"."""
    rows = [r for r in rows if r.get("profile")]
    if not rows:
        return ""
    cats = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
    base = {r["passes"]: r for r in rows if r["variant"] == "sdpa"}

    def cells(r):
        p = r["profile"]
        return [r["ms"], p["total_ms"], r["ms"] - p["total_ms"]] + [p["categories"].get(c, 0.0) for c in cats]

    lines, tops = [], []
    for r in rows:
        own = cells(r)
        lines.append([r["variant"], r["passes"]] + [f"{v:.2f}" for v in own])
        b = base.get(r["passes"])
        if b is not None and b is not r:
            lines.append(["", "- sdpa"] + [f"{v - w:+.2f}" for v, w in zip(own, cells(b))])
        tops.append(f"{r['variant']} ({r['passes']}): " + "; ".join(
            f"{ms:.2f} ms x{n:g} {name[:60]}" for ms, n, name in r["profile"]["top"][:6]))
    table = markdown(["variant", "mode", "step ms", "kernels ms", "GPU idle ms"] + [f"{c} ms" for c in cats], lines)
    return table + "\n\ntop kernels per step:\n" + "\n".join("  " + t for t in tops)


def summary(bench):
    """One line per variant (ratios to sdpa), then one line per sweep setting."""
    rows, out = bench.rows, []
    get = lambda **kw: next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)
    cell = lambda r: "" if r is None else (f"{r['ratio']:.2f}x" if r["ratio"] is not None else r["status"].split(":")[0])
    top = [r for r in rows if r["section"] in ("attn", "step")]
    fn_of = {owner: label for label, owner, _, _ in FUNCTIONS}  # a variant's line shows its function's ratio
    names = list(dict.fromkeys(r["variant"] for r in top if r["kind"] != "function"))
    names += [r["variant"] for r in top if r["kind"] == "function" and r["passes"] == "fwd"
              and not any(fn_of.get(n) == r["variant"] for n in names)]
    if names:
        lines = []
        for n in names:
            m = dict(section="attn", variant=n, kind="module")
            f = get(section="attn", variant=fn_of.get(n, n), kind="function", passes="fwd+bwd")
            st, sc = (next((r for r in rows if r["section"] == "step" and r["variant"] == n
                            and r["passes"].split("+")[0] == mode), None) for mode in ("eager", "compile"))
            bad = sorted((status(r) for r in top if r["variant"] in (n, fn_of.get(n)) and status(r) != "ok"),
                         key=lambda s: s.startswith("ok"))  # errors before notices
            lines.append([n, cell(get(**m, passes="fwd")), cell(get(**m, passes="fwd+bwd")), cell(f),
                          fmt(st and st["ms"], ".1f"), cell(st), fmt(st and st.get("mfu"), ".1%"),
                          fmt(sc and sc["ms"], ".1f"), cell(sc), (bad[0][:80] if bad else "ok")])
        out.append(markdown(["variant", "attn fwd", "attn f+b", "its fn f+b", "step ms", "step", "MFU",
                             "compile ms", "compile", "status"], lines))
    for sec in dict.fromkeys(r["section"] for r in rows if r["section"].startswith("sweep")):
        sweep = [r for r in rows if r["section"] == sec and r["passes"] == "fwd+bwd"]
        settings = list(dict.fromkeys(r["setting"] for r in sweep if r["setting"]))
        lines = []
        for kind, n in dict.fromkeys((r["kind"], r["variant"]) for r in sweep):
            cells = [cell(get(section=sec, kind=kind, variant=n, setting=st, passes="fwd+bwd")) for st in settings]
            base = get(section=sec, kind=kind, variant=n, setting="", passes="fwd+bwd")
            if base:  # a baseline measured once for the whole sweep
                cells = [f"{base['ms']:.3f} ms" if base["ms"] else cell(base)] + [""] * (len(settings) - 1)
            lines.append([f"{kind} {n}"] + cells)
        out.append(markdown([f"{sec}, fwd+bwd"] + settings, lines))
    return "\n\n".join(out)


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if sha.returncode == 0 else None
    except Exception:
        return None


def meta(args, device):
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cuda = device.type == "cuda"
    return dict(device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
                smoke=not cuda, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_commit(), argv=args.argv, dtype=args.dtype, peak_flops=args.peak_flops,
                shapes=dict(attn=dict(B=args.B, H=args.H, T=args.T, D=args.D),
                            step=dict(batch=args.batch, T=args.step_T, n_layer=args.n_layer, n_head=args.n_head,
                                      n_embd=args.n_embd, vocab_size=args.vocab_size)),
                timing=dict(warmup=args.warmup, reps=args.reps, step_warmup=args.step_warmup,
                            step_reps=args.step_reps, n_inputs=args.n_inputs,
                            attn="cuda graph replays" if (cuda and args.graphs) else "eager calls",
                            step="one CUDA graph per step" if (cuda and args.cuda_graph) else "launched from Python"),
                cfg=args.cfg)


# ----------------------------------------------------------------------------

GPU_DEFAULTS = dict(B=8, H=12, T=1024, D=64, batch=16, step_T=1024, n_layer=12, n_head=12, n_embd=768,
                    vocab_size=50257, warmup=10, reps=50, step_warmup=5, step_reps=20, n_inputs=4, dtype="bf16")
CPU_DEFAULTS = dict(B=2, H=4, T=64, D=32, batch=2, step_T=64, n_layer=2, n_head=2, n_embd=64,
                    vocab_size=1024, warmup=1, reps=3, step_warmup=1, step_reps=3, n_inputs=2, dtype="fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", help="comma list of attn, step, all (default: attn,step; none if --sweep is given)")
    p.add_argument("--sweep", action="append", default=[], help="R, T or heads (repeat or comma list)")
    p.add_argument("--variants", help="comma list of variants (sdpa is always measured as the baseline)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: smoke run with tiny defaults)")
    p.add_argument("--dtype", choices=DTYPES, help="autocast dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="step: also time torch.compile(model)")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="step: build all variants, then time them in N alternating rounds; reports the median "
                        "of the per-round ratios to sdpa and their range")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="step: also run N steps under torch.profiler and print where the GPU time goes")
    p.add_argument("--no-eager", dest="eager", action="store_false", help="step: only the compiled rows (with --compile)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="step: replay each training step as one CUDA graph, as train.py --cuda-graph (GPU only)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="attn/sweeps: time eager calls with CUDA events instead of CUDA-graph replays")
    p.add_argument("--out", help="write the JSON here (rewritten after every section)")
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: table by device name)")
    p.add_argument("--cfg", action="append", default=[], metavar="KEY=VALUE", help="GPTConfig override, e.g. ra_R=12")
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

    fields = {f.name: f for f in dataclasses.fields(GPTConfig)}
    overrides = {}
    for kv in args.cfg:
        key, _, val = kv.partition("=")
        if key not in fields or not _:
            p.error(f"--cfg {kv!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        typ = type(fields[key].default)
        overrides[key] = val.lower() in ("1", "true", "yes") if typ is bool else typ(val)
    args.overrides = overrides
    if args.peak_flops is None and args.device == "cuda":
        try:
            from train import peak_flops  # its table of dense bf16 peaks by device name
            args.peak_flops = peak_flops(torch.device("cuda"))
        except Exception as e:
            print(f"[bench] no peak FLOP/s for MFU (train.peak_flops: {e}); pass --peak-flops", file=sys.stderr)
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    smoke = device.type == "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    info = meta(args, device)
    bench = Bench(args, device, dtype, info)
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
