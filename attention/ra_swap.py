"""
ra_swap: standard attention plus a gated "swapped" attention with the roles of q and k
exchanged, per head:

    y_i   = sum_{j <= i} softmax_j(q_i.k_j / sqrt(D)) v_j                  SDPA(q, k, v)
    r_i   = sum_{j <= i} softmax_j(k_i.q_j / sqrt(D)) v_j                  SDPA(k, q, v)
    out_i = y_i + tanh(beta) * LayerNorm(r_i)          ra_swap_norm="layernorm" (default)
    out_i = y_i + tanh(beta) * r_i                     ra_swap_norm="none"

r is causal like y (position i still only sees j <= i); its score k_i.q_j is the
reciprocal term of exact RA, here normalized by its own softmax instead of added to
the standard logits. LayerNorm (over each head's D dims, no affine; the published form)
puts r on unit scale so that beta alone sets the mix; tanh bounds it to (-1, 1).
Why "none" exists: r, like y, averages the v of every earlier position, so its spread
over D shrinks with i (GPT-2 124M at init: 0.54 at i = 0, 0.02 at i = 1023). LayerNorm
divides by that spread: the swapped term enters at up to ~50x y's scale as soon as beta
leaves 0, and so do its gradients into q, k and v. "none" keeps r on y's scale.
beta: one learnable scalar per layer, init 0, so the model starts as the baseline
(beta still gets a gradient at 0: d tanh/d beta = 1). Two SDPA calls: attention
FLOPs are 2x the baseline's.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention.functional import merge_heads, sdpa_causal, split_heads
from attention.projections import add_projections


class SwapRA(nn.Module):
    # the contract (attention/__init__.py); beta: (1,), one per layer, unconstrained (tanh bounds the mix)
    ra_family = True
    attn_flop_mult = 2.0  # two full causal attentions
    options = ("sdpa_backend", "ra_swap_norm")
    gate_ranges = {"beta": (-math.inf, None)}
    head_selective = False

    def __init__(self, cfg):
        super().__init__()
        if cfg.ra_swap_norm not in ("layernorm", "none"):
            raise ValueError(f"ra_swap: ra_swap_norm={cfg.ra_swap_norm!r}; use layernorm or none")
        self.norm = cfg.ra_swap_norm
        self.backend = cfg.sdpa_backend
        self.dropout = cfg.dropout
        add_projections(self, cfg)  # n_head, n_embd, c_attn, c_proj, resid_dropout
        self.beta = nn.Parameter(torch.zeros(1))  # mix of the swapped attention

    @torch.no_grad()
    def reset_parameters(self):
        self.beta.zero_()

    def heads(self, x):
        """Per-head attention output (B, nh, T, hs), before the output projection."""
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = sdpa_causal(q, k, v, backend=self.backend, dropout_p=dropout_p)  # (B, nh, T, hs)
        r = sdpa_causal(k, q, v, backend=self.backend, dropout_p=dropout_p)  # (B, nh, T, hs): k_i . q_j
        if self.norm == "layernorm":
            r = F.layer_norm(r, r.shape[-1:])
        return y + torch.tanh(self.beta) * r

    def forward(self, x):
        return self.resid_dropout(self.c_proj(merge_heads(self.heads(x))))

    def metrics(self):
        return {"beta": self.beta.detach()[0]}

    def gates(self):
        return {"beta": self.beta.detach()}  # (1,)

    @torch.no_grad()
    def perturb_gates_(self, generator):
        # either sign, |beta| in [0.5, 1.5]: away from beta = 0 (no swapped branch)
        sign = -1.0 if torch.rand(1, generator=generator).item() < 0.5 else 1.0
        self.beta.copy_(sign * torch.empty(1).uniform_(0.5, 1.5, generator=generator))
