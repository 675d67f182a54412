"""
CTR ("causal-transpose-reuse"): exact reciprocal attention (RA) as fused Triton kernels.

    s_ij = scale * (a_h q_i.k_j + b_h q_j.k_i)   for j <= i,   out_i = sum_j softmax_j(s_i.) v_j

which is exactly `functional.reciprocal_attention`. The reciprocal term q_j.k_i of query block I
and key block J is the transpose of the standard term of the mirrored (upper-triangle) block pair,
so a program that keeps Q_I and K_I resident and streams Q_J, K_J, V_J computes both with two
tile products of the causal (lower) half: 1.5x the matmul work of plain causal attention, one
softmax, no T x T matrix.

Forward (`_ctr_fwd_kernel`): grid (T / BLOCK_M, B*H), heaviest query blocks first. Q_I, K_I stay
in registers/shared memory; for each key block J <= I: S = ca Q_I K_J^T + cb K_I Q_J^T (ca, cb =
a, b times scale*log2(e)), causal mask on the diagonal block(s) only, one online softmax with
exp2, O += P V_J. Stores O and the row log-sum-exp (base 2) for the backward.

Backward, FlashAttention-2 style (P recomputed from the LSE; Delta_i = dO_i.O_i from a small
preprocessing kernel). With dS = P * (dP - Delta), dP = dO V^T:

    dq_m = scale * (a sum_j dS_mj k_j   +  b sum_i dS_im k_i)     (row form + column form)
    dk_m = scale * (a sum_i dS_im q_i   +  b sum_j dS_mj q_j)     (column form + row form)
    dv_m = sum_i P_im dO_i
    da_h = scale * sum dS_ij q_i.k_j,    db_h = scale * sum dS_ij q_j.k_i

A program owning key block J and sweeping the query blocks I >= J (the KV-major FA2 order) gets the
column forms of dq_J AND dk_J (and dv_J) in registers; the row forms of dq_I, dk_I belong to other
programs. So each program X first does a row sweep over key blocks J <= X (X as the query block:
row parts of dq_X, dk_X, and da/db from them as scale q_x.(dS K)_x and scale k_x.(dS Q)_x), then
the column sweep over query blocks I >= X (dv, column parts of dk_X, dq_X), recomputing P in both.
Work per program is constant (T / BLOCK_M steps for every X); no atomics, so the backward is
deterministic and dq/dk are stored once, in the input dtype. The price: 11 tile products per RA
block pair (plain heads: 7, like the Triton tutorial) instead of the 8 of a scheme that adds the
row parts into fp32 buffers by atomics; with the forward's 3 that is 14 products against plain
attention's 7, i.e. 2.0x at equal tile speed. (The atomic scheme and its variants were measured
slower: docs/bench.md, "Tried and dropped".)

da, db: per-program partial sums into a buffer, reduced in torch (deterministic).

Speed against cuDNN SDPA, and why small shapes are host-bound unless compiled or captured in a
CUDA graph (the custom op's dispatch costs host time): docs/bench.md.

Head selection: b_h is read in the kernel; a head with b_h == 0 runs the plain-attention loops
(no Q_J / K_I tiles, no second product), so it costs plain causal attention forward. Its db_h
(the gradient at b = 0 is in general not 0) still needs sum dS_ij q_j.k_i, which costs one extra
product per backward block pair; pass db_at_zero=False to skip it (db_h = 0 for those heads,
i.e. a stop-gradient), which the head-selective variant may want.

Config: triton.autotune over 3-4 block shapes per head dim on the first call for a (T, D, B*H,
dtype); the choice is remembered and later calls launch the kernel directly (less host overhead).
Under TRITON_INTERPRET=1 (the CPU tests) one fixed small config (INTERPRET_CONFIG), since the
interpreter fails with several configs. First use compiles ~7 kernels (about a minute).
"""

import math

import torch
import torch.nn.functional as F

from attention.functional import ra_operands, reciprocal_attention

from attention.triton_setup import HAS_TRITON, INTERPRET, tl, triton

# block shapes used under the interpreter (and by explicit `config=` calls):
# fwd: BLOCK_M query rows per program, BLOCK_N keys per step (BLOCK_M % BLOCK_N == 0)
# bwd: BLOCK_N key rows per program, BLOCK_M rows per step (BLOCK_N % BLOCK_M == 0)
INTERPRET_CONFIG = {
    "fwd": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1),
    "bwd": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
}
LAST_KERNELS = {}  # the compiled kernels of the last launches (register / spill reports)


if HAS_TRITON:
    # the kernels keep scores in log2 units (exp2 is the fast instruction): exp(x) = exp2(x * LOG2E)
    LOG2E = tl.constexpr(1.4426950408889634)

    # the loops' bounds are runtime scalars. Compiled, _range is tl.range (the same loop as range). Triton
    # 3.6's interpreter turns them into ints by int() of a shape-(1,) array, which numpy >= 2.4 refuses
    # (Triton 3.9's does not), so under the interpreter they are unwrapped first.
    if INTERPRET:
        def _range(lo, hi, step):
            return range(*(int(x.handle.data.item()) if isinstance(x, tl.tensor) else x for x in (lo, hi, step)))
    else:
        _range = tl.range

    @triton.jit
    def _load_rows(base, offs_r, stride_r, offs_d, T, MASKED: tl.constexpr):
        """Load a [len(offs_r), D] tile of rows offs_r (rows >= T read as 0 when MASKED)."""
        ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :]
        if MASKED:
            x = tl.load(ptrs, mask=offs_r[:, None] < T, other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    # ------------------------------------------------------------------ forward
    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q_i, k_i, Qb, Kb, Vb, sqt, skt, svt, outer, r, lo, hi, offs_m, offs_d, T,
                   BLOCK_N: tl.constexpr, RA: tl.constexpr, SWAP: tl.constexpr, DIAG: tl.constexpr):
        """Online softmax over key blocks [lo, hi). Scores (log2 units), one accumulator chain:
        plain: outer * Q_I K_J^T;  RA: outer * (Q_I K_J^T + r K_I Q_J^T)  (SWAP: the two terms swapped),
        with |r| <= 1 chosen by the caller, so s = ca q_i.k_j + cb k_i.q_j in fp32."""
        offs_n0 = tl.arange(0, BLOCK_N)
        for start_n in _range(lo, hi, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            offs_n = start_n + offs_n0
            k_j = _load_rows(Kb, offs_n, skt, offs_d, T, DIAG)
            if RA:
                q_j = _load_rows(Qb, offs_n, sqt, offs_d, T, DIAG)
                if SWAP:
                    s = tl.dot(k_i, tl.trans(q_j), tl.dot(q_i, tl.trans(k_j)) * r) * outer
                else:
                    s = tl.dot(q_i, tl.trans(k_j), tl.dot(k_i, tl.trans(q_j)) * r) * outer
            else:
                s = tl.dot(q_i, tl.trans(k_j)) * outer
            if DIAG:
                s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_j = _load_rows(Vb, offs_n, svt, offs_d, T, DIAG)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v_j.dtype), v_j, acc)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["BH"])
    def _ctr_fwd_kernel(Q, K, V, A, Bw, O, LSE, sm_scale, T, H, BH,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        tl.static_assert(BLOCK_M % BLOCK_N == 0)
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
        bh = tl.program_id(1)
        off_b = (bh // H).to(tl.int64)
        off_h = bh % H
        Qb = Q + off_b * sqb + off_h.to(tl.int64) * sqh
        Kb = K + off_b * skb + off_h.to(tl.int64) * skh
        Vb = V + off_b * svb + off_h.to(tl.int64) * svh
        a = tl.load(A + off_h)
        bw = tl.load(Bw + off_h)
        ca = a * sm_scale * LOG2E
        cb = bw * sm_scale * LOG2E

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q_i = _load_rows(Qb, offs_m, sqt, offs_d, T, True)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        lo = pid_m * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, T)
        if bw != 0.0:
            k_i = _load_rows(Kb, offs_m, skt, offs_d, T, True)
            if tl.abs(ca) >= tl.abs(cb):
                r = cb / ca
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_i, k_i, Qb, Kb, Vb, sqt, skt, svt, ca, r, 0, lo,
                                           offs_m, offs_d, T, BLOCK_N, True, False, False)
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_i, k_i, Qb, Kb, Vb, sqt, skt, svt, ca, r, lo, hi,
                                           offs_m, offs_d, T, BLOCK_N, True, False, True)
            else:
                r = ca / cb
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_i, k_i, Qb, Kb, Vb, sqt, skt, svt, cb, r, 0, lo,
                                           offs_m, offs_d, T, BLOCK_N, True, True, False)
                acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_i, k_i, Qb, Kb, Vb, sqt, skt, svt, cb, r, lo, hi,
                                           offs_m, offs_d, T, BLOCK_N, True, True, True)
        else:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_i, q_i, Qb, Kb, Vb, sqt, skt, svt, ca, cb, 0, lo,
                                       offs_m, offs_d, T, BLOCK_N, False, False, False)
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_i, q_i, Qb, Kb, Vb, sqt, skt, svt, ca, cb, lo, hi,
                                       offs_m, offs_d, T, BLOCK_N, False, False, True)
        lse = m_i + tl.math.log2(l_i)
        o = acc / l_i[:, None]
        row_ok = offs_m < T
        tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=row_ok)
        Ob = O + bh.to(tl.int64) * T * D
        tl.store(Ob + offs_m[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=row_ok[:, None])

    # ------------------------------------------------------------------ backward
    @triton.jit
    def _ctr_bwd_pre_kernel(O, DO, DELTA, T, H, sdob, sdoh, sdot, D: tl.constexpr, BLOCK_M: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        DOb = DO + (bh // H).to(tl.int64) * sdob + (bh % H).to(tl.int64) * sdoh
        Ob = O + bh.to(tl.int64) * T * D
        o = _load_rows(Ob, offs_m, D, offs_d, T, True).to(tl.float32)
        do = _load_rows(DOb, offs_m, sdot, offs_d, T, True).to(tl.float32)
        tl.store(DELTA + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)

    @triton.jit
    def _bwd_col_inner(dk, dq, dv, k_x, v_x, q_x, offs_n,
                       Qb, Kb, DOb, LSEb, DELb, sqt, skt, sdot,
                       lo, hi, T, ca, cb, cqa, ckb, offs_d,
                       BLOCK_M: tl.constexpr, RA: tl.constexpr, DIAG: tl.constexpr, MASKED: tl.constexpr):
        """Key block X (rows offs_n) against query blocks [lo, hi), tiles [BLOCK_N, BLOCK_M]:
        dv and the column forms of dk (factor a), dq (factor b), scaled here."""
        offs_m0 = tl.arange(0, BLOCK_M)
        for start_m in _range(lo, hi, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            offs_m = start_m + offs_m0
            q_i = _load_rows(Qb, offs_m, sqt, offs_d, T, MASKED)
            if MASKED:
                lse_i = tl.load(LSEb + offs_m, mask=offs_m < T, other=float("inf"))
                del_i = tl.load(DELb + offs_m, mask=offs_m < T, other=0.0)
            else:
                lse_i = tl.load(LSEb + offs_m)
                del_i = tl.load(DELb + offs_m)
            sT = tl.dot(k_x, tl.trans(q_i)) * ca  # [j, i]: ca k_j.q_i
            if RA:
                k_i = _load_rows(Kb, offs_m, skt, offs_d, T, MASKED)
            if RA:
                sT += tl.dot(q_x, tl.trans(k_i)) * cb  # + cb q_j.k_i
            pT = tl.math.exp2(sT - lse_i[None, :])
            if DIAG:
                pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
            do_i = _load_rows(DOb, offs_m, sdot, offs_d, T, MASKED)
            dv += tl.dot(pT.to(do_i.dtype), do_i)
            dpT = tl.dot(v_x, tl.trans(do_i))
            dsT = pT * (dpT - del_i[None, :])
            dk += tl.dot((dsT * cqa).to(q_i.dtype), q_i)
            if RA:
                dq += tl.dot((dsT * ckb).to(k_i.dtype), k_i)
        return dk, dq, dv

    @triton.jit
    def _bwd_row_inner(rq, rk, q_x, k_x, do_x, lse_x, del_x, offs_x, Qb, Kb, Vb, sqt, skt, svt,
                       lo, hi, T, ca, cb, offs_d,
                       BLOCK_M: tl.constexpr, RA: tl.constexpr, DB: tl.constexpr, DIAG: tl.constexpr):
        """Query block X (rows offs_x) against key blocks [lo, hi), tiles [BLOCK_N, BLOCK_M]:
        unscaled row forms rq = sum_j dS_xj k_j and (RA or DB) rk = sum_j dS_xj q_j."""
        offs_n0 = tl.arange(0, BLOCK_M)
        for start_n in _range(lo, hi, BLOCK_M):
            start_n = tl.multiple_of(start_n, BLOCK_M)
            offs_n = start_n + offs_n0
            k_j = _load_rows(Kb, offs_n, skt, offs_d, T, DIAG)
            s = tl.dot(q_x, tl.trans(k_j)) * ca
            if RA or DB:
                q_j = _load_rows(Qb, offs_n, sqt, offs_d, T, DIAG)
            if RA:
                s += tl.dot(k_x, tl.trans(q_j)) * cb
            p = tl.math.exp2(s - lse_x[:, None])
            if DIAG:
                p = tl.where(offs_x[:, None] >= offs_n[None, :], p, 0.0)
            v_j = _load_rows(Vb, offs_n, svt, offs_d, T, DIAG)
            dp = tl.dot(do_x, tl.trans(v_j))
            ds = (p * (dp - del_x[:, None])).to(k_j.dtype)
            rq += tl.dot(ds, k_j)
            if RA or DB:
                rk += tl.dot(ds, q_j)
        return rq, rk

    @triton.jit(do_not_specialize=["BH"])
    def _ctr_bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, DAB, A, Bw, sm_scale, T, H, BH, NJ,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        NEED_DB: tl.constexpr, EVEN: tl.constexpr):
        """One program per (block X of BLOCK_N rows, batch*head): a row sweep (X as queries, key
        blocks J <= X) gives the row forms of dq_X, dk_X and da/db, then the column sweep adds the
        column forms; DQ/DK are written once."""
        tl.static_assert(BLOCK_N % BLOCK_M == 0)
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        off_b = (bh // H).to(tl.int64)
        off_h = bh % H
        Qb = Q + off_b * sqb + off_h.to(tl.int64) * sqh
        Kb = K + off_b * skb + off_h.to(tl.int64) * skh
        Vb = V + off_b * svb + off_h.to(tl.int64) * svh
        DOb = DO + off_b * sdob + off_h.to(tl.int64) * sdoh
        LSEb = LSE + bh.to(tl.int64) * T
        DELb = DELTA + bh.to(tl.int64) * T
        DQb = DQ + bh.to(tl.int64) * T * D
        DKb = DK + bh.to(tl.int64) * T * D
        DVb = DV + bh.to(tl.int64) * T * D
        a = tl.load(A + off_h)
        bw = tl.load(Bw + off_h)
        ca = a * sm_scale * LOG2E
        cb = bw * sm_scale * LOG2E
        cqa = a * sm_scale
        ckb = bw * sm_scale

        start_n = pid * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        row_ok = offs_n < T
        ptr_off = offs_n[:, None] * D + offs_d[None, :]
        hi_d = tl.minimum(start_n + BLOCK_N, T)
        k_x = _load_rows(Kb, offs_n, skt, offs_d, T, True)
        q_x = _load_rows(Qb, offs_n, sqt, offs_d, T, True)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dq = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)

        # row sweep first: X as the query block against key blocks J <= X
        do_x = _load_rows(DOb, offs_n, sdot, offs_d, T, True)
        lse_x = tl.load(LSEb + offs_n, mask=row_ok, other=float("inf"))
        del_x = tl.load(DELb + offs_n, mask=row_ok, other=0.0)
        if bw != 0.0:
            dq, dk = _bwd_row_inner(dq, dk, q_x, k_x, do_x, lse_x, del_x, offs_n, Qb, Kb, Vb, sqt, skt, svt,
                                    0, start_n, T, ca, cb, offs_d, BLOCK_M, True, True, False)
            dq, dk = _bwd_row_inner(dq, dk, q_x, k_x, do_x, lse_x, del_x, offs_n, Qb, Kb, Vb, sqt, skt, svt,
                                    start_n, hi_d, T, ca, cb, offs_d, BLOCK_M, True, True, True)
        else:
            dq, dk = _bwd_row_inner(dq, dk, q_x, k_x, do_x, lse_x, del_x, offs_n, Qb, Kb, Vb, sqt, skt, svt,
                                    0, start_n, T, ca, cb, offs_d, BLOCK_M, False, NEED_DB, False)
            dq, dk = _bwd_row_inner(dq, dk, q_x, k_x, do_x, lse_x, del_x, offs_n, Qb, Kb, Vb, sqt, skt, svt,
                                    start_n, hi_d, T, ca, cb, offs_d, BLOCK_M, False, NEED_DB, True)
        # da = scale sum_i q_i.(dS K)_i,  db = scale sum_i k_i.(dS Q)_i. The tiles are loaded
        # again: reusing the dot-operand copies gave wrong sums for some configs (Triton 3.6)
        q_e = _load_rows(Qb, offs_n, sqt, offs_d, T, True).to(tl.float32)
        k_e = _load_rows(Kb, offs_n, skt, offs_d, T, True).to(tl.float32)
        da_sum = tl.sum(tl.sum(q_e * dq, 1), 0) * sm_scale
        db_sum = tl.sum(tl.sum(k_e * dk, 1), 0) * sm_scale
        dq = dq * cqa
        dk = dk * ckb

        # column sweep over query blocks I >= X: the diagonal blocks (masked), then the rest
        v_x = _load_rows(Vb, offs_n, svt, offs_d, T, True)
        if bw != 0.0:
            dk, dq, dv = _bwd_col_inner(dk, dq, dv, k_x, v_x, q_x, offs_n, Qb, Kb, DOb, LSEb, DELb, sqt, skt, sdot,
                                        start_n, hi_d, T, ca, cb, cqa, ckb, offs_d, BLOCK_M, True, True, True)
            dk, dq, dv = _bwd_col_inner(dk, dq, dv, k_x, v_x, q_x, offs_n, Qb, Kb, DOb, LSEb, DELb, sqt, skt, sdot,
                                        start_n + BLOCK_N, T, T, ca, cb, cqa, ckb, offs_d, BLOCK_M, True, False,
                                        not EVEN)
        else:
            dk, dq, dv = _bwd_col_inner(dk, dq, dv, k_x, v_x, q_x, offs_n, Qb, Kb, DOb, LSEb, DELb, sqt, skt, sdot,
                                        start_n, hi_d, T, ca, cb, cqa, ckb, offs_d, BLOCK_M, False, True, True)
            dk, dq, dv = _bwd_col_inner(dk, dq, dv, k_x, v_x, q_x, offs_n, Qb, Kb, DOb, LSEb, DELb, sqt, skt, sdot,
                                        start_n + BLOCK_N, T, T, ca, cb, cqa, ckb, offs_d, BLOCK_M, False, False,
                                        not EVEN)

        tl.store(DVb + ptr_off, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])
        tl.store(DKb + ptr_off, dk.to(DK.dtype.element_ty), mask=row_ok[:, None])
        tl.store(DQb + ptr_off, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])
        tl.store(DAB + (bh.to(tl.int64) * NJ + pid) * 2, da_sum)
        tl.store(DAB + (bh.to(tl.int64) * NJ + pid) * 2 + 1, db_sum)

    # ------------------------------------------------------------------ autotuned entry points
    def _cfg(bm, bn, w, s):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)

    # candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class: few, so the first call's
    # autotuning stays short, and chosen to compile without register spills where possible (the
    # D=128 backward spills a little in all of them). Which won where: docs/bench.md.
    _FWD_BY_D = {
        64: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        128: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2)],
    }
    _BWD_BY_D = {  # bwd: BLOCK_M = query rows per step, BLOCK_N = key rows per program
        64: [(16, 64, 4, 3), (16, 128, 8, 3), (32, 128, 8, 2), (16, 64, 4, 4)],
        128: [(16, 64, 8, 3), (32, 64, 8, 2), (16, 32, 4, 2), (16, 32, 4, 3)],
    }

    def _union(by_d):
        seen = []
        for lst in by_d.values():
            seen += [t for t in lst if t not in seen]
        return [_cfg(*t) for t in seen]

    _FWD_CONFIGS = _union(_FWD_BY_D)
    _BWD_CONFIGS = _union(_BWD_BY_D)

    def _key(c):
        return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    def _pruner(by_d):
        def prune(configs, named_args, **kwargs):
            D = kwargs.get("D", named_args.get("D", 64))
            want = by_d[128 if D >= 128 else 64]
            keep = [c for c in configs if _key(c) in want]
            return keep or configs[:1]
        return prune

    _fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["T", "D", "BH"], prune_configs_by={"early_config_prune": _pruner(_FWD_BY_D)})(
        _ctr_fwd_kernel)
    _bwd_tuned = triton.autotune(
        _BWD_CONFIGS, key=["T", "D", "BH", "NEED_DB"], prune_configs_by={"early_config_prune": _pruner(_BWD_BY_D)},
        reset_to_zero=["DAB"])(
        triton.heuristics({"EVEN": lambda args: args["T"] % args["BLOCK_N"] == 0})(_ctr_bwd_kernel))


def _check_inputs(q, k, v, a, b):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, T, D = q.shape
    if D not in (16, 32, 64, 128):
        raise ValueError(f"head dim D={D} not supported by the CTR kernel (16, 32, 64 or 128)")
    if a.numel() != H or b.numel() != H:
        raise ValueError(f"a and b must have one value per head ({H}); got {a.numel()}, {b.numel()}")


def _last_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


_CHOSEN = {}  # (kernel, T, D, B*H, dtype, ...) -> config the autotuner picked; later calls skip its overhead


def _as_config(c):
    return dict(BLOCK_M=c.kwargs["BLOCK_M"], BLOCK_N=c.kwargs["BLOCK_N"], num_warps=c.num_warps, num_stages=c.num_stages)


def _launch_fwd(q, k, v, a32, b32, scale, config=None):
    B, H, T, D = q.shape
    o = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, T), device=q.device, dtype=torch.float32)
    args = (q, k, v, a32, b32, o, lse, scale, T, H, B * H,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2))
    key = ("fwd", T, D, B * H, q.dtype)
    if config is None:
        config = INTERPRET_CONFIG["fwd"] if INTERPRET else _CHOSEN.get(key)
    if config is None:  # first call for this shape: autotune, then remember the choice
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
        LAST_KERNELS["fwd"] = _fwd_tuned[grid](*args, D=D)
        _CHOSEN[key] = _as_config(_fwd_tuned.best_config)
    else:
        c = config
        grid = (triton.cdiv(T, c["BLOCK_M"]), B * H)
        LAST_KERNELS["fwd"] = _ctr_fwd_kernel[grid](*args, D=D, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                                                    num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2))
    return o, lse


def _launch_bwd(do, q, k, v, o, lse, a32, b32, scale, need_db=True, config=None):
    B, H, T, D = q.shape
    dev = q.device
    key = ("bwd", T, D, B * H, q.dtype, need_db)
    if config is None:
        config = INTERPRET_CONFIG["bwd"] if INTERPRET else _CHOSEN.get(key)
    delta = torch.empty((B * H, T), device=dev, dtype=torch.float32)
    pre_bm = 64
    _ctr_bwd_pre_kernel[(triton.cdiv(T, pre_bm), B * H)](o, do, delta, T, H, do.stride(0), do.stride(1), do.stride(2),
                                                         D=D, BLOCK_M=pre_bm)
    # separate tensors: the custom op's outputs must not share storage
    dq, dk, dv = (torch.empty((B, H, T, D), device=dev, dtype=q.dtype) for _ in range(3))
    # one (da, db) slot per program: every slot is written once the block size is known. While
    # autotuning, configs with smaller BLOCK_N fill more slots than the winner does: the autotuner
    # zeroes DAB (reset_to_zero) before every trial and before the final run, else their stale
    # partial sums would be added into da, db
    nj = triton.cdiv(T, 16) if config is None else triton.cdiv(T, config["BLOCK_N"])
    dab = (torch.zeros if config is None else torch.empty)((B * H, nj, 2), device=dev, dtype=torch.float32)
    args = (q, k, v, do, lse, delta, dq, dk, dv, dab, a32, b32, scale, T, H, B * H, nj,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    if config is None:  # first call for this shape: autotune, then remember the choice
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731
        LAST_KERNELS["bwd"] = _bwd_tuned[grid](*args, D=D, NEED_DB=need_db)
        _CHOSEN[key] = _as_config(_bwd_tuned.best_config)
    else:
        c = config
        grid = (triton.cdiv(T, c["BLOCK_N"]), B * H)
        LAST_KERNELS["bwd"] = _ctr_bwd_kernel[grid](*args, D=D, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"],
                                                    NEED_DB=need_db, EVEN=(T % c["BLOCK_N"] == 0),
                                                    num_warps=c.get("num_warps", 4), num_stages=c.get("num_stages", 2))
    da, db = dab.view(B, H, nj, 2).sum(dim=(0, 2)).unbind(1)  # (H,) each
    return dq, dk, dv, da.contiguous(), db.contiguous()


def _f32_vec(x):
    x = x.detach()
    if x.dtype != torch.float32 or x.dim() != 1 or not x.is_contiguous():
        x = x.reshape(-1).to(torch.float32).contiguous()
    return x


_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")


def _config_to_list(c):
    """A block-config dict -> [BLOCK_M, BLOCK_N, num_warps, num_stages] (the op's schema has no
    dicts); None -> [] (autotune)."""
    return [] if c is None else [c["BLOCK_M"], c["BLOCK_N"], c.get("num_warps", 4), c.get("num_stages", 2)]


def _config_from_list(c):
    return dict(zip(_CONFIG_KEYS, c)) if c else None


# ctr_attention is a torch.library custom op: torch.compile treats it as one opaque node (no graph
# break; the Triton launches are not traced) and AOTAutograd calls its backward op. A graph break here
# used to make Dynamo skip GPT.forward's code object, so in a process that compiled several models
# (bench.py --interleave) the *other* models' loss ran eagerly too.
if HAS_TRITON:
    @torch.library.custom_op("ra::ctr_attention", mutates_args=())
    def _ctr_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float, db_at_zero: bool, fwd_cfg: list[int],
                bwd_cfg: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        # o (B, H, T, D), lse (B*H, T)
        return _launch_fwd(q, k, v, _f32_vec(a), _f32_vec(b), scale, _config_from_list(fwd_cfg))

    @_ctr_op.register_fake
    def _(q, k, v, a, b, scale, db_at_zero, fwd_cfg, bwd_cfg):
        B, H, T, D = q.shape
        return q.new_empty((B, H, T, D)), q.new_empty((B * H, T), dtype=torch.float32)

    @torch.library.custom_op("ra::ctr_attention_bwd", mutates_args=())
    def _ctr_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, need_db: bool,
                    bwd_cfg: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        return _launch_bwd(_last_contig(do), q, k, v, o, lse, _f32_vec(a), _f32_vec(b), scale, need_db,
                           _config_from_list(bwd_cfg))

    @_ctr_bwd_op.register_fake
    def _(do, q, k, v, o, lse, a, b, scale, need_db, bwd_cfg):
        B, H, T, D = q.shape
        grads = [q.new_empty((B, H, T, D)) for _ in range(3)]
        return (*grads, q.new_empty((H,), dtype=torch.float32), q.new_empty((H,), dtype=torch.float32))

    def _ctr_op_setup(ctx, inputs, output):
        q, k, v, a, b, scale, db_at_zero, fwd_cfg, bwd_cfg = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, a, b, o, lse)
        ctx.scale, ctx.db_at_zero, ctx.bwd_cfg = scale, db_at_zero, bwd_cfg

    def _ctr_op_backward(ctx, do, dlse):
        q, k, v, a, b, o, lse = ctx.saved_tensors
        need_db = bool(ctx.needs_input_grad[4] and ctx.db_at_zero)
        dq, dk, dv, da, db = _ctr_bwd_op(do, q, k, v, o, lse, a, b, ctx.scale, need_db, ctx.bwd_cfg)
        da = da.reshape(a.shape).to(a.dtype) if ctx.needs_input_grad[3] else None
        db = db.reshape(b.shape).to(b.dtype) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, da, db, None, None, None, None

    _ctr_op.register_autograd(_ctr_op_backward, setup_context=_ctr_op_setup)


def ctr_attention(q, k, v, a, b, scale=None, db_at_zero=True, fwd_config=None, bwd_config=None):
    if not HAS_TRITON:
        raise RuntimeError("ctr_attention needs Triton; use reciprocal_attention_torch instead")
    _check_inputs(q, k, v, a, b)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _ctr_op(q, k, v, a, b, scale, db_at_zero, _config_to_list(fwd_config), _config_to_list(bwd_config))[0]


ctr_attention.__doc__ = """Exact reciprocal attention with the CTR Triton kernels.

q, k, v: (B, H, T, D), fp16/bf16 (fp32 accepted); a, b: (H,) per-head weights (gradients flow to
both). Returns (B, H, T, D) = softmax_j<=i(scale * (a q_i.k_j + b q_j.k_i)) v. scale defaults to
1/sqrt(D). db_at_zero=False gives db_h = 0 on heads whose b_h == 0 (cheaper backward for
head-selective gates). fwd_config / bwd_config: fixed block configs (dicts with BLOCK_M, BLOCK_N,
num_warps, num_stages) instead of autotuning.
"""


# ---------------------------------------------------------------------- pure-torch path
def reciprocal_attention_torch(q, k, v, a, b, scale=None, dropout_p=0.0):
    """Exact RA without Triton: functional.reciprocal_attention, or, with attention dropout, the
    same single SDPA call over its folded operands (head dim 2D) with SDPA's dropout."""
    if dropout_p == 0.0:
        return reciprocal_attention(q, k, v, a, b, scale=scale)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qf, kf = ra_operands(q, k, a, b)  # (B, H, T, 2D): qf_i . kf_j = a q_i.k_j + b q_j.k_i
    return F.scaled_dot_product_attention(qf, kf, v, is_causal=True, dropout_p=dropout_p, scale=scale)


_NOTICE_SHOWN = False


def _notice(msg):
    global _NOTICE_SHOWN
    if not _NOTICE_SHOWN:
        print(f"[ra_ctr] {msg}")
        _NOTICE_SHOWN = True


def kernel_usable(x):
    """True when ctr_attention can run on tensor x (Triton present and x on a GPU, or the interpreter)."""
    return HAS_TRITON and (x.is_cuda or INTERPRET)


def reciprocal_attention_any(q, k, v, a, b, scale=None, dropout_p=0.0, **kernel_kwargs):
    """ctr_attention where it can run, else the pure-torch exact RA (with a one-time notice)."""
    if dropout_p == 0.0 and kernel_usable(q) and q.shape[-1] in (16, 32, 64, 128):
        return ctr_attention(q, k, v, a, b, scale, **kernel_kwargs)
    if dropout_p == 0.0:
        why = "Triton is not installed" if not HAS_TRITON else ("no GPU" if not q.is_cuda else f"head dim {q.shape[-1]}")
        _notice(f"CTR kernel unavailable ({why}); using the pure-torch exact reciprocal attention")
    return reciprocal_attention_torch(q, k, v, a, b, scale, dropout_p)
