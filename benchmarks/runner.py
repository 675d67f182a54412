"""bench.py's runner: the Bench class holds the rows and measures them (attention module and function
rows at one shape, training-step rows eager, compiled, graphed or interleaved), one variant's failure
kept in its rows; the CUDA-context and graph-capture recovery lives here."""

import contextlib
import io
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn

import attention
from cuda_graph import CaptureError

from . import clocks
from .profile import profile_kernels
from .timing import HostSync, cycle, free_memory, randn, time_graph_ms, time_ms
from .variants import (
    FUNCTIONS, GPU_ONLY, Skip, build_attention, build_model, function_extras, head_selective_names, load_function,
    variant_names,
)


class Bench:
    """The rows of one bench.py run and how each is measured. A row is a dict (section, group, setting,
    kind, variant, passes, params, ms, tflops, ratio, mem_mib, status, ...); it is written to --out
    after every variant. make_train_step: bench.make_train_step (the step rows' training step)."""

    def __init__(self, args, device, dtype, meta, make_train_step):
        self.args, self.device, self.dtype, self.meta = args, device, dtype, meta
        self.make_train_step = make_train_step
        self.rows, self.dead = [], None  # dead: why the CUDA context can no longer be used
        self.shown = set()  # (variant, error) whose traceback went to stderr already
        self.capture_failed = None  # the row whose CUDA-graph capture failed (it breaks the CUDA RNG)
        self.step_pool = None  # the memory pool of the step graphs that --interleave keeps alive together
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
            if self.capture_failed and not skip and not isinstance(e, CaptureError):  # not the failed capture itself
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

    def attn_function(self, section, group, setting, label, owner, where, default_mult, cfg, B, T, dims=None,
                      shapes=None):
        """dims: the head dims of the (q, k, v) inputs (default: cfg.head_dim each); the exact-RA bound
        takes pre-built q', k' of head dim 2D. shapes: instead, the function's inputs are projection outputs
        of shape (B, T, *s) for each s in shapes (the span rows). FLOPs count the head dim D = cfg.head_dim."""
        rows = self.new_rows(section, group, setting, "function", label, ["fwd", "fwd+bwd"], ra_R=cfg.ra_R, T=T,
                             D=cfg.head_dim)
        dev, H, D = self.device, cfg.n_head, cfg.head_dim
        dims = dims or (D, D, D)

        def run():
            if label in GPU_ONLY and dev.type != "cuda":
                raise Skip(f"no CUDA GPU: {GPU_ONLY[label]}")
            ex = function_extras(cfg, D, dev, self.dtype)
            fn = load_function(where, ex)
            try:  # a span row states its own mult (a head-selective span runs part of its heads as RA heads)
                mult = default_mult if shapes else float(getattr(attention.get_class(owner), "attn_flop_mult",
                                                                 default_mult))
            except Exception:  # owner not registered (yet)
                mult = default_mult
            attn = 4 * B * H * T * T * D / 2 * mult
            t = lambda d, **kw: randn(B, H, T, d, device=dev, dtype=self.dtype, **kw)
            if shapes:  # projection outputs in, (B, H, T, D) out
                x = lambda s, **kw: randn(B, T, *s, device=dev, dtype=self.dtype, **kw)
                inputs = [(tuple(x(s, requires_grad=True) for s in shapes), t(D)) for _ in range(self.args.n_inputs)]
                for r in rows:
                    r["params"].update(attn_flop_mult=mult, input_shapes=[list(x.shape) for x in inputs[0][0]])
                self.time_passes(rows, lambda *xs: fn(*xs, ex), inputs, [ex["a"], ex["b"]], attn, 3.5 * attn)
                return
            inputs = [(tuple(t(d, requires_grad=True) for d in dims), t(dims[2])) for _ in range(self.args.n_inputs)]
            for r in rows:  # head_dims: what was timed, read off the inputs
                r["params"].update(attn_flop_mult=mult, head_dims=[x.size(-1) for x in inputs[0][0]])
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
        # --ra-heads K: the first K heads of every layer RA heads (head-selective variants only)
        ra_heads = a.ra_heads if a.ra_heads is not None and name in head_selective_names() else None
        setting = "" if ra_heads is None else f"ra_heads={ra_heads}/{cfg.n_head}"
        rows = self.new_rows("step", "step", setting, "model", name, [passes], B=B, T=T)
        row = rows[0]
        built = {}

        def run():
            if graphed and self.capture_failed:  # no capture works after a failed one
                raise Skip(f"the CUDA-graph capture of {self.capture_failed} failed earlier in this process and "
                           f"leaves the CUDA RNG unusable; rerun with --variants {name}")
            if compiled and timed:  # a fresh cache per model (else the recompile limit falls back to eager)
                torch._dynamo.reset()
                free_memory(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with (dev if not self.capture_failed else contextlib.nullcontext()):  # on the device: faster; see randn()
                model = build_model(name, cfg).to(dev).train()
            if ra_heads is not None:
                mask = torch.arange(cfg.n_head, device=dev) < ra_heads
                for block in model.transformer.h:
                    block.attn.set_heads_mask(mask)
            # --interleave keeps every variant's graph alive: one memory pool for them all (never replayed
            # concurrently). Timed one by one, each graph is freed before the next capture, and capturing into a
            # pool whose graphs were all freed trips an allocator assert: a private pool per graph (None).
            pool = None
            if graphed and not timed:
                if self.step_pool is None:
                    self.step_pool = torch.cuda.graph_pool_handle()
                pool = self.step_pool
            train_step = self.make_train_step(model, cfg, B, T, compiled, self.autocast, a.n_inputs, graphed=graphed,
                                              graph_pool=pool)
            t0 = time.perf_counter()
            try:
                for _ in range(4 if graphed else 1):  # compilation, autotuning, allocator growth (and the capture)
                    train_step()
            except CaptureError:  # later rows: no captures, models built on the CPU (see randn())
                self.capture_failed = f"{name} ({passes})"
                raise
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
            sampler = self.clock_sampler()
            with sampler:
                row["profile"] = profile_kernels(train_step, a.profile)
            if sampler.enabled:
                row.setdefault("clocks", {})["profiled"] = clocks.summary(sampler.samples)
        row["status"] = "ok"

    def clock_sampler(self):
        """--clocks: an nvidia-smi sampler of this run's GPU (benchmarks/clocks.py); else one that records nothing."""
        return clocks.Sampler(clocks.gpu_id(self.device) if self.args.clocks else None)

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
        samplers = {id(row): self.clock_sampler() for row, _ in built}  # --clocks: each variant's timed rounds
        for r in range(a.interleave):
            k = r % len(built)
            for row, fn in built[k:] + built[:k]:
                try:
                    with samplers[id(row)]:
                        row.setdefault("rounds_ms", []).append(time_ms(fn, 2, per_round, dev))
                except Exception as e:  # noqa: BLE001 - one variant must not end the run
                    row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
        for row, _ in built:
            if samplers[id(row)].enabled:
                row.setdefault("clocks", {})["timed"] = clocks.summary(samplers[id(row)].samples)
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
        self.step_pool = None  # its graphs are freed: the next call (compiled after eager) needs a new pool
        torch._dynamo.reset()
        free_memory(dev)

    def add_ratios(self):
        base = {(r["group"], r["kind"], r["passes"]): r["ms"] for r in self.rows
                if r["variant"] == "sdpa" and r["status"] == "ok"}
        for r in self.rows:
            b = base.get((r["group"], r["kind"], r["passes"]))
            r["ratio"] = r["ms"] / b if (b and r["ms"] is not None) else None
