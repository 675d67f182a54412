"""
Two causal attentions at once, each through cuDNN, on two CUDA streams: for a variant that splits its
heads into groups of different head dims (ra_exact_headsel: the RA group's folded call at head dim 2D,
the plain group at D), so that neither call runs alone on the GPU.

Why: one cuDNN call over a few heads (3 of 12, B = 16, T = 1024) has too few thread blocks to keep the
H200's 132 SMs busy to the end of its causal work, and the two calls one after the other cost the sum of
their tails. On two streams the second call's blocks fill the SMs the first leaves idle (timed on an H200,
the attention span and the training step: docs/bench.md).

    y1 = softmax(scale1 q1 k1^T, causal) v1    (B, H1, T, D1v) on a side stream
    y2 = softmax(scale2 q2 k2^T, causal) v2    (B, H2, T, D2v) on the current stream

The forward and the backward are torch.library custom ops (as ctr_kernel.py's): torch.compile sees one
opaque node each, with no graph break (fullgraph works), and a CUDA graph captures the two streams as a
fork and a join. Each op calls the same ATen cuDNN attention ops that F.scaled_dot_product_attention
dispatches to, so the function is that of the one-stream path, and the outputs and gradients come back
in the layouts SDPA gives them (the fake kernels call those ops' own meta kernels).

Stream safety: the side stream waits for the current stream before its call, and the current stream
waits for the side stream before the op returns, so every later use of an output, and every reuse of
an input's memory, is ordered after the side stream's kernels.
"""

import torch

_side_streams = {}  # device index -> the side stream (one per device, made on first use)


def _side_stream(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _side_streams:
        _side_streams[idx] = torch.cuda.Stream(device=idx)
    return _side_streams[idx]


def _fwd(q, k, v, scale):
    """cuDNN causal attention -> (y (B, H, T, Dv) in q's dimension order, logsumexp (B, H, T, 1) fp32)."""
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    return out[0], out[1]


def _bwd(g, q, k, v, y, lse, scale):
    """The gradients (dq, dk, dv) of _fwd. No dropout, so the philox seed and offset are never read."""
    seed = q.new_empty((), dtype=torch.long)
    offset = q.new_empty((), dtype=torch.long)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        g, q, k, v, y, lse, seed, offset, None, None, None, q.size(2), k.size(2), 0.0, True, scale=scale)


@torch.library.custom_op("ra::causal_attention_pair", mutates_args=(), device_types="cuda")
def _pair(q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor,
          v2: torch.Tensor, scale1: float, scale2: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor]:
    main, side = torch.cuda.current_stream(q1.device), _side_stream(q1.device)
    side.wait_stream(main)  # fork: q1, k1, v1 are ready
    with torch.cuda.stream(side):
        y1, lse1 = _fwd(q1, k1, v1, scale1)
    y2, lse2 = _fwd(q2, k2, v2, scale2)
    main.wait_stream(side)  # join
    return y1, lse1, y2, lse2


@_pair.register_fake
def _(q1, k1, v1, q2, k2, v2, scale1, scale2):
    return (*_fwd(q1, k1, v1, scale1), *_fwd(q2, k2, v2, scale2))


@torch.library.custom_op("ra::causal_attention_pair_bwd", mutates_args=(), device_types="cuda")
def _pair_bwd(g1: torch.Tensor, q1: torch.Tensor, k1: torch.Tensor, v1: torch.Tensor, y1: torch.Tensor,
              lse1: torch.Tensor, g2: torch.Tensor, q2: torch.Tensor, k2: torch.Tensor, v2: torch.Tensor,
              y2: torch.Tensor, lse2: torch.Tensor, scale1: float, scale2: float) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    main, side = torch.cuda.current_stream(q1.device), _side_stream(q1.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        d1 = _bwd(g1, q1, k1, v1, y1, lse1, scale1)
    d2 = _bwd(g2, q2, k2, v2, y2, lse2, scale2)
    main.wait_stream(side)
    return (*d1, *d2)


@_pair_bwd.register_fake
def _(g1, q1, k1, v1, y1, lse1, g2, q2, k2, v2, y2, lse2, scale1, scale2):
    return (*_bwd(g1, q1, k1, v1, y1, lse1, scale1), *_bwd(g2, q2, k2, v2, y2, lse2, scale2))


def _setup(ctx, inputs, output):
    q1, k1, v1, q2, k2, v2, scale1, scale2 = inputs
    y1, lse1, y2, lse2 = output
    ctx.save_for_backward(q1, k1, v1, y1, lse1, q2, k2, v2, y2, lse2)
    ctx.scales = (scale1, scale2)


def _backward(ctx, g1, glse1, g2, glse2):
    q1, k1, v1, y1, lse1, q2, k2, v2, y2, lse2 = ctx.saved_tensors
    g1 = torch.zeros_like(y1) if g1 is None else g1  # an output the loss does not use
    g2 = torch.zeros_like(y2) if g2 is None else g2
    grads = _pair_bwd(g1, q1, k1, v1, y1, lse1, g2, q2, k2, v2, y2, lse2, *ctx.scales)
    return (*grads, None, None)


_pair.register_autograd(_backward, setup_context=_setup)


def causal_attention_pair(q1, k1, v1, q2, k2, v2, scale1=None, scale2=None):
    """(y1, y2): causal attention of (q1, k1, v1) and of (q2, k2, v2), each (B, H, T, D) with qk and v head
    dims of their own, on two CUDA streams at once through cuDNN; scale defaults to 1/sqrt(q's head dim).
    CUDA only, fp16/bf16, no dropout: usable(...) says whether it runs here."""
    scale1 = q1.size(-1) ** -0.5 if scale1 is None else float(scale1)
    scale2 = q2.size(-1) ** -0.5 if scale2 is None else float(scale2)
    y1, _, y2, _ = _pair(q1, k1, v1, q2, k2, v2, scale1, scale2)
    return y1, y2


_notices = set()


@torch._dynamo.assume_constant_result  # a host-side check, read once at trace time (no graph break)
def _device_reason(index: int) -> str:
    """'' when this CUDA device runs the pair through cuDNN, else why not (printed once per device)."""
    if not torch.backends.cuda.cudnn_sdp_enabled():
        why = "cuDNN attention is disabled (torch.backends.cuda.enable_cudnn_sdp(False))"
    elif not torch.backends.cudnn.is_available():
        why = "cuDNN is not available"
    elif torch.cuda.get_device_capability(index) < (9, 0):
        why = f"{torch.cuda.get_device_name(index)} is not a Hopper or newer GPU (only timed on an H200)"
    else:
        return ""
    if index not in _notices:
        _notices.add(index)
        print(f"[two_stream] not used on cuda:{index}: {why}; the head groups run one after the other")
    return why


def usable(*tensors):
    """True when causal_attention_pair can run on these tensors: CUDA, fp16/bf16, head dims up to 256 in
    multiples of 8 (cuDNN's), on a GPU where it was timed (Hopper or newer) with cuDNN attention enabled."""
    t = tensors[0]
    if not t.is_cuda or any(x.dtype not in (torch.float16, torch.bfloat16) for x in tensors):
        return False
    if any(x.size(-1) > 256 or x.size(-1) % 8 for x in tensors):
        return False
    return _device_reason(t.device.index) == ""
