"""
The training step: train.py's, bench.py's step rows' and tools/step_overhead.py's.

One optimizer step is grad_accum micro-steps (forward for the loss only, the attention modules'
aux_loss, backward of their sum scaled by 1/grad_accum; under DDP only the last micro-step all-reduces),
then the grad scaler's unscale and the grad-norm clip, the optimizer step and the scaler's update. In
bf16 or fp32 it never synchronizes the host (the fp16 scaler's inf check does), so that it can be
recorded as one CUDA graph (cuda_graph.py): the losses and the grad norm go into device tensors that the
caller reads once per log interval.
"""

import time
from contextlib import nullcontext

import torch

import cuda_graph


class TrainStep:
    """step(marks=None): one optimizer step on the micro-batches xbs[i], ybs[i] (fixed device tensors that
    the caller refills before each step). It adds the step's mean loss and aux loss to loss_sum and aux_sum
    and writes the clipped gradient's norm into grad_norm. It leaves the grads in place: the caller resets
    them (launcher). marks: a list that gets time.perf_counter() after each forward, each backward and the
    clip (tools/step_overhead.py's host phases)."""

    def __init__(self, model, raw_model, optimizer, scaler, autocast, aux_loss, xbs, ybs, grad_clip, ddp=False,
                 after_backward=None):
        self.model = model  # what the forward calls: compiled and/or DDP-wrapped
        self.after_backward = after_backward  # called once after the last backward, before the clip (or None)
        self.raw_model = raw_model  # its parameters are clipped
        self.optimizer, self.scaler, self.autocast, self.aux_loss = optimizer, scaler, autocast, aux_loss
        self.xbs, self.ybs, self.grad_clip, self.ddp = xbs, ybs, grad_clip, ddp
        device = xbs[0].device
        self.loss_sum = torch.zeros((), device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)

    def __call__(self, marks=None):
        grad_accum = len(self.xbs)
        for micro in range(grad_accum):
            sync = (micro == grad_accum - 1)  # DDP all-reduces only on the last micro-step
            with (self.model.no_sync() if (self.ddp and not sync) else nullcontext()):
                with self.autocast:
                    _, loss = self.model(self.xbs[micro], self.ybs[micro], return_logits=False)
                    aux = self.aux_loss()
                mark(marks)
                self.scaler.scale((loss + aux) / grad_accum).backward()
                mark(marks)
            self.loss_sum.add_(loss.detach() / grad_accum)
            self.aux_sum.add_(aux.detach() / grad_accum)
        if self.after_backward is not None:
            self.after_backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip)
            self.grad_norm.copy_(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # --fsdp: a DTensor
        mark(marks)
        self.scaler.step(self.optimizer)
        self.scaler.update()


def mark(marks):
    """Time stamp for a caller that times the step's phases (marks: a list, or None)."""
    if marks is not None:
        marks.append(time.perf_counter())


def launcher(step, optimizer, graphed=False, pool=None, stream=None, warmup=3):
    """launch(marks=None), which makes one training step: step(marks), then the grads set to None; or, graphed
    (--cuda-graph), by cuda_graph.graphed: `warmup` normal steps (compile, autotune, allocate), then the step
    recorded once as a CUDA graph (in pool, if given; on stream, if given) and replayed (no host phases: marks
    must be None). launch.release() frees the graph (a no-op otherwise): before destroy_process_group."""
    if graphed:
        replay = cuda_graph.graphed(step, optimizer, warmup=warmup, pool=pool, stream=stream)

        def launch(marks=None):
            if marks is not None:
                raise ValueError("a CUDA-graph step has no host phases to time")
            replay()
        launch.release = replay.release
    else:
        def launch(marks=None):
            step(marks)
            optimizer.zero_grad(set_to_none=True)
        launch.release = lambda: None

    return launch


def load_batches(loader, xbs, ybs):
    """Copy the next len(xbs) batches into the step's buffers; returns the loader's state from BEFORE them,
    which a checkpoint stores, so that a resume draws them again. The copies are ordered after the running
    step's kernels: the host does not wait for the GPU."""
    state = loader.state_dict()
    for xb, yb in zip(xbs, ybs):
        x, y = loader.next_batch()
        xb.copy_(x, non_blocking=True)
        yb.copy_(y, non_blocking=True)
    return state


@torch.no_grad()
def evaluate(model, val_loader, n_batches, device, autocast, ddp=False, fsdp=False):
    """Mean val loss over the val loader's fixed windows: n_batches batches of B over all ranks, the same
    windows in the same batches at any world size (rank r evaluates one process's batches r, r+N, ...). The
    mean of the batches' mean losses, as one process computes it (a partial last batch counts as one batch,
    as it always did), so N ranks give one process's value up to float rounding. The model back in train
    mode. fsdp: the model is FSDP2-sharded (ddp then means several processes)."""
    # the module inside DDP: a DDP forward may broadcast buffers, a collective that a rank with fewer (or no)
    # val batches would never join
    inner = model.module if (ddp and not fsdp) else model
    inner.eval()
    total, n = torch.zeros((), device=device), 0
    batches = val_loader.val_batches(n_batches, global_batches=True)
    if fsdp and ddp:
        batches = list(batches)
        spare = padding_forwards(len(batches), device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            _, loss = inner(x, y, return_logits=False)
        total += loss.float()
        n += 1
    if fsdp and ddp:
        # under FSDP every forward gathers the parameters, a collective that all ranks must join: a rank with
        # fewer val batches runs uncounted forwards on one window of zeros until it has run as many
        for _ in range(spare):
            with autocast:
                inner(torch.zeros((1, val_loader.T), dtype=torch.long, device=device), return_logits=False)
    stats = torch.tensor([total.item(), float(n)], device=device)
    if ddp:
        import torch.distributed as dist

        dist.all_reduce(stats)
    inner.train()
    return (stats[0] / stats[1]).item() if stats[1] > 0 else float("nan")


def padding_forwards(n_mine, device):
    """How many more forwards this rank must run to match the rank with the most val batches."""
    import torch.distributed as dist

    most = torch.tensor([n_mine], device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item()) - n_mine
