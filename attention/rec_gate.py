"""
A per-token gate on the reciprocal query columns, in place (ra_tokensel's gate).

qkv (N, 3C) is a fused projection's output [Qf | Kf | V], one row per token (N = B*T), D =
C / n_head columns per head with the R reciprocal ones last; m (N,) is one gate value per token:

    Qf[n, h, D-R:] *= m[n]            for every head h; Kf and V untouched
    d qkv = g with the same columns times m,   dm[n] = sum_{h, r} g[n, h, D-R+r] * Qf_old[n, h, D-R+r]

Only H*R of the 3C columns are read and written (1/24 of the buffer for GPT-2's R = 8, D = 64),
and q, k, v stay views of one buffer (sdpa's layout). The forward keeps the gated columns' old
values (N, H*R) for dm. qkv must be a tensor of its own, not a view (the linear layer's output
for a 2D input is; for a 3D input it is a view, which AOTAutograd cannot trace an in-place
autograd.Function on).

Why kernels: under torch.compile, an in-place slice multiply is functionalized into a copy of
the whole buffer, and an out-of-place backward made inductor write two whole gradient buffers
(the old gate: 1.10x sdpa's training step on an H100). A mutating op that calls eager torch ops
fixed the GPU work but cost ~9 ms per step of GPU idle (a dozen host-side op dispatches per layer
on a host that barely keeps ahead of the GPU). So: one Triton kernel each way, registered with
torch.library.triton_op, which torch.compile traces into its graph (inductor launches the kernel
itself and keeps the mutation in place). Without CUDA (or Triton) the same ops run as torch ops.
"""

import torch

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

    @triton.jit
    def _gate_bwd_kernel(G, M, SAVED, DM, n_rows, row_stride, D: tl.constexpr, R: tl.constexpr, HR: tl.constexpr,
                         BLOCK_ROWS: tl.constexpr, BLOCK_HR: tl.constexpr, F64: tl.constexpr):
        offs, saved, mask, rows = _rec_cols(tl.program_id(0), n_rows, row_stride, D, R, HR, BLOCK_ROWS, BLOCK_HR)
        acc = tl.float64 if F64 else tl.float32
        g = tl.load(G + offs, mask=mask)
        x = tl.load(SAVED + saved, mask=mask)
        m = tl.load(M + rows, mask=rows < n_rows)
        tl.store(DM + rows, tl.sum(g.to(acc) * x.to(acc), axis=1), mask=rows < n_rows)  # before g is scaled
        tl.store(G + offs, (g * m[:, None]).to(g.dtype), mask=mask)


def _use_kernel(x):
    return HAS_TRITON and (x.is_cuda or INTERPRET)


def _grid(n_rows):
    return (triton.cdiv(n_rows, BLOCK_ROWS),)


def _gate_fwd_impl(qkv, m, saved, n_head, R):
    N, C3 = qkv.shape
    HR = n_head * R
    if _use_kernel(qkv):
        wrap = torch.library.wrap_triton if not INTERPRET else (lambda k: k)
        wrap(_gate_fwd_kernel)[_grid(N)](qkv, m, saved, N, C3, D=C3 // 3 // n_head, R=R, HR=HR,
                                             BLOCK_ROWS=BLOCK_ROWS, BLOCK_HR=triton.next_power_of_2(HR))
    else:
        rec = _rec_queries(qkv, n_head, R)
        saved.copy_(rec.reshape(N, HR))
        rec.mul_(m.view(N, 1, 1).to(qkv.dtype))


def _gate_bwd_impl(g, m, saved, dm, n_head, R):
    N, C3 = g.shape
    HR = n_head * R
    if _use_kernel(g):
        wrap = torch.library.wrap_triton if not INTERPRET else (lambda k: k)
        wrap(_gate_bwd_kernel)[_grid(N)](g, m, saved, dm, N, C3, D=C3 // 3 // n_head, R=R, HR=HR,
                                             BLOCK_ROWS=BLOCK_ROWS, BLOCK_HR=triton.next_power_of_2(HR),
                                             F64=g.dtype == torch.float64)
    else:
        g_rec = _rec_queries(g, n_head, R)
        acc = torch.promote_types(g.dtype, torch.float32)
        dm.copy_((g_rec.to(acc) * saved.view(N, n_head, R).to(acc)).sum(dim=(-1, -2)))
        g_rec.mul_(m.view(N, 1, 1).to(g.dtype))


# the ops: torch.library.triton_op, so torch.compile sees the kernel (one launch by inductor, in place)
_op = torch.library.triton_op if hasattr(torch.library, "triton_op") else torch.library.custom_op


@_op("ra::gate_rec_queries_fwd", mutates_args=("qkv", "saved"))
def _gate_fwd(qkv: torch.Tensor, m: torch.Tensor, saved: torch.Tensor, n_head: int, R: int) -> None:
    _gate_fwd_impl(qkv, m, saved, n_head, R)


@_op("ra::gate_rec_queries_bwd", mutates_args=("g", "dm"))
def _gate_bwd(g: torch.Tensor, m: torch.Tensor, saved: torch.Tensor, dm: torch.Tensor, n_head: int, R: int) -> None:
    _gate_bwd_impl(g, m, saved, dm, n_head, R)


class _GateRecQueries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, m, n_head, R):
        m = m.contiguous()
        saved = qkv.new_empty(qkv.size(0), n_head * R)  # the gated columns' values before the gate
        _gate_fwd(qkv, m, saved, n_head, R)
        ctx.save_for_backward(saved, m)
        ctx.n_head, ctx.R, ctx.m_dtype = n_head, R, m.dtype
        ctx.mark_dirty(qkv)
        return qkv

    @staticmethod
    def backward(ctx, g):
        saved, m = ctx.saved_tensors
        if not torch.compiler.is_compiling() or not g.is_contiguous():
            # eager autograd may hand this same gradient tensor to other nodes: scale a copy. (Compiled,
            # g is a graph intermediate and functionalization keeps the in-place update safe.)
            g = g.clone(memory_format=torch.contiguous_format)
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        dm = torch.empty(m.shape, device=m.device, dtype=acc)
        _gate_bwd(g, m, saved, dm, ctx.n_head, ctx.R)
        return g, (dm.to(ctx.m_dtype) if ctx.needs_input_grad[1] else None), None, None


def gate_rec_queries_(qkv, m, n_head, R):
    """Scale the R reciprocal query columns of every head by the per-token gate m, IN PLACE.

    qkv (N, 3C) contiguous [Qf | Kf | V], one row per token; m (N,). Returns qkv (mutated).
    Differentiable in qkv and m (see the module docstring for the math)."""
    if qkv.dim() != 2 or not qkv.is_contiguous() or qkv.size(-1) % (3 * n_head):
        raise ValueError(f"gate_rec_queries_: qkv must be a contiguous (N, 3C) with 3C divisible by 3 * n_head (e.g."
                         f" F.linear(x.view(B * T, C), ...)); got shape {tuple(qkv.shape)}, contiguous="
                         f"{qkv.is_contiguous()}, n_head={n_head}")
    if tuple(m.shape) != (qkv.size(0),):
        raise ValueError(f"gate_rec_queries_: m must be (N,) = ({qkv.size(0)},), one value per row of qkv; got {tuple(m.shape)}")
    D = qkv.size(-1) // 3 // n_head
    if not 1 <= R < D:
        raise ValueError(f"gate_rec_queries_: R={R} must be in [1, head dim - 1] = [1, {D - 1}]")
    return _GateRecQueries.apply(qkv, m, n_head, R)
