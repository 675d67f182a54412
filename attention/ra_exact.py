"""
ra_exact: exact reciprocal attention (RA).

Per head h, query i, key j <= i:
    s_ij = (a_h q_i.k_j + b_h q_j.k_i) / sqrt(D)
    y_i  = sum_{j <= i} softmax_j(s_ij) v_j
The reciprocal term q_j.k_i is how strongly key position j's query would attend to
i's key: a pair scores high when either side looks for the other.

Computed by functional.reciprocal_attention: one SDPA call over q' = [q, k],
k' = [a k, b q] (head dim 2D, V keeps D), so the QK product is twice as wide:
attention FLOPs are 1.5x the baseline's (attn_flop_mult). PyTorch's own backend
choice, and cuDNN (sdpa_backend cudnn), take Dqk != Dv; a forced flash backend, which
needs equal head dims, gets V padded to 2D instead (reciprocal_attention_padded_v: 2x
FLOPs, still one fused kernel).

a, b: learnable per head, unconstrained (a negative b, "anti-reciprocal", is allowed:
the folded product needs no square root). Init a = ra_w_std_init (default 1), b = ra_b_init
(default 0): the module then computes exactly sdpa's function, and b still gets a gradient
(s_ij is linear in b), so the reciprocal term grows only as far as the task asks for it
(docs/fair-starts.md). --ra-w-std-init 0.5 --ra-b-init 0.3 is the roadmap's start.
Attention-probability dropout is not applied (the fused call has no dropout
argument); residual dropout is.
"""

import math

import torch
import torch.nn as nn

from attention.functional import (
    backend_context, merge_heads, reciprocal_attention, reciprocal_attention_padded_v, split_heads,
)
from attention.projections import add_projections


@torch.no_grad()
def perturb_ab_(a, b, generator):
    """Exact RA's gates for the causality test: a in [0.5, 1.5]; b of either sign with |b| in [0.3, 1], away
    from b = 0 (no reciprocal term). a, b: (nh,) parameters, set in place."""
    n = a.numel()
    a.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=generator))
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    b.copy_(sign * torch.empty(n).uniform_(0.3, 1.0, generator=generator))


class ExactRA(nn.Module):
    # the contract (attention/__init__.py); a, b unconstrained
    ra_family = True
    attn_flop_mult = 1.5  # QK^T over 2D dims (2x) + PV over D dims (1x), vs 1 + 1
    options = ("sdpa_backend", "ra_w_std_init", "ra_b_init")
    gate_ranges = {"a": (-math.inf, None), "b": (-math.inf, None)}
    head_selective = False

    def __init__(self, cfg):
        super().__init__()
        self.backend = cfg.sdpa_backend
        self.a_init = cfg.ra_w_std_init
        self.b_init = cfg.ra_b_init
        add_projections(self, cfg)  # n_head, n_embd, c_attn, c_proj, resid_dropout
        self.a = nn.Parameter(torch.empty(cfg.n_head))  # weight of q_i.k_j
        self.b = nn.Parameter(torch.empty(cfg.n_head))  # weight of q_j.k_i
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        self.a.fill_(self.a_init)
        self.b.fill_(self.b_init)

    def heads(self, x):
        """Per-head attention output (B, nh, T, hs), before the output projection."""
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        # flash needs equal qk/v head dims (cuDNN does not): pad V rather than leave the fused kernel
        ra = reciprocal_attention_padded_v if self.backend == "flash" else reciprocal_attention
        with backend_context(self.backend):
            return ra(q, k, v, self.a, self.b)  # scale 1/sqrt(hs)

    def forward(self, x):
        return self.resid_dropout(self.c_proj(merge_heads(self.heads(x))))

    def metrics(self):
        return {"a": self.a.detach().mean(), "b": self.b.detach().mean()}

    def gates(self):
        return {"a": self.a.detach(), "b": self.b.detach()}  # each (nh,)

    def perturb_gates_(self, generator):
        perturb_ab_(self.a, self.b, generator)
