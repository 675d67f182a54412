"""
The same-FLOP RA weight fold: fold_same_flop_qkv writes W and the amplitudes into the QKV
projection's weight, so ONE F.linear emits Qf, Kf, V (see attention/functional.py for the
same-FLOP form on activations, same_flop_qk, and attention/ra_same_flop.py for its use).

fold_same_flop_qkv is an autograd Function with a hand-written backward (_FoldSameFlop,
_fold_backward); _fold_same_flop_qkv_autograd is the same fold as plain differentiable ops,
the reference the tests compare it with.
"""

import torch
import torch.nn.functional as F


def _fold_same_flop_qkv_autograd(weight, bias, W, s_std, s_rec, rec_on=None):
    """The fold as plain differentiable ops (autograd derives the backward): the reference
    implementation of _FoldSameFlop, kept for tests and benchmarks. Same signature and result."""
    C = weight.size(1)
    H = s_std.numel()
    D, R = W.size(0), W.size(1)
    Ds = D - R
    s = s_std.view(1, H, 1, 1)
    r = s_rec.view(1, H, 1, 1)
    on = None if rec_on is None else rec_on.view(1, H, 1, 1)

    def fold(w):  # w: (2, H, D, X), [q, k] first; X = C for the weight, 1 for the bias
        rec = torch.matmul(W.t().to(w.dtype), w).flip(0)  # (2, H, R, X): Qf gets W^T Wk, Kf gets W^T Wq
        rec = r * rec
        if on is not None:
            rec = torch.where(on, rec, s * w[:, :, Ds:])
        return torch.cat([s * w[:, :, :Ds], rec], dim=2)  # (2, H, D, X)

    w_fold = torch.cat([fold(weight[: 2 * C].view(2, H, D, C)).reshape(2 * C, C), weight[2 * C:]], dim=0)
    b_fold = None
    if bias is not None:
        b_fold = torch.cat([fold(bias[: 2 * C].view(2, H, D, 1)).reshape(2 * C), bias[2 * C:]], dim=0)
    return w_fold, b_fold


def _no_autocast(t):
    """The fold runs in the parameters' dtype: autocast would add casts (and round the tiny matmuls)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _other_side(x, Ds):
    """(3, H, D, ...) [q, k, v] -> (3, H, D - Ds, ...): rows Ds: of [k, q, 0], i.e. for the q
    and k blocks the reciprocal rows of the other side (v gets zeros). Views, flip and pad only:
    under torch.compile they fold into the consumer's indexing (no cat, no copy)."""
    pad = (0, 0) * (x.dim() - 1) + (0, 1)
    return F.pad(x[:2, :, Ds:].flip(0), pad)


def _fold_coefs(s_std, s_rec, rec_on, D, R, dtype):
    """The forward's per-row coefficients on the (3, H, D, 1) row grid ([q, k, v], head, row):
        coef_x: of X (the original rows): s_std on q, k rows, except 0 on the reciprocal rows of
            RA heads; 1 on v rows
        coef_p: of the reciprocal projection: s_rec on the reciprocal rows of RA heads, else 0
    Built from the gates with pad only (no arange masks, no factories), so torch.compile
    inlines them into the kernels that read them. The backward builds its own with other ops
    (_fold_coefs_bw): shared graph nodes would be saved by the partitioner, which does not
    recompute nodes far from the backward, and each saved one costs a kernel in the forward."""
    H = s_std.numel()
    Ds = D - R
    s = s_std.to(dtype).view(1, H, 1, 1)
    r = s_rec.to(dtype).view(1, H, 1, 1)
    coef_x = F.pad(s.expand(2, H, Ds, 1), (0, 0, 0, R))  # (2, H, D, 1): s on the standard rows
    if rec_on is None:
        coef_p = r.expand(2, H, R, 1)
    else:
        on = rec_on.to(dtype).view(1, H, 1, 1)
        coef_x = coef_x + F.pad((s - s * on).expand(2, H, R, 1), (0, 0, Ds, 0))  # plain heads: s on all rows
        coef_p = (r * on).expand(2, H, R, 1)
    coef_x = F.pad(coef_x, (0, 0, 0, 0, 0, 0, 0, 1), value=1.0)  # (3, H, D, 1)
    coef_p = F.pad(coef_p, (0, 0, Ds, 0, 0, 0, 0, 1))  # (3, H, D, 1)
    return coef_x, coef_p


def _fold_coefs_bw(s_std, s_rec, rec_on, D, R, dtype):
    """The backward's coefficients (see _fold_coefs): coef_x (3, H, D, 1) as there; std_mask
    (3, H, D, 1): 1 on the standard rows of q, k (the rows ds_std sees), else 0; rec_amp
    (3, H, 1, 1): s_rec on the q, k blocks of RA heads, else 0."""
    H = s_std.numel()
    Ds = D - R
    s = s_std.to(dtype).view(1, H, 1, 1)
    r = s_rec.to(dtype).view(1, H, 1, 1)
    if rec_on is None:
        std_rows = F.pad(torch.ones(2, H, Ds, 1, dtype=dtype, device=s_std.device), (0, 0, 0, R))
        rec_amp = r
    else:
        off = (~rec_on).to(dtype).view(1, H, 1, 1)  # 1 on plain heads
        std_rows = F.pad(off.expand(2, H, R, 1), (0, 0, Ds, 0), value=1.0)  # (2, H, D, 1)
        rec_amp = r - r * off
    std_mask = F.pad(std_rows, (0, 0, 0, 0, 0, 0, 0, 1))  # (3, H, D, 1)
    coef_x = F.pad(s * std_rows, (0, 0, 0, 0, 0, 0, 0, 1), value=1.0)  # (3, H, D, 1)
    rec_amp = F.pad(rec_amp.expand(2, H, 1, 1), (0, 0, 0, 0, 0, 0, 0, 1))  # (3, H, 1, 1)
    return coef_x, std_mask, rec_amp


class _FoldSameFlop(torch.autograd.Function):
    """fold_same_flop_qkv with a hand-written backward: few, fusable ops in both directions.

    Notation: X = the weight as (3, H, D, C) ([q, k, v], head, row, column), b = the bias as
    (3, H, D); s, r = s_std, s_rec (H,); RA heads: rec_on True (all heads without rec_on);
    rec rows: rows Ds.. of the q, k blocks of RA heads (Ds = D - R); o(t): the other side.
    Forward, with P[t] = W^T X[t] (R, C), ONE batched matmul for every head of q and k:
        F[t, h, d] = coef_x X[t, h, d] + coef_p P[o(t), h, d - Ds]    (_fold_coefs: per-row coefficients)
    i.e. s X on standard rows, r P on rec rows, X on v rows: one pointwise pass, which
    torch.compile fuses with the F.linear's bf16 cast. The bias likewise, its W^T b being a
    D-term reduction fused into the same kernel as its fold.
    Backward, from G = dL/dF (3, H, D, C) and g_rec[t] = G[o(t), :, Ds:] (R, C), the rec rows
    of the other side:
        dX[t] = coef_x G[t] + rec_amp (W @ g_rec[t])     (the R-term sum inline: one pointwise pass)
        N[t] = X[t] @ g_rec[t]^T (D, R),  Sd[t, d] = sum_c (std rows) G X   (one reduction kernel)
        dW = sum_{t, h} rec_amp_h N[t, h],  ds_std = sum_{t, d} Sd,  ds_rec = on sum_{t,d,j} W N
    (ds_rec: sum G[o(t), rec] P[t] = sum X[t] (W @ g_rec[t]) = sum W * N[t], so P is not saved;
    only the inputs are.) In the code: coef_x, coef_p as above; std_mask: 1 on the standard rows
    of q, k; rec_amp: r on the q, k blocks of RA heads, else 0; g_rec = G[o(t), :, Ds:];
    w_g_rec = W @ g_rec; std_sums = Sd; n_cols[j] = N[..., j]; w_dot_n = sum_j W[:, j] N[..., j]
    (the per-element terms of ds_rec). The bias rides along as column C of X and G in the reduction, and
    has its own small pointwise pass for db. Compiled (torch.compiler.is_compiling()), the
    contractions are written as unrolled sums / multiply-and-sum reductions, which inductor
    fuses with the pointwise work around them: no matmul kernel in the backward. Eager (and
    the float64 tests) use matmul / einsum; _fold_backward(fused=True) is tested eagerly too.
    No host sync; fullgraph-compilable.
    """

    @staticmethod
    def forward(ctx, weight, bias, W, s_std, s_rec, rec_on):
        C = weight.size(1)
        H = s_std.numel()
        D, R = W.size(0), W.size(1)
        Ds = D - R
        dt = weight.dtype
        with _no_autocast(weight):
            Wd = W.to(dt)
            coef_x, coef_p = _fold_coefs(s_std, s_rec, rec_on, D, R, dt)
            # P = W^T X for the q and k blocks of every head: ONE batched matmul (W broadcast)
            P = torch.bmm(Wd.t().expand(2 * H, R, D), weight[: 2 * C].reshape(2 * H, D, C))  # (2H, R, C)
            P = F.pad(P.view(2, H, R, C).flip(0), (0, 0, Ds, 0, 0, 0, 0, 1))  # (3, H, D, C): on rec rows
            w_fold = (coef_x * weight.reshape(3, H, D, C) + coef_p * P).view(3 * C, C)
            b_fold = None
            if bias is not None:
                b = bias.reshape(3, H, D)
                bo = F.pad(b[:2].flip(0), (0, 0, 0, 0, 0, 1))  # (3, H, D): the other side's bias
                Wx = F.pad(Wd, (Ds, 0))  # (D, D): Wx[:, Ds + j] = W[:, j], zeros before
                if torch.compiler.is_compiling():  # a D-term reduction fused with the bias fold
                    p = (bo.unsqueeze(-1) * Wx).sum(-2)  # (3, H, D)
                else:
                    p = torch.matmul(bo, Wx)
                b_fold = (coef_x[..., 0] * b + coef_p[..., 0] * p).view(3 * C)
        ctx.save_for_backward(weight, bias, W, s_std, s_rec, rec_on)
        ctx.has_bias = bias is not None
        return w_fold, b_fold

    @staticmethod
    def backward(ctx, g_w, g_b):
        weight, bias, W, s_std, s_rec, rec_on = ctx.saved_tensors
        return _fold_backward(weight, bias if ctx.has_bias else None, W, s_std, s_rec, rec_on, g_w, g_b,
                              ctx.needs_input_grad, torch.compiler.is_compiling())


def _fold_backward(weight, bias, W, s_std, s_rec, rec_on, g_w, g_b, needs=(True,) * 5, fused=False):
    """_FoldSameFlop's backward -> (d_weight, d_bias, d_W, d_s_std, d_s_rec, None).

    fused (torch.compile): the contractions are unrolled sums and multiply-and-sum reductions
    that inductor fuses into 5 kernels (for GPT-2 shapes, checked on inductor's output code):
    d_weight (one pointwise pass, replacing the bf16->fp32 cast of the F.linear's weight
    grad), d_bias, the R + 1 column reductions N_j, Sd (one kernel, each row of X read once),
    ds_std with ds_rec, and dW. Otherwise (eager) matmuls and einsum."""
    C = weight.size(1)
    H = s_std.numel()
    D, R = W.size(0), W.size(1)
    Ds = D - R
    dt = weight.dtype
    need_w, need_b, need_W, need_s, need_r = needs[:5]
    d_w = d_b = d_W = d_s = d_r = None
    with _no_autocast(weight):
        Wd = W.to(dt)
        coef_x, std_mask, rec_amp = _fold_coefs_bw(s_std, s_rec, rec_on, D, R, dt)
        X = weight.reshape(3, H, D, C)
        G = g_w.to(dt).reshape(3, H, D, C)
        if need_w:  # dX = coef_x G + rec_amp (W @ g_rec): R terms per element, inline
            g_rec = _other_side(G, Ds)  # (3, H, R, C): rec rows of the other side, zeros for v
            w_g_rec = _rows_times_W(Wd, g_rec, fused)  # (3, H, D, C)
            d_w = (coef_x * G + rec_amp * w_g_rec).view(3 * C, C)
        if bias is not None:
            b = bias.reshape(3, H, D)
            gb = g_b.to(dt).reshape(3, H, D)
            if need_b:
                mb = _rows_times_W(Wd, _other_side(gb.unsqueeze(-1), Ds), fused)[..., 0]  # (3, H, D)
                d_b = (coef_x[..., 0] * gb + rec_amp[..., 0] * mb).view(3 * C)
            # the bias as a column C of the weight: every reduction below covers both
            X = F.pad(X, (0, 1)) + F.pad(b.unsqueeze(-1), (C, 0))  # (3, H, D, C + 1)
            G = F.pad(G, (0, 1)) + F.pad(gb.unsqueeze(-1), (C, 0))
        if need_W or need_s or need_r:
            # q, k blocks: N[t] = X[t] @ g_rec[t]^T (D, R) and std_sums[t, d] = sum_c std_mask G X
            # (the standard rows' share of ds_std); then dW, ds_std, ds_rec are small sums of N, std_sums
            Xq = X[:2]
            g_rec = _other_side(G, Ds)[:2]  # (2, H, R, C')
            Gstd = (std_mask * G)[:2]  # (2, H, D, C')
            if fused:
                # R + 1 reductions of one shape over the columns, which inductor fuses into one
                # kernel that reads each row of X once: std_sums and N[..., j] = X[t] . g_rec[t, :, j]
                std_sums = (Xq * Gstd).sum(-1)  # (2, H, D)
                n_cols = [(Xq * g_rec[:, :, j:j + 1]).sum(-1) for j in range(R)]  # R x (2, H, D)
                # the j-sum of ds_rec unrolled (fused into the kernel above), then ds_std and ds_rec
                # as one (t, d) reduction of the stacked [std_sums, sum_j W N_j] (2, 2, H, D)
                w_dot_n = n_cols[0] * Wd[:, 0]
                for j in range(1, R):
                    w_dot_n = w_dot_n + n_cols[j] * Wd[:, j]
                if rec_on is not None:  # plain heads: no reciprocal term
                    w_dot_n = torch.where(rec_on.view(1, H, 1), w_dot_n, torch.zeros_like(w_dot_n))
                d_s, d_r = torch.stack([std_sums, w_dot_n]).sum(dim=(1, 3))  # (H,), (H,)
                if need_W:  # R reductions of one shape: one kernel
                    d_W = torch.stack([(rec_amp[:2, :, :, 0] * n).sum(dim=(0, 1)) for n in n_cols],
                                      dim=-1)  # (D, R)
            else:
                N = torch.einsum("thdc,thjc->thdj", Xq, g_rec)  # (2, H, D, R)
                if need_s:
                    d_s = (Xq * Gstd).sum(dim=(0, 2, 3))  # (H,)
                if need_r:  # sum G[o(t), rec] P[t] = sum X[t] (W @ g_rec[t]) = sum W * N[t]
                    d_r = (N * Wd).sum(dim=(0, 2, 3))  # (H,)
                if need_W:
                    d_W = (rec_amp[:2] * N).sum(dim=(0, 1))  # (D, R)
                if need_r and rec_on is not None:
                    d_r = torch.where(rec_on, d_r, torch.zeros_like(d_r))  # plain heads: no reciprocal term
    cast = lambda g, like: None if g is None else g.to(like.dtype)
    return (cast(d_w, weight), None if bias is None else cast(d_b, bias), cast(d_W, W),
            cast(d_s, s_std), cast(d_r, s_rec), None)


def _rows_times_W(W, rows, fused):
    """W (D, R) @ rows (..., R, X) -> (..., D, X). Fused: an unrolled sum of R broadcast
    products, which inductor inlines into the consumer's pointwise pass (no matmul kernel)."""
    if not fused:
        return torch.matmul(W, rows)
    D, R = W.shape
    out = W[:, 0].view(D, 1) * rows[..., 0:1, :]
    for j in range(1, R):
        out = out + W[:, j].view(D, 1) * rows[..., j:j + 1, :]
    return out


def fold_same_flop_qkv(weight, bias, W, s_std, s_rec, rec_on=None):
    """Fold same-FLOP RA into a QKV projection, so ONE F.linear emits Qf, Kf, V.

    weight (3C, C), bias (3C,) or None: nn.Linear layout, rows [q | k | v], D rows per head.
    Since K @ W = x @ (Wk_h^T W) + bk_h W, the reciprocal channel is R more rows per head:
        Qf_h rows = [s_std * Wq_h[:D-R], s_rec * W^T Wk_h]
        Kf_h rows = [s_std * Wk_h[:D-R], s_rec * W^T Wq_h]
    (rows D-R: of plain heads, rec_on False, stay s_std * W{q,k}_h[D-R:]). Returns the
    folded (weight, bias), in the weight's dtype (autocast casts it for the F.linear).
    A custom autograd.Function (_FoldSameFlop): forward is one batched matmul on a
    (2H, D, C) view of the weight plus one pointwise pass per output (fused with the F.linear's
    bf16 cast under torch.compile); backward is one pointwise pass for the weight's gradient,
    one for the bias's and a few reductions, no matmul. No host sync; fullgraph-compilable.
    _fold_same_flop_qkv_autograd is the same fold with an autograd-derived backward.
    """
    return _FoldSameFlop.apply(weight, bias, W, s_std, s_rec, rec_on)
