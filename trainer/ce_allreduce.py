"""
DDP's gradient all-reduce for two GPUs of one host, its bytes moved by the copy engines instead of NCCL's
kernels (train.py --ddp-copy-engine; tools/ddp_overlap.py's :ce).

Why: NCCL's all-reduce runs as kernels on the SMs, so while it overlaps the backward it takes SMs (and
their time) from the backward's GEMMs. A copy into the other GPU's memory (cudaMemcpyAsync into a
symmetric-memory mapping of it) runs on the copy engines and takes none. docs/ddp.md has the probe.

Per bucket, in the order DDP hands them over (index 0 first), on a side stream that follows the backward:
    1. copy the bucket (B,) into this bucket's slice of the peer's receive buffer     (copy engines)
    2. barrier with the peer: both copies have landed                                   (a one-block kernel)
    3. bucket = (bucket + received) * 0.5                                                (two elementwise passes)
Both ranks compute (a + b) * 0.5 from the same a and b (floating-point addition commutes), so their
gradients stay bit-identical, as replicas must. After the last bucket a second barrier keeps either rank from
writing the next step's buckets into the other's buffer before that rank has read this step's.
The receive buffer holds all of the model's gradients (one fp32 copy); each bucket takes the next slice.
"""

import torch
import torch.distributed as dist


class CopyEngineAllReduce:
    """State of the comm hook; register with ddp.register_comm_hook(state, copy_engine_hook)."""

    def __init__(self, numel, device, group=None):
        group = group or dist.group.WORLD
        if dist.get_world_size(group) != 2:
            raise ValueError(f"the copy-engine all-reduce is for 2 GPUs of one host; this run has "
                             f"{dist.get_world_size(group)} processes: drop --ddp-copy-engine")
        if device.type != "cuda":
            raise ValueError(f"the copy-engine all-reduce needs CUDA GPUs (device {device}): drop --ddp-copy-engine")
        import torch.distributed._symmetric_memory as symm_mem

        self.recv = symm_mem.empty(numel, dtype=torch.float32, device=device)  # (numel,) what the peer sends
        self.handle = symm_mem.rendezvous(self.recv, group.group_name)
        peer = 1 - dist.get_rank(group)
        self.peer_recv = self.handle.get_buffer(peer, (numel,), torch.float32)  # the peer's buffer, mapped here
        self.stream = torch.cuda.Stream(device)
        self.offset = 0

    def slices(self, bucket):
        """(the bucket's slice of our buffer, the same slice of the peer's)."""
        n = bucket.buffer().numel()
        if bucket.index() == 0:
            self.offset = 0
        start, self.offset = self.offset, self.offset + n
        if self.offset > self.recv.numel():
            raise RuntimeError(f"copy-engine all-reduce: the buckets hold {self.offset} elements, more than the "
                               f"{self.recv.numel()} gradients it was sized for")
        return self.recv[start:self.offset], self.peer_recv[start:self.offset]


def copy_engine_hook(state, bucket):
    """A DDP comm hook: the bucket's mean over the two ranks, written into it (see the module docstring)."""
    buf = bucket.buffer()
    if buf.dtype != torch.float32:
        raise TypeError(f"copy-engine all-reduce: a {buf.dtype} gradient bucket; it handles float32 gradients")
    recv, peer_recv = state.slices(bucket)
    main = torch.cuda.current_stream(buf.device)
    state.stream.wait_stream(main)  # the bucket's gradients are complete
    with torch.cuda.stream(state.stream):
        peer_recv.copy_(buf)
        state.handle.barrier(channel=0)
        buf.add_(recv).mul_(0.5)
        if bucket.is_last():
            state.handle.barrier(channel=1)
        fut = torch.futures.Future(devices=[buf.device])
        fut.set_result(buf)  # DDP waits for it on its own stream (a CUDA event of this stream)
    return fut
