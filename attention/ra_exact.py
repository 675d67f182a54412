"""
ra_exact: exact reciprocal attention (RA).

Per head h, query i, key j <= i:
    s_ij = (a_h q_i.k_j + b_h q_j.k_i) / sqrt(D)
    y_i  = sum_{j <= i} softmax_j(s_ij) v_j
The reciprocal term q_j.k_i is how strongly key position j's query would attend to
i's key: a pair scores high when either side looks for the other.

Computed as functional.reciprocal_attention does: one SDPA call over q' = [q, k],
k' = [a k, b q] (head dim 2D, V keeps D), so the QK product is twice as wide:
attention FLOPs are 1.5x the baseline's (attn_flop_mult). PyTorch's own backend
choice, and cuDNN (sdpa_backend cudnn), take Dqk != Dv; a forced flash backend, which
needs equal head dims, gets V padded to 2D instead (reciprocal_attention_padded_v: 2x
FLOPs, still one fused kernel).

Operands (ra_exact_operands). "dense" (the default): the projection emits q' itself, c_attn's q and k
weight rows gathered per forward into the order [q_0, k_0, q_1, k_1, ...] (the parameter keeps sdpa's
[q | k | v] layout and init), applied as two products, q' from those 2C rows and v from the last C
rows as they are, so that q' and v are each dense in (B, T, H, .) order; k' = [a k, b q] is q' with its two
halves swapped and scaled, one pass, in the same order. cuDNN allocates its output and its gradients
in the order of its inputs, so the projection's gradient comes back in the projection's own layout
and is assembled without a transpose (the faster of the two on an H200: docs/bench.md). "cat"
builds q' = [q, k] and k' = [a k, b q] from the views q, k of one (B, T, 3C) projection output (two
copies forward; their gradients are split back): the plain form. Same function, same gradients.

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
import torch.nn.functional as F

from attention.functional import (
    backend_context, folded_attention, folded_attention_padded_v, merge_heads, ra_operands, ra_operands_dense,
    split_heads,
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


def attend_folded(qf, kf, v, backend="auto"):
    """Causal attention over the folded operands q', k' (B, n, T, 2 hs) and v (B, n, T, hs), scale 1/sqrt(hs), on
    `backend`. flash needs equal qk/v head dims (cuDNN does not): V padded rather than leaving the fused kernel."""
    attend = folded_attention_padded_v if backend == "flash" else folded_attention
    with backend_context(backend):
        return attend(qf, kf, v, v.size(-1) ** -0.5)


class ExactRA(nn.Module):
    # the contract (attention/__init__.py); a, b unconstrained
    ra_family = True
    attn_flop_mult = 1.5  # QK^T over 2D dims (2x) + PV over D dims (1x), vs 1 + 1
    options = ("sdpa_backend", "ra_w_std_init", "ra_b_init", "ra_exact_operands")
    gate_ranges = {"a": (-math.inf, None), "b": (-math.inf, None)}
    head_selective = False

    def __init__(self, cfg):
        super().__init__()
        self.backend = cfg.sdpa_backend
        self.a_init = cfg.ra_w_std_init
        self.b_init = cfg.ra_b_init
        if cfg.ra_exact_operands not in ("dense", "cat"):
            raise ValueError(f"ra_exact: ra_exact_operands={cfg.ra_exact_operands!r}; use dense or cat")
        self.operands = cfg.ra_exact_operands
        add_projections(self, cfg)  # n_head, n_embd, c_attn, c_proj, resid_dropout
        self.a = nn.Parameter(torch.empty(cfg.n_head))  # weight of q_i.k_j
        self.b = nn.Parameter(torch.empty(cfg.n_head))  # weight of q_j.k_i
        self.reset_parameters()
        if self.operands == "dense":  # c_attn's q and k rows in the order [q_0, k_0, q_1, k_1, ...]
            C, H = cfg.n_embd, cfg.n_head
            rows = torch.arange(2 * C).view(2, H, C // H).transpose(0, 1).reshape(-1)  # head h: q_h rows, k_h rows
            self.register_buffer("qk_rows", rows, persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        self.a.fill_(self.a_init)
        self.b.fill_(self.b_init)

    def heads(self, x):
        """Per-head attention output (B, nh, T, hs), before the output projection."""
        if self.operands == "dense":
            return self.heads_dense(x, self.a, self.b)
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        return self.exact(q, k, v, self.a, self.b)

    def exact(self, q, k, v, a, b):
        """Exact RA on (B, n, T, hs) q, k, v with (n,) weights a, b: the folded operands, then attend()."""
        qf, kf = ra_operands(q, k, a, b)  # (B, n, T, 2 hs)
        return self.attend(qf, kf, v)

    def attend(self, qf, kf, v):
        return attend_folded(qf, kf, v, self.backend)

    def heads_dense(self, x, a, b):
        """heads() with q', k', v each dense in (B, T, H, .) order (ra_exact_operands=dense), weights a, b (nh,)."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        w, bias = self.c_attn.weight, self.c_attn.bias
        qk = F.linear(x, w.index_select(0, self.qk_rows), None if bias is None else bias.index_select(0, self.qk_rows))
        qk = qk.view(B, T, H, 2 * D)  # q': [q_h, k_h] per head
        v = F.linear(x, w[2 * C:], None if bias is None else bias[2 * C:]).view(B, T, H, D)  # v's rows need no gather
        return self.attend(*ra_operands_dense(qk, v, a, b))  # cuDNN's output keeps (B, T, H, .) order

    def forward(self, x):
        return self.resid_dropout(self.c_proj(merge_heads(self.heads(x))))

    def metrics(self):
        return {"a": self.a.detach().mean(), "b": self.b.detach().mean()}

    def gates(self):
        return {"a": self.a.detach(), "b": self.b.detach()}  # each (nh,)

    def perturb_gates_(self, generator):
        perturb_ab_(self.a, self.b, generator)
