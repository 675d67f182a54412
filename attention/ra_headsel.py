"""
ra_headsel: same-FLOP RA (ra_same_flop.py) where each head decides whether it keeps
the reciprocal channel.

Per head h, with learned w_rec_h = s_rec_h^2 and the L1 term
    aux_loss = ra_l1 * mean_h(w_rec_h)
an RA head computes ra_same_flop's scores; a plain head gives its R reciprocal dims
back to the standard term and is ordinary attention scaled by w_std:
    RA:    Qf = [s_std Q[:D-R], s_rec K W],  Kf = [s_std K[:D-R], s_rec Q W]
    plain: Qf = s_std Q,                     Kf = s_std K              (all D dims)
Both kinds run in the same single SDPA call: the choice is a torch.where inside the
weight fold (functional.fold_same_flop_qkv(rec_on=...)), on the device.

Routing rule:
  * head h is RA iff w_rec_h >= ra_threshold, evaluated on the device (no host sync):
    every forward (ra_route_every=0), or, with ra_route_every=N, stored in the
    `route` buffer and refreshed by set_step(step) when step % N == 0 (training
    forwards use the buffer; eval forwards always use the live rule).
  * a plain head's w_rec gets no task gradient (its reciprocal channel is gone), only
    the L1's, which lowers it further: ONCE OFF, A HEAD STAYS OFF. With ra_l1=0 its
    w_rec is frozen (up to the optimizer's leftover momentum, which points down, the
    way it crossed). Its w_rec value is kept, so lowering ra_threshold (e.g. on resume)
    is the only way to bring it back. Switching off is a discrete change of the head's
    function (R dims swap from reciprocal to standard); the L1 makes it a pruning of
    heads that did not earn their reciprocal channel.
metrics(): ra_frac (fraction of RA heads in the routing in use), w_rec and w_std means.
"""

import torch

from attention.ra_same_flop import SameFlopRA


class HeadSelRA(SameFlopRA):
    name = "ra_headsel"

    def __init__(self, cfg):
        if cfg.ra_route_every < 0:
            raise ValueError(f"ra_route_every={cfg.ra_route_every} must be >= 0 (0: route every step)")
        self.l1 = cfg.ra_l1
        self.threshold = cfg.ra_threshold
        self.route_every = cfg.ra_route_every
        super().__init__(cfg)
        self.register_buffer("route", self.live_route().detach())  # persistent: a resumed run keeps its routing
        self._aux = None  # the L1 term of the last training forward, until aux_loss() takes it

    def live_route(self):
        """(nh,) bool: the routing rule applied to the current gates, on the device."""
        return self.w_rec >= self.threshold

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        if "route" in self._buffers:  # the base __init__ calls this before `route` exists
            self.route.copy_(self.live_route())

    def rec_on(self):
        if self.route_every > 0 and self.training:
            return self.route
        return self.live_route()

    @torch.no_grad()
    def set_step(self, step):
        if self.route_every > 0 and step % self.route_every == 0:
            self.route.copy_(self.live_route())  # a device copy: no host sync

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            # the L1 term inside the forward's graph: its backward then joins the step's one compiled
            # backward (from a separately compiled aux_loss, its gradients were extra small launches)
            self._aux = self.l1 * self.w_rec.mean()
        return super().forward(x)

    def aux_loss(self):
        # the last training forward's, handed over once (getattr: ra_ctr_headsel borrows this method and
        # computes its L1 here, without a stored one)
        aux = getattr(self, "_aux", None)
        if aux is None:
            return self.l1 * self.w_rec.mean()
        self._aux = None
        return aux

    def metrics(self):
        return {"ra_frac": self.rec_on().float().mean(), **super().metrics()}
