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
weight fold (fold.fold_same_flop_qkv(rec_on=...)), on the device.

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
  * defaults (ra_w_rec_init 0.3, ra_threshold 1e-3, ra_l1 1e-5): s_rec is 1-D (no weight
    decay) and AdamW moves a parameter whose gradient keeps its sign by about lr per step,
    whatever the gradient's size. An L1 above the task's gradient on s_rec (which starts
    tiny: the reciprocal term is second order in the small W) is then a timer that switches
    every head off on the same step. So the L1 is kept small, and sqrt(0.3) - sqrt(1e-3) =
    0.52 is more than the sum of lr over a 1400-step rung at lr 6e-4 (0.46): no head can be
    switched off within such a rung; longer runs decide. docs/fair-starts.md has the runs.
metrics(): ra_frac (fraction of RA heads in the routing in use), w_rec and w_std means.
"""

import torch

from attention.ra_same_flop import SameFlopRA


class HeadSelRA(SameFlopRA):
    # the contract (attention/__init__.py); ra_on: per head, 1 if the head is an RA head in the routing in use
    options = SameFlopRA.options + ("ra_l1", "ra_threshold", "ra_route_every")
    gate_ranges = {**SameFlopRA.gate_ranges, "ra_frac": (0.0, 1.0), "ra_on": (0.0, 1.0)}
    head_selective = True
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

    def gates(self):
        return {**super().gates(), "ra_on": self.rec_on().detach().float()}  # each (nh,)

    @torch.no_grad()
    def perturb_gates_(self, generator):
        super().perturb_gates_(generator)
        # every head an RA head: w_rec at least 0.2 above the threshold
        w_rec = self.threshold + torch.empty(self.s_rec.shape).uniform_(0.2, 1.0, generator=generator)
        self.s_rec.copy_(w_rec.clamp(min=0).sqrt())
        self.route.copy_(self.live_route())

    @torch.no_grad()
    def set_heads_mask(self, mask):
        """Make exactly the heads in mask ((nh,) bool, True = RA head) RA heads: w_rec = threshold + 0.2
        on them, threshold - 0.1 (>= 0) on the others; the stored routing follows."""
        if self.threshold <= 0 and not bool(mask.all()):
            raise ValueError(f"{self.name}: ra_threshold={self.threshold} <= 0: every head is an RA head (w_rec >= 0)")
        w_rec = torch.where(mask, self.threshold + 0.2, max(self.threshold - 0.1, 0.0))
        self.s_rec.copy_(w_rec.to(self.s_rec.dtype).sqrt())
        self.route.copy_(self.live_route())
