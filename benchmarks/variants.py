"""What bench.py measures: the registered attention variants plus the roadmap's unfused form, the
bare attention functions (with their arguments filled by name), and Skip, a row's reason not to run."""

import dataclasses
import importlib
import inspect
import math

import torch
import torch.nn as nn

import attention
from attention.functional import ra_operands_dense, sdpa_causal
from model import GPT

from .timing import randn


class Skip(Exception):
    """A variant that does not apply here (missing, not registered, no gate): a reason, not an error."""



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

# The cost floor of exact RA through SDPA: q' = [q, k] and k' = [a k, b q] (head dim 2D, see
# functional.ra_operands) handed over pre-built, so only SDPA is timed and the gradients are those of q', k', v.
# The scale is v's 1/sqrt(D): SDPA's default would take 1/sqrt(2D) from q'.

def exact_ra_bound(qf, kf, v, backend="auto"):
    return sdpa_causal(qf, kf, v, backend=backend, scale=v.size(-1) ** -0.5)


# sweep exact's rows: plain SDPA (the baseline), the bound on (2D, 2D, D) inputs, today's fold, the CTR kernel
_by_label = {f[0]: f for f in FUNCTIONS}
EXACT_FUNCTIONS = [_by_label["sdpa"],
                   ("exact bound", "ra_exact", lambda q, k, v, ex: exact_ra_bound(q, k, v, ex["backend"]), 1.5),
                   _by_label["reciprocal_attention"], _by_label["ctr_attention"]]

# #17's span: from the projection's output to the attention's output, operand building included.
# sdpa's: q, k, v as views of one (B, T, 3, H, D) projection output (the (B, T, 3C) of the modules);
# ra_exact's (operands "dense"): q' (B, T, H, 2D) and v (B, T, H, D) from the projection, k' built from q'.
# Each row: (label, owner, function of (inputs..., extras), default flop mult, input shapes after (B, T)).

def sdpa_span(qkv, backend="auto"):
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views
    return sdpa_causal(q, k, v, backend=backend)


def exact_span_dense(qk, v, a, b, backend="auto"):
    return exact_ra_bound(*ra_operands_dense(qk, v, a, b), backend)


def headsel_span(qk, v_ra, qkv_plain, ex, streams):
    """ra_exact_headsel's attention with a quarter of the heads RA heads (its projection outputs in, the two groups'
    calls, on two CUDA streams or one after the other)."""
    from attention.ra_exact_headsel import group_attention
    K = v_ra.size(2)
    return group_attention(qk, v_ra, qkv_plain, ex["a"][:K], ex["b"][:K], ex["backend"], streams)


def _quarter(H):
    return max(1, H // 4)


SPAN_FUNCTIONS = [
    ("sdpa span", "sdpa", lambda qkv, ex: sdpa_span(qkv, ex["backend"]), 1.0, lambda H, D: [(3, H, D)]),
    ("exact span (dense)", "ra_exact", lambda qk, v, ex: exact_span_dense(qk, v, ex["a"], ex["b"], ex["backend"]),
     1.5, lambda H, D: [(H, 2 * D), (H, D)]),
] + [
    # #17's head-selective target: 25% RA heads. FLOPs 1 + 0.5 K / H of plain attention (the mult given here).
    (f"headsel span (1/4 RA, {n} stream{'s' if n > 1 else ''})", "ra_exact_headsel",
     lambda qk, v, rest, ex, n=n: headsel_span(qk, v, rest, ex, n), 1.125,
     lambda H, D: [(_quarter(H), 2 * D), (_quarter(H), D), (3 * (H - _quarter(H)) * D,)])
    for n in (2, 1)
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
