"""
ra_same_flop: reciprocal attention at the baseline's attention FLOPs.

Exact RA scores s_ij = a q_i.k_j + b q_j.k_i (see ra_exact.py) need a 2D-wide QK.
Same-FLOP RA keeps head dim D and gives the last R dims of every head to a rank-R
reciprocal channel, through a low-rank W (D, R) shared by the heads of the layer:

    Qf = [s_std * Q[..., :D-R], s_rec * (K @ W)]                   (B, nh, T, hs)
    Kf = [s_std * K[..., :D-R], s_rec * (Q @ W)]
    Qf_i . Kf_j = w_std q_i[:D-R].k_j[:D-R] + w_rec (k_i W).(q_j W)
    y_i = sum_{j <= i} softmax_j(Qf_i . Kf_j / sqrt(D)) v_j

Per-head weights: the module learns amplitudes s_std, s_rec (H,) and w = s^2. This
keeps w >= 0 without a clamp (which would kill the gradient at 0) or abs/sqrt
(whose gradient blows up as w -> 0), and the fold below needs s, never sqrt(w).
Init: s = sqrt(ra_w_std_init), sqrt(ra_w_rec_init); W ~ N(0, 0.02). The defaults (w_std = 1,
w_rec = 0.3) start as close to sdpa as this math allows: the standard term at sdpa's strength, so
the only difference is the R standard dims the channel replaces (w_std = 1 is the least-squares
best scale for the D-R that remain) plus a reciprocal term that is second order in the small W
(about 1% of the logits of GPT-2 124M at init). w_rec > 0 because s_rec = 0 has no gradient
(d w/d s = 2 s) and W's gradient is proportional to w_rec. docs/fair-starts.md has the measurements.

Fused path (ra_fused, the default): K @ W = x @ (Wk_h^T W) + bk_h W, so the reciprocal
channel is just different rows of the QKV weight. Each forward folds W and the
amplitudes into the weight (fold.fold_same_flop_qkv, an autograd Function: one
batched matmul plus one pointwise pass forward, a hand-written backward of ~5 fused
kernels), then ONE F.linear emits Qf, Kf, V and ONE SDPA call attends: no activation
concat, no host sync.
Unfused path (ra_fused=False): Q, K, V from c_attn, then Qf, Kf built from the
activations (functional.same_flop_qk); same function, kept as the reference.

ra_quant=int8 fake-quantizes the R reciprocal columns of Qf and Kf (per-row absmax,
straight-through gradient), as a low-precision kernel would store them.

This class is also the base of ra_headsel (per-head routing: rec_on) and
ra_tokensel (per-token query gate: split_qkv).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention.fold import fold_same_flop_qkv
from attention.functional import (
    RA_QUANT_MODES, check_ra_quant, merge_heads, quantize_rec, same_flop_qk, sdpa_causal, split_heads,
)
from attention.projections import add_projections


class SameFlopRA(nn.Module):
    # the contract (attention/__init__.py)
    ra_family = True
    attn_flop_mult = 1.0  # the reciprocal channel lives inside the head dim
    options = ("sdpa_backend", "ra_R", "ra_fused", "ra_w_std_init", "ra_w_rec_init", "ra_quant")
    gate_ranges = {"w_std": (0.0, None), "w_rec": (0.0, None)}  # w = s^2
    head_selective = False
    name = "ra_same_flop"

    def __init__(self, cfg):
        super().__init__()
        D = cfg.n_embd // cfg.n_head
        if not 1 <= cfg.ra_R <= D - 1:
            raise ValueError(
                f"{self.name}: ra_R={cfg.ra_R} must be in [1, head_dim - 1] = [1, {D - 1}]: head_dim = "
                f"n_embd / n_head = {D} and D_std = head_dim - ra_R = {D - cfg.ra_R} standard dims must be >= 1")
        for name in ("ra_w_std_init", "ra_w_rec_init"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"{self.name}: {name}={getattr(cfg, name)} must be >= 0 (it is a weight w = s^2)")
        check_ra_quant(cfg.ra_quant, RA_QUANT_MODES, where=self.name)
        self.R = cfg.ra_R
        self.fused = cfg.ra_fused
        self.quant = cfg.ra_quant
        self.backend = cfg.sdpa_backend
        self.dropout = cfg.dropout
        self.w_std_init = cfg.ra_w_std_init
        self.w_rec_init = cfg.ra_w_rec_init
        add_projections(self, cfg)  # n_head, n_embd, c_attn, c_proj, resid_dropout
        self.W = nn.Parameter(torch.empty(D, self.R))  # reciprocal projection, shared by the layer's heads
        self.s_std = nn.Parameter(torch.empty(cfg.n_head))  # amplitudes: w_std = s_std^2
        self.s_rec = nn.Parameter(torch.empty(cfg.n_head))  # w_rec = s_rec^2
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.W, mean=0.0, std=0.02)
        self.s_std.fill_(math.sqrt(self.w_std_init))
        self.s_rec.fill_(math.sqrt(self.w_rec_init))

    @property
    def w_std(self):
        return self.s_std.square()  # (nh,)

    @property
    def w_rec(self):
        return self.s_rec.square()  # (nh,)

    def rec_on(self):
        """(nh,) bool on the device, or None: which heads use the reciprocal channel (all here)."""
        return None

    def split_qkv(self, x, qkv):
        """Projection output [Qf | Kf | V] (B*T, 3C), one row per token -> q, k, v, each (B, nh, T, hs),
        views of it (so q, k and v have equal strides, as sdpa's do). A hook: ra_tokensel gates its
        reciprocal query columns here, in place (a gate that built a separate q made the compiled
        step much slower: docs/bench.md)."""
        B, T, _ = x.shape
        return split_heads(qkv.view(B, T, -1), self.n_head)

    def qkv(self, x):
        """Block input (B, T, C) -> Qf, Kf, V, each (B, nh, T, hs)."""
        B, T, C = x.shape
        rec_on = self.rec_on()
        if self.fused:
            w, b = fold_same_flop_qkv(self.c_attn.weight, self.c_attn.bias, self.W, self.s_std, self.s_rec, rec_on)
            # a 2D input, so the output is a tensor of its own rather than a view (split_qkv may update it in place)
            qkv = F.linear(x.reshape(B * T, C), w, b)  # (B*T, 3C): already [Qf | Kf | V]
        else:
            q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
            q, k = same_flop_qk(q, k, self.W, self.s_std, self.s_rec, rec_on)
            # the reference: copies are fine
            qkv = torch.cat([merge_heads(t).view(B * T, C) for t in (q, k, v)], dim=-1)  # (B*T, 3C)
        q, k, v = self.split_qkv(x, qkv)  # each (B, nh, T, hs)
        q = quantize_rec(q, self.R, self.quant, rec_on)
        k = quantize_rec(k, self.R, self.quant, rec_on)
        return q, k, v

    def heads(self, x):
        """Per-head attention output (B, nh, T, hs), before the output projection."""
        q, k, v = self.qkv(x)
        dropout_p = self.dropout if self.training else 0.0
        return sdpa_causal(q, k, v, backend=self.backend, dropout_p=dropout_p)  # scale 1/sqrt(hs)

    def forward(self, x):
        return self.resid_dropout(self.c_proj(merge_heads(self.heads(x))))

    def metrics(self):
        return {"w_std": self.w_std.detach().mean(), "w_rec": self.w_rec.detach().mean()}

    def gates(self):
        return {"w_std": self.w_std.detach(), "w_rec": self.w_rec.detach()}  # each (nh,)

    @torch.no_grad()
    def perturb_gates_(self, generator):
        # amplitudes in [0.5, 1.5]: w in [0.25, 2.25], well away from w_rec = 0 (no reciprocal term)
        for s in (self.s_std, self.s_rec):
            s.copy_(torch.empty(s.shape).uniform_(0.5, 1.5, generator=generator))
