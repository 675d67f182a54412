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
"""

import torch

from attention.ra_ctr import CTRReciprocalAttention
from attention.ra_headsel import HeadSelRA


class CTRHeadSelRA(CTRReciprocalAttention):
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

    @torch.no_grad()
    def set_ra_heads(self, mask):
        """For benchmarks: make exactly the heads in mask ((nh,) bool) RA heads, the others plain."""
        self.b.copy_(torch.where(mask, self.threshold + 0.2, 0.0))
        self.route.copy_(self.live_route())

    def metrics(self):
        return {"ra_frac": self.rec_on().float().mean(), "w_rec": self.w_rec.detach().mean()}
