"""
sdpa: the baseline, standard causal multi-head attention.

    y_i = sum_{j <= i} softmax_j(q_i . k_j / sqrt(D)) v_j

One fused QKV linear, then F.scaled_dot_product_attention(is_causal=True), which
picks PyTorch's fastest backend (cuDNN or flash on a GPU). `sdpa_backend`
forces one backend for experiments.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention.functional import sdpa_causal


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.backend = cfg.sdpa_backend
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True  # GPT-2 scaled init
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = sdpa_causal(q, k, v, backend=self.backend, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
