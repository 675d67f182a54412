"""
Shared attention math as pure functions, used by the modules, the kernels' tests and bench.py.

Shapes: q, k, v are (B, H, T, D); per-head weights are (H,).
"""

import contextlib

import torch
import torch.nn.functional as F

from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}


def backend_context(backend):
    """Context manager that restricts SDPA to one backend ('auto' leaves PyTorch's choice)."""
    if backend == "auto":
        return contextlib.nullcontext()
    if backend not in _BACKENDS:
        raise ValueError(f"sdpa_backend={backend!r} is not available in torch {torch.__version__}")
    return sdpa_kernel(_BACKENDS[backend])


def split_heads(qkv, n_head):
    """A fused projection (B, T, 3C) -> q, k, v, each (B, nh, T, hs) (views, no copy)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    return [t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.split(C, dim=2)]


def merge_heads(y):
    """Per-head outputs (B, nh, T, hs) -> (B, T, nh * hs), ready for the output projection."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, H * D)


def sdpa_causal(q, k, v, backend="auto", dropout_p=0.0, scale=None):
    """Causal softmax attention (B, H, T, D) -> (B, H, T, Dv), optionally on one forced backend."""
    with backend_context(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scale)


# ---------------------------------------------------------------------------
# Reciprocal attention (RA)
#
# Exact RA adds the "reciprocal" score q_j . k_i (how much key position j's query
# looks at i's key) to the standard q_i . k_j, per head:
#
#     s_ij = scale * (a_h * q_i . k_j + b_h * q_j . k_i),   j <= i
#
# Same-FLOP RA approximates the reciprocal term inside the baseline's head dim D:
# the last R dims of each head carry a rank-R reciprocal channel through a
# low-rank W (D, R) shared by the heads of a layer,
#
#     Qf = [s_std * Q[..., :D-R], s_rec * (K @ W)]      (B, H, T, D)
#     Kf = [s_std * K[..., :D-R], s_rec * (Q @ W)]
#     Qf_i . Kf_j = w_std * q_i[:D-R] . k_j[:D-R] + w_rec * (k_i W) . (q_j W)
#
# with w = s^2 per head, so SDPA(Qf, Kf, V) costs exactly the baseline's FLOPs.
# The modules learn the amplitudes s (not w): w = s^2 is non-negative for free and,
# unlike sqrt(w), has a finite gradient as w -> 0. The same operands written into the
# QKV projection's weight (one F.linear emits Qf, Kf, V): attention/fold.py.
# ---------------------------------------------------------------------------

_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.5
RA_QUANT_MODES = ("none", "int8")  # the precisions of the reciprocal channel that are implemented


def check_ra_quant(mode, supported=RA_QUANT_MODES, where="this attention"):
    """Raise ValueError unless `mode` is a reciprocal-channel precision that `where` implements."""
    if mode not in supported:
        raise ValueError(f"ra_quant={mode!r} is not supported by {where}; use one of {', '.join(supported)}")


def _per_head(w, x):
    """(H,) per-head weights -> (1, H, 1, 1) in x's dtype, for (B, H, T, D) tensors."""
    return w.to(x.dtype).view(1, -1, 1, 1)


def _causal_mask(T, device):
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)  # True above the diagonal: j > i


def ra_operands(q, k, a, b):
    """Exact RA as one dot product: q' = [q, k], k' = [a k, b q] (B, H, T, 2D)."""
    return torch.cat([q, k], dim=-1), torch.cat([_per_head(a, k) * k, _per_head(b, q) * q], dim=-1)


def ra_operands_dense(qk, v, a, b):
    """ra_operands from projection outputs: qk (B, T, H, 2D), per head [q_h, k_h] (q' itself), and v
    (B, T, H, D) -> q', k', v as (B, H, T, .) views of tensors dense in (B, T, H, .) order. k' = [a k, b q]
    is q' with its halves swapped and scaled, one pass in the same order. cuDNN returns its output and
    its gradients in its inputs' dimension order, so these come back in the projection's layout."""
    B, T, H, D2 = qk.shape
    # one scale per column of k' (head, half, d): the gradient of a and b is then a column sum over the B*T
    # rows, as a bias gradient is, which compiles to a faster reduction than the sum over dims 0, 1 and 4 that
    # scales broadcast over (B, T, H, 2, D) need (docs/bench.md)
    ab = torch.stack([a, b], dim=-1).to(qk.dtype)  # (H, 2)
    col_scale = ab.view(H, 2, 1).expand(H, 2, D2 // 2).reshape(H * D2)
    swapped = qk.view(B, T, H, 2, D2 // 2).flip(-2).reshape(B, T, H * D2)  # [k, q] per head
    kf = (swapped * col_scale).view(B, T, H, D2)  # [a k, b q]
    return qk.transpose(1, 2), kf.transpose(1, 2), v.transpose(1, 2)


def reciprocal_attention_matmul(q, k, v, a, b, scale=None):
    """Exact RA with explicit (B, H, T, T) scores from q and k themselves (no folded operands): the form the
    folded paths are tested against."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    qk = q @ k.transpose(-1, -2)  # (B, H, T, T): qk[i, j] = q_i . k_j
    s = scale * (_per_head(a, q) * qk + _per_head(b, q) * qk.transpose(-1, -2))  # + q_j . k_i
    return _causal_attention(s, v)  # (B, H, T, D)


def _causal_attention(s, v):
    """Explicit causal attention: scores s (B, H, T, T), already scaled, then softmax over j <= i, times v."""
    s = s.masked_fill(_causal_mask(s.size(-2), s.device), float("-inf"))
    return s.softmax(-1) @ v


def reciprocal_attention(q, k, v, a, b, scale=None):
    """Exact RA (B, H, T, D) -> (B, H, T, D); a, b are the (H,) weights of q_i.k_j and q_j.k_i.

    One SDPA call over folded operands of head dim 2D:
        q' = [q, k],  k' = [a * k, b * q]  =>  q'_i . k'_j = a q_i.k_j + b k_i.q_j
    V keeps head dim D, so the scale (default 1/sqrt(D), not 1/sqrt(2D)) is passed
    explicitly. Backends that need equal qk/v head dims (flash) refuse the shape; PyTorch's
    own choice ('auto') falls to efficient/cuDNN/math, which take it. Where a forced
    backend refuses, the explicit-scores path runs instead (eager only: a compiled graph
    must not force such a backend, see ra_exact).
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    qf, kf = ra_operands(q, k, a, b)  # (B, H, T, 2D)
    return folded_attention(qf, kf, v, scale)


def folded_attention(qf, kf, v, scale):
    """Causal attention over exact RA's folded operands q', k' (B, H, T, 2D) and v (B, H, T, D) at `scale`
    (1/sqrt(D)): one SDPA call, or where a forced backend refuses Dqk != Dv, explicit (T, T) scores."""
    try:
        return F.scaled_dot_product_attention(qf, kf, v, is_causal=True, scale=scale)
    except RuntimeError as e:  # "No available kernel" under a forced backend; never swallow OOM
        if isinstance(e, _OOM):
            raise
        return _causal_attention((qf @ kf.transpose(-1, -2)) * scale, v)  # scores (B, H, T, T)


def reciprocal_attention_padded_v(q, k, v, a, b, scale=None):
    """Exact RA for backends that need equal qk/v head dims (flash): V zero-padded to 2D.

    The PV product doubles (1 + 1 + 2 = 2x baseline FLOPs instead of 1.5x) but the
    scores never leave the fused kernel, unlike reciprocal_attention_matmul.
    """
    scale = q.size(-1) ** -0.5 if scale is None else scale
    qf, kf = ra_operands(q, k, a, b)  # (B, H, T, 2D)
    return folded_attention_padded_v(qf, kf, v, scale)


def folded_attention_padded_v(qf, kf, v, scale):
    """folded_attention with v zero-padded to q's head dim, for backends that need equal head dims."""
    D = v.size(-1)
    y = F.scaled_dot_product_attention(qf, kf, F.pad(v, (0, qf.size(-1) - D)), is_causal=True, scale=scale)
    return y[..., :D]  # (B, H, T, D)


def same_flop_qk(q, k, W, s_std, s_rec, rec_on=None):
    """Same-FLOP RA operands from activations: (B, H, T, D) q, k -> Qf, Kf (B, H, T, D).

    W (D, R); s_std, s_rec (H,) amplitudes (w = s^2). rec_on (H,) bool, optional: heads
    where it is False are plain heads, Qf = s_std * q, Kf = s_std * k over all D dims.
    """
    Ds = q.size(-1) - W.size(1)
    s, r = _per_head(s_std, q), _per_head(s_rec, q)
    q_rec = r * (k @ W.to(k.dtype))  # (B, H, T, R): the query side carries the key's projection
    k_rec = r * (q @ W.to(q.dtype))  # (B, H, T, R)
    if rec_on is not None:  # on the device: no host sync, one graph for every routing
        on = rec_on.view(1, -1, 1, 1)
        q_rec = torch.where(on, q_rec, s * q[..., Ds:])
        k_rec = torch.where(on, k_rec, s * k[..., Ds:])
    qf = torch.cat([s * q[..., :Ds], q_rec], dim=-1)
    kf = torch.cat([s * k[..., :Ds], k_rec], dim=-1)
    return qf, kf


def ra_same_flop(q, k, v, W, w_std, w_rec):
    """Same-FLOP RA (B, H, T, D) -> (B, H, T, D), unfused; W (D, R); w_std, w_rec (H,) >= 0."""
    qf, kf = same_flop_qk(q, k, W, w_std.sqrt(), w_rec.sqrt())
    return F.scaled_dot_product_attention(qf, kf, v, is_causal=True, scale=q.size(-1) ** -0.5)


def _int8_absmax_scale(x):
    """Per-row symmetric int8 scale (..., 1) from the absmax of the last dim."""
    return x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0


def _fake_quant(x, scale):
    """Round x to the int8 grid of `scale`, with a straight-through (identity) gradient."""
    xq = (x.detach() / scale).round().clamp(-127, 127) * scale
    return x + (xq - x.detach())


def quantize_rec(x, R, mode, rec_on=None):
    """Fake-quantize the last R (reciprocal) dims of Qf or Kf (B, H, T, D); plain heads untouched."""
    if mode == "none":
        return x
    check_ra_quant(mode)
    D = x.size(-1)
    col = torch.arange(D, device=x.device) >= D - R  # (D,) the reciprocal columns
    if rec_on is not None:
        col = col & rec_on.view(1, -1, 1, 1)  # (1, H, 1, D)
    # the scale is the absmax of the R columns only: the standard dims must not swamp the channel
    return torch.where(col, _fake_quant(x, _int8_absmax_scale(x[..., D - R:])), x)
