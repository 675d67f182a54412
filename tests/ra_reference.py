"""The float64 references of reciprocal attention and the tiny configs the RA tests share (no tests here).

The references are written out with explicit score matrices, an explicit causal mask and softmax,
so they share no code with the implementations under test (attention/ra_*.py, attention/functional.py,
the CTR kernel).
"""

import math

import torch

import attention
from model import GPT, GPTConfig

TOL64 = dict(rtol=1e-9, atol=1e-10)


def ref_softmax_attend(s, v):
    """s (B, H, T, T) raw scores with s[..., i, j] for query i, key j; causal softmax, then @ v."""
    T = s.size(-1)
    future = torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1)  # j > i
    s = s.masked_fill(future, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return p @ v


def ref_exact(q, k, v, a, b, scale=None):
    """Exact RA in float64 (inputs of any dtype are cast): s_ij = scale (a_h q_i.k_j + b_h k_i.q_j), j <= i;
    scale 1/sqrt(D) unless given."""
    q, k, v, a, b = (t.double() for t in (q, k, v, a, b))
    D = q.size(-1)
    qk = q @ k.transpose(-1, -2)  # [i, j] = q_i . k_j
    kq = k @ q.transpose(-1, -2)  # [i, j] = k_i . q_j  (= q_j . k_i)
    s = a.view(1, -1, 1, 1) * qk + b.view(1, -1, 1, 1) * kq
    s = s / math.sqrt(D) if scale is None else scale * s
    return ref_softmax_attend(s, v)

def ref_same_flop(q, k, v, W, w_std, w_rec, rec_on=None, q_gate=None):
    """Same-FLOP RA scores: w_std q_i[:Ds].k_j[:Ds] + w_rec (k_i W).(q_j W), over sqrt(D).

    rec_on (H,) bool: False heads are plain (w_std q_i.k_j over all D dims).
    q_gate (B, T): per-query multiplier of the reciprocal term (token selection).
    """
    D, R = q.size(-1), W.size(1)
    Ds = D - R
    std = q[..., :Ds] @ k[..., :Ds].transpose(-1, -2)
    full = q @ k.transpose(-1, -2)
    rec = (k @ W) @ (q @ W).transpose(-1, -2)  # [i, j] = (k_i W) . (q_j W)
    if q_gate is not None:
        rec = rec * q_gate[:, None, :, None]
    ws, wr = w_std.view(1, -1, 1, 1), w_rec.view(1, -1, 1, 1)
    s = ws * std + wr * rec
    if rec_on is not None:
        s = torch.where(rec_on.view(1, -1, 1, 1), s, ws * full)
    return ref_softmax_attend(s / math.sqrt(D), v)


def qkv_heads(mod, x):
    """Plain (B, nh, T, hs) q, k, v from a module's c_attn."""
    B, T, C = x.shape
    H = mod.n_head
    q, k, v = mod.c_attn(x).split(C, dim=2)
    return [t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v)]


def cfg_for(name="ra_same_flop", **kw):
    base = dict(n_layer=2, n_head=3, n_embd=96, block_size=128, vocab_size=64, attn=name)
    base.update(kw)
    return GPTConfig(**base)


def build64(name, seed=0, **kw):
    """A float64 attention module with non-trivial gates, W and biases."""
    torch.manual_seed(seed)
    mod = attention.build(name, cfg_for(name, **kw)).double()
    with torch.no_grad():
        for p in mod.c_attn.parameters():
            p.normal_(0, 0.2)
        if hasattr(mod, "W"):
            mod.W.normal_(0, 0.3)
            mod.s_std.copy_(torch.rand(mod.n_head, dtype=torch.float64) + 0.5)
            mod.s_rec.copy_(torch.rand(mod.n_head, dtype=torch.float64) + 0.5)
    return mod


def grads(out, tensors, seed=1):
    torch.manual_seed(seed)
    g = torch.randn(out.shape, dtype=out.dtype)  # not randn_like: it copies strides, so values land elsewhere
    return torch.autograd.grad(out, tensors, g, allow_unused=True, retain_graph=True)


def assert_close_with_grads(out, ref, tensors):
    """out equals ref in float64, and so do their gradients with respect to tensors (one random cotangent)."""
    torch.testing.assert_close(out, ref, **TOL64)
    for g, g_ref in zip(grads(out, tensors), grads(ref, tensors)):
        torch.testing.assert_close(g, g_ref, **TOL64)


def rand(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64)


def tiny_cfg(name, **kw):
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=64, attn=name)
    base.update(kw)
    return GPTConfig(**base)


def tiny_gpt(name, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny_cfg(name, **kw))


def permutation_batches(n_steps, length, batch=8, vocab=64, seed=0):
    """A synthetic task that attention can learn fast: each sequence walks one fixed random permutation of the
    vocabulary from a random start. Yields n_steps (batch, length + 1) token tensors."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=gen)
    for _ in range(n_steps):
        seq = [torch.randint(0, vocab, (batch,), generator=gen)]
        for _ in range(length):
            seq.append(perm[seq[-1]])
        yield torch.stack(seq, 1)  # (batch, length + 1)
