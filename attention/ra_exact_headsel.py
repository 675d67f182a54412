"""
ra_exact_headsel: exact RA (ra_exact.py) where each head decides whether it keeps the reciprocal
term, and routed-off heads cost what plain attention costs.

Per head h, query i, key j <= i:
    s_ij = (a_h q_i.k_j + b'_h q_j.k_i) / sqrt(D),   b'_h = w_rec_h b_h if head h is an RA head, else 0
    aux_loss = ra_l1 * mean_h(w_rec_h),              w_rec_h = s_rec_h^2
The gate is ra_headsel's (ra_headsel.py, the same methods): a learned amplitude s_rec, the L1 on
w_rec, head h is an RA head iff w_rec_h >= ra_threshold, decided on the device every forward
(ra_route_every=0) or stored in `route` and refreshed by set_step every ra_route_every steps;
once off, a head stays off (its w_rec and b get no task gradient, only the L1's).
The gate multiplies b instead of being b (ra_ctr_headsel routes on |b| itself, so b cannot start
at 0 there): b starts at ra_b_init (default 0), so at init the module is exactly sdpa, as ra_exact,
while every head starts as an RA head (w_rec = ra_w_rec_init above the threshold). At b = 0, b gets
a gradient (s is linear in b') but s_rec does not (d b'/d s_rec = 2 s_rec b = 0) until b has moved:
the gate then gets b dL/db', positive where the reciprocal term helps. AdamW moves b by about lr
per step, so b' grows w_rec times slower than ra_exact's b (0.3x at the default ra_w_rec_init).

Two attention calls, grouped by routing, so that plain heads cost plain attention:
  * RA group: the first n_ra heads of the routing's order (RA heads first), through ra_exact's
    folded call (functional.reciprocal_attention: q' = [q, k], k' = [a k, b' q], head dim 2D).
  * plain group: the other heads, through plain SDPA at head dim D on (a q, k, v), which is the
    folded call's function at b' = 0.
  The groups cost no copies of the activations: the QKV projection's weight rows are gathered in group
  order (a folded into the plain heads' q rows), so the projection emits q, k, v with the RA group first
  and each group's q, k, v are views of its output; the output projection's weight columns are gathered
  in the same order, so the heads' outputs are concatenated in group order and never put back (heads()
  does, for inspection). Weight-sized gathers per forward (4 C^2), against 4 B T C for gathering the
  activations. With ra_exact_operands=dense (the default, as ra_exact's) the projection is two products:
  the RA group's q' = [q_h, k_h] per head, dense in (B, T, K, 2 hs) order (ra_exact.py says why), and
  the plain group's q, k, v with the RA group's v; both outputs stay in (B, T, ., hs) order, so they
  are concatenated there and the output projection reads them without a transpose. cat: one product,
  ra_exact's cat operands for the RA group. Both timed on a GPU: docs/bench.md.
  ra_exact_streams=2 (the default): on a CUDA GPU where cuDNN attention runs (Hopper or newer), the two
  groups' calls run at once on two CUDA streams (two_stream.py: a call over a quarter of the heads leaves
  SMs idle that the other call fills); elsewhere, or with 1, one after the other. Same function.
  The head order is a device tensor (argsort of the routing: no host sync); only the group sizes are
  host ints, and they must be: a shape. n_ra is a capacity, an upper bound on the RA heads, fixed
  when the routing is refreshed on the host side: n_head at construction, the stored routing's count
  at each set_step refresh (ra_route_every > 0: one host sync per refresh, outside the forward) and on
  load_state_dict, the mask's count in set_heads_mask. A routed-off head that still sits in the RA
  group runs there with b' = 0 (same function, 1.5x cost); an RA head beyond the capacity (the live
  rule of an eval forward after a lowered threshold, say) runs as a plain head, and rec_on() and
  the metrics say so. Since heads only switch off, the capacity is exact in a training forward.
  Consequences: with ra_route_every=0 (the default) the capacity stays n_head and every head runs
  through the folded call (correct, 1.5x): the speed needs ra_route_every=N. Under torch.compile a
  new capacity recompiles (a guard on the int; it only shrinks, once per refresh that switched heads
  off); a CUDA-graphed step keeps the capacity it was captured with (still correct: an upper bound).
Attention FLOPs: 1 + 0.5 * n_ra / n_head of plain attention (attn_flop_mult states the bound, 1.5).
Attention-probability dropout is not applied (as ra_exact); residual dropout is.
metrics(): ra_frac (fraction of RA heads in use), w_rec, a and b means.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import two_stream
from attention.functional import merge_heads, ra_operands_dense, sdpa_causal, split_heads
from attention.ra_exact import ExactRA, attend_folded, perturb_ab_
from attention.ra_headsel import HeadSelRA


def group_attention(qk, v_ra, qkv_plain, a, b, backend="auto", streams=2):
    """The two groups' attention from their projection outputs: qk (B, T, K, 2 hs), the RA group's q' = [q_h, k_h]
    per head, and v_ra (B, T, K, hs); qkv_plain (B, T, 3 P), the plain group's [q | k | v] (P = (nh - K) hs); a, b
    (K,) the RA heads' weights. Returns (B, nh, T, hs), the RA group first, a view of a (B, T, nh, hs) tensor.
    streams=2: both calls at once on two CUDA streams (two_stream.py) where that runs, else one after the other."""
    B, T, K, D = v_ra.shape
    n_plain = qkv_plain.size(-1) // (3 * D)
    q, k, v = (t.view(B, T, n_plain, D).transpose(1, 2) for t in qkv_plain.chunk(3, dim=-1))  # (B, nh - K, T, hs)
    qf, kf, vf = ra_operands_dense(qk, v_ra, a, b)  # (B, K, T, 2 hs), (B, K, T, 2 hs), (B, K, T, hs)
    if streams == 2 and backend in ("auto", "cudnn") and two_stream.usable(qf, kf, vf, q, k, v):
        y_ra, y_plain = two_stream.causal_attention_pair(qf, kf, vf, q, k, v, D ** -0.5, D ** -0.5)
    else:
        y_ra = attend_folded(qf, kf, vf, backend)  # (B, K, T, hs)
        y_plain = sdpa_causal(q, k, v, backend=backend)  # (B, nh - K, T, hs)
    # both outputs are in (B, T, ., hs) order (cuDNN's follows its inputs'): concatenated in that order, the
    # output projection's merge_heads is then a view
    return torch.cat([y_ra.transpose(1, 2), y_plain.transpose(1, 2)], dim=2).transpose(1, 2)


class ExactHeadSelRA(ExactRA):
    # the contract (attention/__init__.py); ra_on: per head, 1 if the head is an RA head in the routing in use
    options = ExactRA.options + ("ra_w_rec_init", "ra_l1", "ra_threshold", "ra_route_every", "ra_exact_streams")
    gate_ranges = {**ExactRA.gate_ranges, "w_rec": (0.0, None), "ra_frac": (0.0, 1.0), "ra_on": (0.0, 1.0)}
    head_selective = True
    name = "ra_exact_headsel"
    # ra_headsel's routing rule and L1 hand-over, shared as methods rather than through a class hierarchy
    live_route = HeadSelRA.live_route
    aux_loss = HeadSelRA.aux_loss

    def __init__(self, cfg):
        if cfg.ra_route_every < 0:
            raise ValueError(f"ra_route_every={cfg.ra_route_every} must be >= 0 (0: route every step)")
        if cfg.ra_w_rec_init < 0:
            raise ValueError(f"{self.name}: ra_w_rec_init={cfg.ra_w_rec_init} must be >= 0 (it is a weight w = s^2)")
        self.l1 = cfg.ra_l1
        self.threshold = cfg.ra_threshold
        self.route_every = cfg.ra_route_every
        self.w_rec_init = cfg.ra_w_rec_init
        if cfg.ra_exact_streams not in (1, 2):
            raise ValueError(f"{self.name}: ra_exact_streams={cfg.ra_exact_streams}; use 2 (the two head groups' "
                             f"attention on two CUDA streams at once) or 1 (one after the other)")
        self.streams = cfg.ra_exact_streams
        self.n_ra = cfg.n_head  # the RA group's capacity (see the module docstring); n_head is always safe
        super().__init__(cfg)  # a, b, the projections
        self.s_rec = nn.Parameter(torch.empty(cfg.n_head))  # the gate's amplitude: w_rec = s_rec^2
        # persistent: a resumed run keeps its routing
        self.register_buffer("route", torch.ones(cfg.n_head, dtype=torch.bool))
        self.reset_parameters()
        self._aux = None  # the L1 term of the last training forward, until aux_loss() takes it
        self.register_load_state_dict_post_hook(lambda mod, keys: mod.refresh_capacity())

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        if "s_rec" in self._parameters:  # ExactRA.__init__ calls this before s_rec exists
            self.s_rec.fill_(math.sqrt(self.w_rec_init))
            self.route.copy_(self.live_route())
        self.n_ra = self.n_head

    @property
    def w_rec(self):
        return self.s_rec.square()  # (nh,)

    @torch.no_grad()
    def refresh_capacity(self):
        """The RA group's size from the stored routing: one host sync (never in a forward). With
        ra_route_every=0 the stored routing is not kept up to date, so the capacity stays n_head."""
        if self.route_every > 0 and self.route.device.type != "meta":
            self.n_ra = int(self.route.sum())

    @torch.no_grad()
    def set_step(self, step):
        if self.route_every > 0 and step % self.route_every == 0:
            self.route.copy_(self.live_route())  # a device copy
            self.refresh_capacity()

    @staticmethod
    def head_order(route):
        """(nh,) int64 on the device: RA heads first, each kind in head order (a stable sort)."""
        return torch.argsort(route.logical_not().to(torch.uint8), stable=True)

    def channels(self, order):
        """(C,) the channels of a (B, T, C) head-major activation, heads taken in `order` ((nh,))."""
        D = self.n_embd // self.n_head
        return (order.view(-1, 1) * D + torch.arange(D, device=order.device)).view(-1)

    def rec_on(self):
        """(nh,) bool on the device: the RA heads in use, ra_headsel's rule within the capacity."""
        route = self.route if self.route_every > 0 and self.training else self.live_route()
        if self.n_ra >= self.n_head:
            return route
        keep = torch.zeros_like(route).index_fill_(0, self.head_order(route)[:self.n_ra], True)
        return route & keep

    def grouped(self, x):
        """Per-head attention output (B, nh, T, hs) with the heads in the order of `order` ((nh,) device
        tensor: the RA group first), or in head order where order is None (every head in one call)."""
        on = self.rec_on()  # (nh,) bool
        b = torch.where(on, self.w_rec * self.b, torch.zeros_like(self.b))  # (nh,) b', 0 on plain heads
        K = self.n_ra
        if K >= self.n_head:  # every head in the folded call
            if self.operands == "dense":
                return self.heads_dense(x, self.a, b), None  # ra_exact's dense path, with b'
            q, k, v = split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
            return self.exact(q, k, v, self.a, b), None
        # the projection emits the heads in group order, with a folded into the plain heads' q rows: weight-sized
        # gathers instead of copies of the activations, and q, k, v of each group are views of one output
        order = self.head_order(on)  # (nh,)
        C, D = self.n_embd, self.n_embd // self.n_head
        a = self.a[order]  # (nh,) group order
        a_plain = torch.where(torch.arange(self.n_head, device=a.device) >= K, a, torch.ones_like(a))  # 1 on the RA group
        rows = torch.cat([self.channels(order) + i * C for i in range(3)])  # (3C,) [q | k | v] rows, group order
        scale = torch.cat([a_plain.repeat_interleave(D), a.new_ones(2 * C)]).to(self.c_attn.weight.dtype)  # (3C,)
        if self.operands == "dense" and K > 0:
            return self.grouped_dense(x, rows, scale, K, a[:K], b[order[:K]]), order
        w = self.c_attn.weight.index_select(0, rows) * scale.view(-1, 1)  # (3C, C)
        bias = None if self.c_attn.bias is None else self.c_attn.bias.index_select(0, rows) * scale
        q, k, v = split_heads(F.linear(x, w, bias), self.n_head)  # each (B, nh, T, hs), group order
        ys = []
        if K > 0:
            ys.append(self.exact(q[:, :K], k[:, :K], v[:, :K], a[:K], b[order[:K]]))  # (B, K, T, hs)
        ys.append(sdpa_causal(q[:, K:], k[:, K:], v[:, K:], backend=self.backend))  # (B, nh - K, T, hs): a q in q
        return torch.cat(ys, dim=1), order

    def grouped_dense(self, x, rows, scale, K, a, b):
        """grouped()'s two calls, 0 < K < nh, with ra_exact's dense operands (ra_exact_operands=dense): rows, scale
        are c_attn's rows in group order ([q | k | v]) and their factors (a on the plain q rows). The RA group's
        q' = [q_h, k_h] per head comes from its own product, dense in (B, T, K, 2 hs) order, the plain group's
        q, k, v and the RA group's v from a second one; each gathers its weight rows once. Returns (B, nh, T, hs),
        group order, a view of a (B, T, nh, hs) tensor."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        ra_q = torch.arange(K * D, device=rows.device).view(K, D)  # the RA heads' q rows, positions in `rows`
        at_qk = torch.stack([ra_q, ra_q + C], dim=1).reshape(-1)  # (2 K hs,): per RA head [q_h | k_h]
        plain = torch.arange(K * D, C, device=rows.device)
        at_rest = torch.cat([plain, plain + C, plain + 2 * C, ra_q.reshape(-1) + 2 * C])  # plain q, k, v; RA v
        weight, bias = self.c_attn.weight, self.c_attn.bias

        def pick(at):  # c_attn's rows at those positions of `rows`, times their factors
            r, f = rows[at], scale[at]
            return weight.index_select(0, r) * f.view(-1, 1), None if bias is None else bias.index_select(0, r) * f

        qk = F.linear(x, *pick(at_qk)).view(B, T, K, 2 * D)
        rest = F.linear(x, *pick(at_rest))  # (B, T, 3 (nh - K) hs + K hs)
        return group_attention(qk, rest[..., 3 * (H - K) * D:].view(B, T, K, D), rest[..., :3 * (H - K) * D], a, b,
                               self.backend, self.streams)

    def heads(self, x):
        """Per-head attention output (B, nh, T, hs) in head order, before the output projection."""
        y, order = self.grouped(x)
        return y if order is None else y.index_select(1, order.argsort())

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            # the L1 term inside the forward's graph, as ra_headsel's (its backward joins the step's compiled one)
            self._aux = self.l1 * self.w_rec.mean()
        y, order = self.grouped(x)
        if order is None:
            return self.resid_dropout(self.c_proj(merge_heads(y)))
        # the output projection reads the heads in group order: its weight's columns gathered, not y
        w = self.c_proj.weight.index_select(1, self.channels(order))  # (C, C)
        return self.resid_dropout(F.linear(merge_heads(y), w, self.c_proj.bias))

    def metrics(self):
        return {"ra_frac": self.rec_on().float().mean(), "w_rec": self.w_rec.detach().mean(), **super().metrics()}

    def gates(self):
        return {**super().gates(), "w_rec": self.w_rec.detach(), "ra_on": self.rec_on().detach().float()}  # each (nh,)

    @torch.no_grad()
    def perturb_gates_(self, generator):
        perturb_ab_(self.a, self.b, generator)
        # every head an RA head: w_rec at least 0.2 above the threshold
        w_rec = self.threshold + torch.empty(self.n_head).uniform_(0.2, 1.0, generator=generator)
        self.s_rec.copy_(w_rec.clamp(min=0).sqrt())
        self.route.copy_(self.live_route())
        self.n_ra = self.n_head

    @torch.no_grad()
    def set_heads_mask(self, mask):
        """Make exactly the heads in mask ((nh,) bool, True = RA head) RA heads: ra_headsel's w_rec on
        either side of the threshold, b = 1 on the RA heads (so that they have a reciprocal term; b
        starts at 0), the stored routing follows and the RA group's capacity is the mask's count."""
        HeadSelRA.set_heads_mask(self, mask)
        self.b.copy_(torch.where(mask, 1.0, self.b))
        self.n_ra = int(mask.sum())
