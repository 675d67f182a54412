"""
ra_tokensel: same-FLOP RA (ra_same_flop.py) whose reciprocal channel each query token
switches on or off by itself.

A light scorer reads only token i's own block input x_i (B, T, C), through a stop-gradient:
    g_i = sigmoid(sg(x_i) . u + c),   m_i = 1[g_i > 0.5]
and m_i gates the R reciprocal columns of query i:
    Qf_i = [s_std q_i[:D-R], m_i * s_rec k_i W]        Kf unchanged
    => s_ij = w_std q_i[:D-R].k_j[:D-R] + m_i w_rec (k_i W).(q_j W)
A selected token attends with RA scores; an unselected one with the standard
D-R dims only (its R dims cannot go back to the standard term, as a plain head's do
in ra_headsel: the keys' R columns carry s_rec q_j W for the selected queries of the same
SDPA call). The decision is a threshold on g_i, never a top-k over the sequence,
in which later tokens would decide an earlier token's path (breaking causality).

Gating: straight-through. The forward uses the hard m_i (the selection a sparse kernel
would skip on); the backward treats m_i as g_i (dm/dg = 1), so the task gradient of
the reciprocal term, sum_cols dL/dQf_i[rec] * Qf_i[rec], trains the scorer.
Target fraction: aux_loss = ra_token_penalty * (mean(m_st) - ra_token_frac)^2 with
m_st = m + g - g.detach(): its value is the true selected fraction (a soft mean(g)
could sit at the target with no token above 0.5), its gradient moves every g.
The penalty is computed in the forward; aux_loss() hands it over once (call it once per
forward, as GPT.aux_loss does): a second call returns the same value without a gradient.
Scorer init: u ~ N(0, 0.02), c = 0, so about half of the tokens start selected and the
penalty pulls the fraction to the target.

Why sg(x) and a small penalty weight (default ra_token_penalty 0.01): the gate is a router,
and neither its penalty nor its straight-through estimate should train the representation.
Through x, every layer's penalty pushes every token's x_i along -u (one direction for all
tokens, so it does not average out): at weight 1.0 that outweighs the task's gradient on the
shared weights early in training. With sg(x) the penalty moves only u and c; a large weight
would still dominate the global gradient norm (clipped), scaling the task's gradient down.
AdamW moves u and c at about lr per step whatever the weight, so 0.01 still brings the
fraction to the target quickly. docs/fair-starts.md has the measurements.

Cost: the scorer is a (C -> 1) dot product per token, written as multiply-and-sum so
torch.compile makes it one row reduction; the gate scales the R reciprocal columns of Qf
in place in the projection's output buffer [Qf | Kf | V] (rec_gate.gate_rec_queries: H*R
of the 3C columns are read and written, and q, k, v keep sdpa's layout). One SDPA call.
metrics(): tok_frac, the selected fraction of the last forward.
"""

import torch
import torch.nn as nn

from attention.rec_gate import gate_rec_queries
from attention.ra_same_flop import SameFlopRA


class TokenSelRA(SameFlopRA):
    # the contract (attention/__init__.py); tok_frac: (1,), the selected fraction of the last forward
    # (in gates() only after a forward)
    options = SameFlopRA.options + ("ra_token_frac", "ra_token_penalty")
    gate_ranges = {**SameFlopRA.gate_ranges, "tok_frac": (0.0, 1.0)}
    name = "ra_tokensel"

    def __init__(self, cfg):
        if not 0.0 <= cfg.ra_token_frac <= 1.0:
            raise ValueError(f"ra_token_frac={cfg.ra_token_frac} must be in [0, 1]")
        self.token_frac = cfg.ra_token_frac
        self.token_penalty = cfg.ra_token_penalty
        super().__init__(cfg)
        self.scorer = nn.Linear(cfg.n_embd, 1, bias=True)
        self._sel = None  # the selected fraction of the last forward (a value, for metrics)
        self._aux = None  # its penalty, with the forward's graph until aux_loss() takes it
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        if hasattr(self, "scorer"):  # the base __init__ calls this before the scorer exists
            nn.init.normal_(self.scorer.weight, mean=0.0, std=0.02)
            nn.init.zeros_(self.scorer.bias)

    def split_qkv(self, x, qkv):
        B, T, _ = x.shape
        # the (C -> 1) scorer as a multiply-and-sum rather than a GEMM: compiled, it is one fused
        # row reduction over x (a 1-column GEMM would be its own cuBLAS call, forward and backward)
        # x.detach(): the router's penalty and straight-through gradient train the scorer, not the
        # residual stream (see the module docstring)
        logit = (x.detach() * self.scorer.weight[0]).sum(-1) + self.scorer.bias  # (B, T): token i's own state only
        g = torch.sigmoid(logit)
        m = (g > 0.5).to(g.dtype)
        m = m + g - g.detach()  # forward: the hard 0/1 selection; backward: straight-through to g
        sel = m.mean()  # straight-through: the true fraction, with a gradient to every g
        self._sel = sel.detach()
        # the penalty is computed here, inside the forward's graph, so its few ops fuse with the scorer's
        # kernels there (computed in aux_loss, a separate graph, they were ~3 tiny launches per layer)
        self._aux = self.token_penalty * (sel - self.token_frac) ** 2
        # gate the R reciprocal columns of every head's Qf in place: the rest of [Qf | Kf | V] is not
        # touched (rec_gate.py says how and why)
        return gate_rec_queries(qkv, m.view(B * T), B, T, self.n_head, self.R)  # q, k, v (B, nh, T, hs)

    def aux_loss(self):
        if self._aux is None:
            return torch.zeros((), device=self.s_rec.device)
        aux, self._aux = self._aux, self._aux.detach()
        # the loss takes the graph of the last forward's penalty; the module keeps only its value, else
        # that graph, and the gradient nodes of the scorer's weights with it, would live on into the
        # next step (which breaks CUDA-graph capture: the nodes belong to the old stream)
        return aux

    def metrics(self):
        out = super().metrics()
        if self._sel is not None:
            out["tok_frac"] = self._sel
        return out

    def gates(self):
        out = super().gates()
        if self._sel is not None:
            out["tok_frac"] = self._sel.detach().view(1)
        return out

    @torch.no_grad()
    def perturb_gates_(self, generator):
        super().perturb_gates_(generator)
        # scorer logits x.u + c of about unit scale on the LayerNormed input (|x_c| ~ 1), centred at 0:
        # about half of the tokens selected, and the selection varies from token to token
        C = self.scorer.weight.size(1)
        self.scorer.weight.copy_(torch.randn(self.scorer.weight.shape, generator=generator) / C ** 0.5)
        self.scorer.bias.zero_()
