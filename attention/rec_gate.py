"""
A per-token gate on the reciprocal query columns (ra_tokensel's gate), in place.

qkv (N, 3C) is a fused projection's output [Qf | Kf | V], one row per token (N = B*T), D =
C / n_head columns per head with the R reciprocal ones last; m (N,) is one gate value per token:

    Qf[n, h, D-R:] *= m[n]            for every head h; Kf and V untouched
    backward: dQf_old = dQf with the same columns times m,  dm[n] = sum_{h, r} dQf[n, h, D-R+r] Qf_old[n, h, D-R+r]

gate_rec_queries returns q, k, v (B, nh, T, hs), views of the one gated buffer (sdpa's layout).

How, and why this way (the alternatives were slower in GPT-2 124M's compiled training step;
the measurements are in docs/bench.md):
  * not a whole-buffer multiply (qkv * a (3C,) column mask): it reads and writes all 3C columns
    each way.
  * Forward: one Triton kernel scales the H*R gated columns in place (1/24 of the buffer for R = 8,
    D = 64) and keeps their old values (N, H*R). It runs under no_grad: autograd does not see the
    mutation (nothing saved for a backward reads qkv's old values: the linear layer saves its input
    and weight). Its Jacobian is put back by _GateGrad, an identity on q whose backward scales dq
    and gives dm. So the backward works on dq, SDPA's own fresh gradient: the scaling is a
    pointwise op that inductor fuses into the concat of dq, dk, dv that sdpa's backward has anyway,
    and dm reads only the R columns. (An autograd.Function that mutated qkv with mark_dirty made
    inductor write the whole gradient buffer three extra times; ops that called eager torch ops
    left the GPU idle while the host dispatched them.)
  * The kernel is registered with torch.library.triton_op, which torch.compile traces: inductor
    launches it itself and keeps it in place. Without CUDA (or Triton) the same op runs as torch ops.
"""

import torch

from attention.functional import split_heads
from attention.triton_setup import HAS_TRITON, INTERPRET, tl, triton

BLOCK_ROWS = 32  # tokens per program


def _rec_queries(x, n_head, R):
    """(N, 3C) [Qf | Kf | V] -> the view (N, nh, R) of Qf's reciprocal columns."""
    N, C3 = x.shape
    D = C3 // 3 // n_head
    return x.view(N, 3, n_head, D)[:, 0, :, D - R:]


if HAS_TRITON:
    @triton.jit
    def _rec_cols(pid, n_rows, row_stride, D: tl.constexpr, R: tl.constexpr, HR: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK_HR: tl.constexpr):
        """Offsets of a (BLOCK_ROWS, BLOCK_HR) tile of Qf's reciprocal columns, their mask, the rows."""
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        c = tl.arange(0, BLOCK_HR)  # (head, r) flattened: column h * D + D - R + r of the row
        col = (c // R) * D + (D - R) + c % R
        mask = (rows < n_rows)[:, None] & (c < HR)[None, :]
        offs = rows[:, None].to(tl.int64) * row_stride + col[None, :]
        saved = rows[:, None].to(tl.int64) * HR + c[None, :]  # (N, HR) contiguous
        return offs, saved, mask, rows

    @triton.jit
    def _gate_fwd_kernel(QKV, M, SAVED, n_rows, row_stride, D: tl.constexpr, R: tl.constexpr, HR: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_HR: tl.constexpr):
        offs, saved, mask, rows = _rec_cols(tl.program_id(0), n_rows, row_stride, D, R, HR, BLOCK_ROWS, BLOCK_HR)
        x = tl.load(QKV + offs, mask=mask)
        m = tl.load(M + rows, mask=rows < n_rows)
        tl.store(SAVED + saved, x, mask=mask)
        tl.store(QKV + offs, (x * m[:, None]).to(x.dtype), mask=mask)


def _use_kernel(x):
    return HAS_TRITON and (x.is_cuda or INTERPRET)


def _grid(n_rows):
    return (triton.cdiv(n_rows, BLOCK_ROWS),)


def _gate_fwd_impl(qkv, m, saved, n_head, R):
    N, C3 = qkv.shape
    HR = n_head * R
    if _use_kernel(qkv):
        # wrap_triton (torch >= 2.6) lets torch.compile trace the launch; older torch: call the kernel as is.
        # Interpreter: as is too (torch 2.11's wrap_triton rejects the interpreter's kernel object)
        wrap = getattr(torch.library, "wrap_triton", lambda k: k)
        (_gate_fwd_kernel if INTERPRET else wrap(_gate_fwd_kernel))[_grid(N)](
            qkv, m, saved, N, C3, D=C3 // 3 // n_head, R=R, HR=HR,
            BLOCK_ROWS=BLOCK_ROWS, BLOCK_HR=triton.next_power_of_2(HR))
    else:
        rec = _rec_queries(qkv, n_head, R)
        saved.copy_(rec.reshape(N, HR))
        rec.mul_(m.view(N, 1, 1).to(qkv.dtype))


# the op: torch.library.triton_op (torch >= 2.6), so torch.compile sees the kernel (one launch by inductor,
# in place); older torch: an opaque custom op
_op = torch.library.triton_op if hasattr(torch.library, "triton_op") else torch.library.custom_op


@_op("ra::gate_rec_queries_fwd", mutates_args=("qkv", "saved"))
def _gate_fwd(qkv: torch.Tensor, m: torch.Tensor, saved: torch.Tensor, n_head: int, R: int) -> None:
    _gate_fwd_impl(qkv, m, saved, n_head, R)


class _GateGrad(torch.autograd.Function):
    """Identity on q (B, nh, T, hs) in the forward; the gate's Jacobian in the backward (see the
    module docstring). saved (N, nh*R): the gated columns before the gate; m (N,)."""

    @staticmethod
    def forward(ctx, q, m, saved, R):
        ctx.save_for_backward(m, saved)
        ctx.R = R
        return q.view_as(q)

    @staticmethod
    def backward(ctx, dq):
        m, saved = ctx.saved_tensors
        B, H, T, D = dq.shape
        R = ctx.R
        acc = torch.promote_types(dq.dtype, torch.float32)  # fp32 sums for bf16, float64 stays
        old = saved.view(B, T, H, R).transpose(1, 2)  # (B, nh, T, R)
        dm = (dq[..., D - R:].to(acc) * old.to(acc)).sum(dim=(1, 3)).reshape(B * T)  # (N,)
        mq = m.view(B, 1, T, 1).to(dq.dtype)
        col = torch.arange(D, device=dq.device)
        dq = dq * torch.where(col >= D - R, mq, torch.ones((), dtype=dq.dtype, device=dq.device))  # fuses into the concat
        return dq, dm.to(m.dtype), None, None


def gate_rec_queries(qkv, m, B, T, n_head, R):
    """Gate the R reciprocal query columns of every head by the per-token m, in place in qkv.

    qkv (N, 3C) contiguous [Qf | Kf | V], one row per token (N = B*T, rows in (b, t) order); m (N,).
    Returns q, k, v (B, nh, T, hs): views of the gated qkv. Differentiable in qkv and m (the
    module docstring has the math and why the forward's mutation is hidden from autograd)."""
    if qkv.dim() != 2 or not qkv.is_contiguous() or qkv.size(-1) % (3 * n_head) or qkv.size(0) != B * T:
        raise ValueError(f"gate_rec_queries: qkv must be a contiguous (B*T, 3C) = ({B * T}, 3C) with 3C divisible by"
                         f" 3 * n_head (e.g. F.linear(x.view(B * T, C), ...)); got shape {tuple(qkv.shape)},"
                         f" contiguous={qkv.is_contiguous()}, n_head={n_head}")
    if tuple(m.shape) != (qkv.size(0),):
        raise ValueError(f"gate_rec_queries: m must be (N,) = ({qkv.size(0)},), one value per row of qkv; got {tuple(m.shape)}")
    D = qkv.size(-1) // 3 // n_head
    if not 1 <= R < D:
        raise ValueError(f"gate_rec_queries: R={R} must be in [1, head dim - 1] = [1, {D - 1}]")
    m = m.contiguous()
    saved = qkv.new_empty(qkv.size(0), n_head * R)  # the gated columns' values before the gate
    with torch.no_grad():  # the mutation autograd must not see: _GateGrad carries its Jacobian
        _gate_fwd(qkv, m.detach(), saved, n_head, R)
    q, k, v = split_heads(qkv.view(B, T, -1), n_head)  # each (B, nh, T, hs)
    return _GateGrad.apply(q, m, saved, R), k, v
