"""
sdpa: the baseline, standard causal multi-head attention.

    y_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(D)) v_j

One fused QKV linear, then F.scaled_dot_product_attention(is_causal=True), which
picks PyTorch's fastest backend (cuDNN or flash on a GPU). `sdpa_backend`
forces one backend for experiments.
"""

import torch.nn as nn

from attention.functional import merge_heads, sdpa_causal, split_heads
from attention.projections import add_projections


class CausalSelfAttention(nn.Module):
    # the contract (attention/__init__.py): the baseline, no gates
    ra_family = False
    attn_flop_mult = 1.0
    options = ("sdpa_backend",)
    gate_ranges = {}
    head_selective = False

    def __init__(self, cfg):
        super().__init__()
        self.backend = cfg.sdpa_backend
        self.dropout = cfg.dropout
        add_projections(self, cfg)  # n_head, n_embd, c_attn, c_proj, resid_dropout

    def forward(self, x):
        q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = sdpa_causal(q, k, v, backend=self.backend, dropout_p=dropout_p)  # (B, nh, T, hs)
        return self.resid_dropout(self.c_proj(merge_heads(y)))

    def gates(self):
        return {}

    def perturb_gates_(self, generator):
        pass
