"""
ra_ctr: exact reciprocal attention (RA) through the CTR Triton kernel (attention/ctr_kernel.py).

    y_i = sum_{j <= i} softmax_j(scale * (a_h q_i.k_j + b_h q_j.k_i)) v_j

Same projections as sdpa (one fused QKV linear c_attn, c_proj with the scaled residual init), plus
two learnable per-head weights: a (standard term) and b (reciprocal term). Init: a = 1 and
b = cfg.ra_b_init (default 0): with b = 0 a head is exactly the sdpa baseline, and b still gets a
gradient (the score is linear in b; the kernel computes db at b = 0 unless db_at_zero=False), so
the reciprocal term grows from sdpa as far as the task asks (docs/fair-starts.md). ra_w_std_init is
not used: scaling the standard term below 1 would only flatten the initial attention.

On CUDA with Triton the fused CTR kernel runs (1.5x the attention matmuls of plain causal attention,
hence attn_flop_mult = 1.5); elsewhere (CPU, no Triton, attention dropout in training) the exact
pure-torch path runs, with a one-time notice. Its speed against SDPA and ra_exact: docs/bench.md.

Extending: subclasses override `head_weights()` to return the effective per-head (a, b), e.g. a
head-selective gate that zeroes b on some heads; the kernel runs heads whose b is exactly 0 at the
cost of plain attention. `kernel_kwargs` is passed to ctr_attention (e.g. db_at_zero=False).
"""

import math

import torch
import torch.nn as nn

from attention.ctr_kernel import reciprocal_attention_any
from attention.functional import merge_heads, split_heads
from attention.projections import add_projections
from attention.ra_exact import perturb_ab_


class CTRReciprocalAttention(nn.Module):
    # the contract (attention/__init__.py); a, b unconstrained, b_abs = mean |b| (metrics)
    ra_family = True
    attn_flop_mult = 1.5
    options = ("ra_b_init", "ra_quant")  # ra_quant: only "none" is implemented
    b_init_field = "ra_b_init"  # the GPTConfig field b starts at (ra_ctr_headsel: its gate's init)
    gate_ranges = {"a": (-math.inf, None), "b": (-math.inf, None), "b_abs": (0.0, None)}
    head_selective = False

    def __init__(self, cfg):
        super().__init__()
        if cfg.ra_quant != "none":
            raise ValueError(f"ra_ctr: ra_quant={cfg.ra_quant!r} is not implemented (use 'none')")
        self.dropout = cfg.dropout
        self.b_init = float(getattr(cfg, self.b_init_field))
        add_projections(self, cfg)  # n_head, n_embd, c_attn, c_proj, resid_dropout
        self.a = nn.Parameter(torch.ones(cfg.n_head))
        self.b = nn.Parameter(torch.full((cfg.n_head,), self.b_init))
        self.kernel_kwargs = {}

    def reset_parameters(self):
        with torch.no_grad():
            self.a.fill_(1.0)
            self.b.fill_(self.b_init)

    def head_weights(self):
        """Per-head (a, b), each (H,): the weights of the standard and the reciprocal term."""
        return self.a, self.b

    def forward(self, x):
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        a, b = self.head_weights()
        dropout_p = self.dropout if self.training else 0.0
        y = reciprocal_attention_any(q, k, v, a, b, dropout_p=dropout_p, **self.kernel_kwargs)
        return self.resid_dropout(self.c_proj(merge_heads(y)))

    def metrics(self):
        return {"b_abs": self.b.detach().abs().mean()}

    def gates(self):
        return {"a": self.a.detach(), "b": self.b.detach()}  # each (nh,)

    def perturb_gates_(self, generator):
        perturb_ab_(self.a, self.b, generator)
