"""
The training step: train.py's, bench.py's step rows' and tools/step_overhead.py's.

One optimizer step is grad_accum micro-steps (forward for the loss only, the attention modules'
aux_loss, backward of their sum scaled by 1/grad_accum; under DDP only the last micro-step all-reduces),
then the grad scaler's unscale and the grad-norm clip, the optimizer step and the scaler's update. In
bf16 or fp32 it never synchronizes the host (the fp16 scaler's inf check does), so that it can be
recorded as one CUDA graph (cuda_graph.py): the losses and the grad norm go into device tensors that the
caller reads once per log interval.

Under DDP with embed_gather (train.py --ddp-embed-gather) the token embeddings are looked up here, outside the
model. The tied wte's gradient has two parts: the lm_head's, complete when the backward starts, and the lookup's,
complete only when it ends. DDP all-reduces a parameter once its whole gradient is in, so by default wte's 154 MB
(GPT-2 124M, fp32) wait for the end of the backward, where nothing overlaps them. Looked up here, the lookup's part
bypasses DDP: wte's all-reduce carries the lm_head's part and overlaps the backward, and the lookup's part is
rebuilt on every rank from all ranks' token ids and token gradients, gathered after the backward (B T C floats per
rank: 50 MB at 16 x 1024, a third of the bytes that wte's all-reduce moves) -- the same gradient, summed in
another order.
"""

import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

import cuda_graph


class TrainStep:
    """step(marks=None): one optimizer step on the micro-batches xbs[i], ybs[i] (fixed device tensors that
    the caller refills before each step). It adds the step's mean loss and aux loss to loss_sum and aux_sum
    and writes the clipped gradient's norm into grad_norm. It leaves the grads in place: the caller resets
    them (launcher). marks: a list that gets time.perf_counter() after each forward, each backward and the
    clip (tools/step_overhead.py's host phases)."""

    def __init__(self, model, raw_model, optimizer, scaler, autocast, aux_loss, xbs, ybs, grad_clip, ddp=False,
                 after_backward=None, embed_gather=False):
        self.model = model  # what the forward calls: compiled and/or DDP-wrapped
        self.after_backward = after_backward  # called once after the last backward, before the clip (or None)
        self.raw_model = raw_model  # its parameters are clipped
        self.optimizer, self.scaler, self.autocast, self.aux_loss = optimizer, scaler, autocast, aux_loss
        self.xbs, self.ybs, self.grad_clip, self.ddp = xbs, ybs, grad_clip, ddp
        self.wte = raw_model.transformer.wte.weight if embed_gather else None  # embed_gather: see the module doc
        device = xbs[0].device
        self.loss_sum = torch.zeros((), device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)

    def __call__(self, marks=None):
        grad_accum = len(self.xbs)
        for micro in range(grad_accum):
            sync = (micro == grad_accum - 1)  # DDP all-reduces only on the last micro-step
            xb, yb = self.xbs[micro], self.ybs[micro]
            lookup = {}
            if self.wte is not None:  # a leaf, so that the backward leaves the lookup's gradient in its .grad
                lookup["tok_emb"] = F.embedding(xb, self.wte.detach()).requires_grad_()  # (B, T, C)
            with (self.model.no_sync() if (self.ddp and not sync) else nullcontext()):
                with self.autocast:
                    _, loss = self.model(xb, yb, return_logits=False, **lookup)
                    aux = self.aux_loss()
                mark(marks)
                self.scaler.scale((loss + aux) / grad_accum).backward()
                mark(marks)
            if lookup:  # after DDP's all-reduce (on the last micro-step) has written wte.grad
                add_lookup_grad(self.wte, xb, lookup["tok_emb"].grad)
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


def add_lookup_grad(weight, idx, grad):
    """weight.grad += the embedding lookup's gradient averaged over the ranks, as DDP averages: idx (B, T) this
    rank's token ids, grad (B, T, C) their gradient. Every rank gathers all ranks' ids and gradients and adds the
    same sum, so the replicas stay equal; before the last micro-step's all-reduce, whose mean of equal values
    leaves it as it is."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    idx, grad = idx.reshape(-1), grad.reshape(-1, grad.size(-1))  # (B T,), (B T, C)
    if world > 1:  # gathered along dim 0, rank by rank (gloo takes no other shape)
        ids = idx.new_empty(world * idx.numel())
        dist.all_gather_into_tensor(ids, idx)
        grads = grad.new_empty((world * grad.size(0), grad.size(1)))
        dist.all_gather_into_tensor(grads, grad.contiguous())
        idx, grad = ids, grads.div_(world)
    # the embedding's own backward: sorted by index, so every rank sums in the same order (atomic adds would not),
    # and a frequent token's rows summed in parallel chunks (index_put_'s accumulate sums them one by one: on prose,
    # where a few tokens fill several percent of a batch, that cost more than the all-reduce it saves)
    weight.grad.add_(torch.ops.aten.embedding_dense_backward(grad, idx, weight.size(0), -1, False))


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
