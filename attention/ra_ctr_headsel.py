"""
ra_ctr_headsel: exact RA through the CTR kernel (ra_ctr.py) with ra_headsel's per-head gate on b.

    s_ij = scale * (a_h q_i.k_j + b'_h q_j.k_i),   b'_h = b_h if |b_h| >= ra_threshold else 0
    aux_loss = ra_l1 * mean_h |b_h|

w_rec = |b| plays the role of ra_headsel's gate and the routing rule is ra_headsel's,
literally the same methods (see ra_headsel.py): decided on the device every step, or
refreshed every ra_route_every steps; once a head is off it stays off (its b gets no task
gradient, only the L1's). A routed-off head has b' = 0 exactly, so the kernel runs it as
plain attention (no Q_J loads, no second dot product) and skips its db (db_at_zero=False:
the masked b gets no gradient through the routing anyway). No host sync: the routing is a
torch.where on the (H,) gate, and the kernel branches on b' per program.

Init: b = ra_w_rec_init (the gate's start, as ra_headsel's w_rec), not ra_ctr's ra_b_init = 0: the
gate IS the reciprocal weight here, and a head that starts under the threshold is off for good. So
this variant cannot start at sdpa; it starts at |b| = ra_w_rec_init above a threshold of ra_threshold
(defaults 0.3 and 1e-3: b travels at most ~lr per step under AdamW, so the task has to push it down
for most of a short rung to switch a head off; docs/fair-starts.md).
"""

import torch

from attention.ra_ctr import CTRReciprocalAttention
from attention.ra_headsel import HeadSelRA


class CTRHeadSelRA(CTRReciprocalAttention):
    # the contract (attention/__init__.py); ra_on: per head, 1 if the head is an RA head in the routing in use
    options = ("ra_w_rec_init", "ra_quant", "ra_l1", "ra_threshold", "ra_route_every")
    b_init_field = "ra_w_rec_init"
    gate_ranges = {**CTRReciprocalAttention.gate_ranges, "w_rec": (0.0, None), "ra_frac": (0.0, 1.0),
                   "ra_on": (0.0, 1.0)}
    head_selective = True
    # ra_headsel's routing rule, shared as methods rather than through a class hierarchy
    live_route = HeadSelRA.live_route
    rec_on = HeadSelRA.rec_on
    set_step = HeadSelRA.set_step
    aux_loss = HeadSelRA.aux_loss

    def __init__(self, cfg):
        if cfg.ra_route_every < 0:
            raise ValueError(f"ra_route_every={cfg.ra_route_every} must be >= 0 (0: route every step)")
        super().__init__(cfg)
        self.l1 = cfg.ra_l1
        self.threshold = cfg.ra_threshold
        self.route_every = cfg.ra_route_every
        self.kernel_kwargs = {"db_at_zero": False}
        self.register_buffer("route", self.live_route().detach())  # persistent: a resumed run keeps its routing

    @property
    def w_rec(self):
        return self.b.abs()  # (nh,)

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        if "route" in self._buffers:
            self.route.copy_(self.live_route())

    def head_weights(self):
        return self.a, torch.where(self.rec_on(), self.b, torch.zeros_like(self.b))

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            # the L1 term inside the forward, as ra_headsel's: under --fsdp (FSDP2) the parameters are whole only
            # during the forward (outside it they are shards), and aux_loss then hands the term over
            self._aux = self.l1 * self.w_rec.mean()
        return super().forward(x)

    @torch.no_grad()
    def set_heads_mask(self, mask):
        """Make exactly the heads in mask ((nh,) bool, True = RA head) RA heads: b = threshold + 0.2 on
        them, 0 on the others; the stored routing follows."""
        if self.threshold <= 0 and not bool(mask.all()):
            raise ValueError(f"ra_ctr_headsel: ra_threshold={self.threshold} <= 0: every head is an RA head (|b| >= 0)")
        self.b.copy_(torch.where(mask, self.threshold + 0.2, 0.0))
        self.route.copy_(self.live_route())

    def metrics(self):
        return {"ra_frac": self.rec_on().float().mean(), "w_rec": self.w_rec.detach().mean()}

    def gates(self):
        return {**super().gates(), "ra_on": self.rec_on().detach().float()}  # each (nh,)

    @torch.no_grad()
    def perturb_gates_(self, generator):
        super().perturb_gates_(generator)
        # every head an RA head: |b| at least 0.2 above the threshold, either sign
        sign = torch.where(torch.rand(self.n_head, generator=generator) < 0.5, -1.0, 1.0)
        self.b.copy_(sign * (max(self.threshold, 0.0) + torch.empty(self.n_head).uniform_(0.2, 1.0, generator=generator)))
        self.route.copy_(self.live_route())
