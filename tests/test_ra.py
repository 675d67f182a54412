"""Reciprocal attention (attention/ra_*.py, attention/functional.py) against plain float64 references.

The references below are written out with explicit score matrices, an explicit causal
mask and softmax, so they share no code with the implementations under test.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attention
from attention import functional as AF
from attention.rec_gate import gate_rec_queries
from attention.triton_setup import HAS_TRITON
from model import GPT, GPTConfig

TOL64 = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------
# plain float64 references
# ---------------------------------------------------------------------------

def ref_softmax_attend(s, v):
    """s (B, H, T, T) raw scores with s[..., i, j] for query i, key j; causal softmax, then @ v."""
    T = s.size(-1)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)  # j > i
    s = s.masked_fill(future, float("-inf"))
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return p @ v


def ref_exact(q, k, v, a, b):
    D = q.size(-1)
    qk = q @ k.transpose(-1, -2)  # [i, j] = q_i . k_j
    kq = k @ q.transpose(-1, -2)  # [i, j] = k_i . q_j  (= q_j . k_i)
    s = (a.view(1, -1, 1, 1) * qk + b.view(1, -1, 1, 1) * kq) / math.sqrt(D)
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


def rand(*shape, seed=0):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64)


# ---------------------------------------------------------------------------
# functional
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("D", [32, 64])
def test_reciprocal_attention_matches_reference(D):
    B, H, T = 2, 3, 77
    q, k, v = (rand(B, H, T, D, seed=i).requires_grad_() for i in range(3))
    a = (torch.rand(H, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.rand(H, dtype=torch.float64) - 0.5).requires_grad_()  # a negative b is allowed
    inputs = (q, k, v, a, b)
    ref = ref_exact(*inputs)
    for fn in (AF.reciprocal_attention, AF.reciprocal_attention_matmul, AF.reciprocal_attention_padded_v):
        out = fn(*inputs)
        torch.testing.assert_close(out, ref, **TOL64)
        for g, g_ref in zip(grads(out, inputs), grads(ref, inputs)):
            torch.testing.assert_close(g, g_ref, **TOL64)
    # float32 against the float64 reference
    out32 = AF.reciprocal_attention(*(t.detach().float() for t in inputs))
    torch.testing.assert_close(out32.double(), ref.detach(), rtol=1e-4, atol=1e-5)


def test_reciprocal_attention_falls_back_under_a_backend_that_refuses_the_shape():
    q, k, v = (rand(1, 3, 77, 32, seed=i).float() for i in range(3))
    a, b = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.3, -0.2, 0.0])
    ref = ref_exact(q.double(), k.double(), v.double(), a.double(), b.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SDPA warns why each kernel refused
        with AF.backend_context("flash"):  # flash needs equal qk / v head dims: SDPA raises, the matmul path runs
            out = AF.reciprocal_attention(q, k, v, a, b)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_ra_same_flop_functional_matches_reference():
    B, H, T, D, R = 2, 3, 77, 32, 8
    q, k, v = (rand(B, H, T, D, seed=i).requires_grad_() for i in range(3))
    W = (0.3 * rand(D, R, seed=5)).requires_grad_()
    w_std = (torch.rand(H, dtype=torch.float64) + 0.2).requires_grad_()
    w_rec = (torch.rand(H, dtype=torch.float64) + 0.2).requires_grad_()
    inputs = (q, k, v, W, w_std, w_rec)
    out = AF.ra_same_flop(*inputs)
    ref = ref_same_flop(*inputs)
    torch.testing.assert_close(out, ref, **TOL64)
    for g, g_ref in zip(grads(out, inputs), grads(ref, inputs)):
        torch.testing.assert_close(g, g_ref, **TOL64)


def test_fold_equals_activation_formula():
    """F.linear(x, folded weight) == same_flop_qk on the activations, bias and plain heads included."""
    C, H = 96, 3
    D, R = C // H, 8
    weight, bias, x = rand(3 * C, C, seed=1), rand(3 * C, seed=2), rand(2, 5, C, seed=3)
    W, s_std, s_rec = rand(D, R, seed=4), rand(H, seed=5), rand(H, seed=6)
    rec_on = torch.tensor([True, False, True])
    w, b = AF.fold_same_flop_qkv(weight, bias, W, s_std, s_rec, rec_on)
    q, k, v = (t.view(2, 5, H, D).transpose(1, 2) for t in F.linear(x, w, b).split(C, -1))
    q0, k0, v0 = (t.view(2, 5, H, D).transpose(1, 2) for t in F.linear(x, weight, bias).split(C, -1))
    qf, kf = AF.same_flop_qk(q0, k0, W, s_std, s_rec, rec_on)
    for got, want in ((q, qf), (k, kf), (v, v0)):
        torch.testing.assert_close(got, want, **TOL64)


def ref_fold(weight, bias, W, s_std, s_rec, rec_on=None):
    """Plain same-FLOP fold, head by head: Qf_h rows = [s Wq_h[:Ds], r W^T Wk_h], Kf_h likewise
    with q <-> k, V unchanged; plain heads (rec_on False) are s W{q,k}_h on all D rows."""
    C, H = weight.size(1), s_std.numel()
    D, R = W.shape
    Ds = D - R
    w_rows, b_rows = [], []
    for t in (0, 1):  # q, k
        for h in range(H):
            mine = slice(t * C + h * D, t * C + (h + 1) * D)
            other = slice((1 - t) * C + h * D, (1 - t) * C + (h + 1) * D)
            on = True if rec_on is None else bool(rec_on[h])
            if on:
                w_rows.append(torch.cat([s_std[h] * weight[mine][:Ds], s_rec[h] * (W.t() @ weight[other])]))
                if bias is not None:
                    b_rows.append(torch.cat([s_std[h] * bias[mine][:Ds], s_rec[h] * (W.t() @ bias[other])]))
            else:
                w_rows.append(s_std[h] * weight[mine])
                if bias is not None:
                    b_rows.append(s_std[h] * bias[mine])
    w = torch.cat(w_rows + [weight[2 * C:]])
    b = None if bias is None else torch.cat(b_rows + [bias[2 * C:]])
    return w, b


def fold_inputs(C=96, H=3, R=8, bias=True, seed=0):
    D = C // H
    weight = rand(3 * C, C, seed=seed).requires_grad_()
    b = rand(3 * C, seed=seed + 1).requires_grad_() if bias else None
    W = rand(D, R, seed=seed + 2).requires_grad_()
    s_std = rand(H, seed=seed + 3).requires_grad_()
    s_rec = rand(H, seed=seed + 4).requires_grad_()
    return weight, b, W, s_std, s_rec


def fold_grads(outs, params, seed=7):
    """Gradients of <outs, random cotangents> w.r.t. params (the same cotangents for every call)."""
    torch.manual_seed(seed)
    cot = [torch.randn(o.shape, dtype=o.dtype) for o in outs if o is not None]
    g = torch.autograd.grad([o for o in outs if o is not None], params, cot, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if gp is None else gp for gp, p in zip(g, params)]  # None: no dependence


ROUTINGS = [None, [True, False, True], [False, False, False], [True, True, True]]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_fold_autograd_function_matches_plain_reference(bias, routing):
    """_FoldSameFlop (hand-written backward): values and ALL gradients against ref_fold."""
    weight, b, W, s_std, s_rec = fold_inputs(bias=bias)
    rec_on = None if routing is None else torch.tensor(routing)
    params = [p for p in (weight, b, W, s_std, s_rec) if p is not None]
    got = AF.fold_same_flop_qkv(weight, b, W, s_std, s_rec, rec_on)
    want = ref_fold(weight, b, W, s_std, s_rec, rec_on)
    assert (got[1] is None) == (not bias)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, **TOL64)
    for g, w in zip(fold_grads(got, params), fold_grads(want, params)):
        torch.testing.assert_close(g, w, **TOL64)
    # the autograd-derived implementation it replaced agrees too
    old = AF._fold_same_flop_qkv_autograd(weight, b, W, s_std, s_rec, rec_on)
    for g, w in zip(fold_grads(old, params), fold_grads(want, params)):
        torch.testing.assert_close(g, w, **TOL64)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("routing", ROUTINGS[:2])
@pytest.mark.parametrize("R", [3, 8, 12])
def test_fold_backward_fused_form_matches_reference(bias, routing, R):
    """The backward's torch.compile formulation (fused=True: unrolled sums and multiply-and-sum
    reductions), run eagerly in float64, against the reference gradients."""
    weight, b, W, s_std, s_rec = fold_inputs(bias=bias, R=R, seed=R)
    rec_on = None if routing is None else torch.tensor(routing)
    params = [p for p in (weight, b, W, s_std, s_rec) if p is not None]
    want = ref_fold(weight, b, W, s_std, s_rec, rec_on)
    torch.manual_seed(7)
    g_w = torch.randn(want[0].shape, dtype=torch.float64)
    g_b = torch.randn(want[1].shape, dtype=torch.float64) if bias else None
    ref = torch.autograd.grad([o for o in want if o is not None], params, [g for g in (g_w, g_b) if g is not None])
    for fused in (False, True):
        got = AF._fold_backward(weight.detach(), None if b is None else b.detach(), W.detach(), s_std.detach(),
                                s_rec.detach(), rec_on, g_w, g_b, fused=fused)
        assert got[-1] is None and (got[1] is None) == (not bias)
        for g, w in zip([g for g in got[:5] if g is not None], ref):
            torch.testing.assert_close(g, w, **TOL64)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_gradcheck(bias):
    torch.manual_seed(0)
    C, H, R = 12, 3, 2
    D = C // H
    weight = torch.randn(3 * C, C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3 * C, dtype=torch.float64, requires_grad=True) if bias else None
    W = torch.randn(D, R, dtype=torch.float64, requires_grad=True)
    s_std = torch.randn(H, dtype=torch.float64, requires_grad=True)
    s_rec = torch.randn(H, dtype=torch.float64, requires_grad=True)
    for rec_on in (None, torch.tensor([True, False, True])):
        if bias:
            fn = lambda w, bb, WW, s, r: AF.fold_same_flop_qkv(w, bb, WW, s, r, rec_on)
            assert torch.autograd.gradcheck(fn, (weight, b, W, s_std, s_rec))
        else:
            fn = lambda w, WW, s, r: AF.fold_same_flop_qkv(w, None, WW, s, r, rec_on)[0]
            assert torch.autograd.gradcheck(fn, (weight, W, s_std, s_rec))


def test_fold_inductor_compile_grads():
    """The compiled fold (fullgraph; the fused backward) against the reference, values and grads."""
    torch._dynamo.reset()
    weight, b, W, s_std, s_rec = fold_inputs(C=32, H=2, R=4)
    params = [weight, b, W, s_std, s_rec]
    fold = torch.compile(AF.fold_same_flop_qkv, fullgraph=True)
    for rec_on in (None, torch.tensor([False, True])):
        got = fold(weight, b, W, s_std, s_rec, rec_on)
        want = ref_fold(weight, b, W, s_std, s_rec, rec_on)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **TOL64)
        for g, w in zip(fold_grads(got, params), fold_grads(want, params)):
            torch.testing.assert_close(g, w, **TOL64)


def test_quantize_rec_int8():
    x = rand(2, 3, 7, 32, seed=0).requires_grad_()
    y = AF.quantize_rec(x, 8, "int8")
    torch.testing.assert_close(y[..., :24], x[..., :24], rtol=0, atol=0)  # standard dims untouched
    rec = x[..., 24:].detach()
    scale = rec.abs().amax(-1, keepdim=True) / 127
    steps = y[..., 24:].detach() / scale
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-9)  # on the int8 grid
    assert (y[..., 24:] - rec).abs().le(scale / 2 + 1e-12).all()
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.ones_like(g))  # straight-through
    # plain heads are untouched
    y = AF.quantize_rec(x, 8, "int8", rec_on=torch.tensor([True, False, True]))
    torch.testing.assert_close(y[:, 1], x[:, 1], rtol=0, atol=0)
    assert AF.quantize_rec(x, 8, "none") is x


# ---------------------------------------------------------------------------
# modules against the references
# ---------------------------------------------------------------------------

def test_same_flop_module_matches_reference_and_fused_equals_unfused():
    x = rand(2, 77, 96, seed=3).requires_grad_()
    outs = {}
    for fused in (True, False):
        mod = build64("ra_same_flop", ra_fused=fused)
        params = [x, mod.c_attn.weight, mod.c_attn.bias, mod.W, mod.s_std, mod.s_rec]
        y = mod.heads(x)
        q, k, v = qkv_heads(mod, x)
        ref = ref_same_flop(q, k, v, mod.W, mod.w_std, mod.w_rec)
        torch.testing.assert_close(y, ref, **TOL64)
        g = grads(y, params)
        for a, b in zip(g, grads(ref, params)):
            torch.testing.assert_close(a, b, **TOL64)
        outs[fused] = (mod(x), g)
    torch.testing.assert_close(outs[True][0], outs[False][0], **TOL64)
    for a, b in zip(outs[True][1], outs[False][1]):
        torch.testing.assert_close(a, b, **TOL64)


@pytest.mark.parametrize("R", [4, 8, 12, 16])
def test_same_flop_ranks(R):
    x = rand(1, 19, 96, seed=0)  # head dim 32
    mod = build64("ra_same_flop", ra_R=R)
    q, k, v = qkv_heads(mod, x)
    torch.testing.assert_close(mod.heads(x), ref_same_flop(q, k, v, mod.W, mod.w_std, mod.w_rec), **TOL64)


def test_config_errors():
    for R in (0, 32, 40):
        with pytest.raises(ValueError, match="ra_R"):
            attention.build("ra_same_flop", cfg_for(ra_R=R))
    with pytest.raises(ValueError, match="ra_quant='fp8' is not supported by ra_headsel"):  # not implemented anywhere
        attention.build("ra_headsel", cfg_for("ra_headsel", ra_quant="fp8"))
    with pytest.raises(ValueError, match="ra_quant"):
        attention.build("ra_same_flop", cfg_for(ra_quant="int4"))
    with pytest.raises(ValueError, match="ra_w_rec_init"):
        attention.build("ra_same_flop", cfg_for(ra_w_rec_init=-0.1))
    with pytest.raises(ValueError, match="ra_route_every"):
        attention.build("ra_headsel", cfg_for("ra_headsel", ra_route_every=-1))
    with pytest.raises(ValueError, match="ra_token_frac"):
        attention.build("ra_tokensel", cfg_for("ra_tokensel", ra_token_frac=1.5))


@pytest.mark.parametrize("name", ["ra_same_flop", "ra_headsel", "ra_tokensel"])
def test_int8_quant_fused_equals_unfused_and_stays_close(name):
    x = rand(2, 33, 96, seed=3).requires_grad_()
    ys = []
    for fused in (True, False):
        mod = build64(name, ra_fused=fused, ra_quant="int8", **({"ra_threshold": 0.1} if name == "ra_headsel" else {}))
        if name == "ra_headsel":
            with torch.no_grad():
                mod.s_rec[1] = 0.1  # one plain head, which must not be quantized
        ys.append(mod(x))
    torch.testing.assert_close(ys[0], ys[1], rtol=1e-7, atol=1e-9)
    mod.quant = "none"
    y = mod(x)
    assert 0 < (y - ys[1]).abs().max() < 0.05 * y.abs().max()


def test_exact_module_matches_reference():
    x = rand(2, 77, 96, seed=3).requires_grad_()
    mod = build64("ra_exact")
    cfg = GPTConfig()
    assert mod.a.tolist() == pytest.approx([cfg.ra_w_std_init] * 3) and mod.b.tolist() == pytest.approx([cfg.ra_b_init] * 3)  # the init flags
    with torch.no_grad():
        mod.a.copy_(torch.tensor([1.0, 0.5, -0.2]))
        mod.b.copy_(torch.tensor([0.3, -0.7, 1.1]))
    params = [x, mod.c_attn.weight, mod.a, mod.b]
    y = mod.heads(x)
    q, k, v = qkv_heads(mod, x)
    ref = ref_exact(q, k, v, mod.a, mod.b)
    torch.testing.assert_close(y, ref, **TOL64)
    for a, b in zip(grads(y, params), grads(ref, params)):
        torch.testing.assert_close(a, b, **TOL64)
    assert mod.attn_flop_mult == 1.5


def test_swap_module_matches_reference():
    x = rand(2, 77, 96, seed=3).requires_grad_()
    mod = build64("ra_swap")
    assert mod.beta.item() == 0.0
    q, k, v = qkv_heads(mod, x)
    torch.testing.assert_close(mod.heads(x), ref_softmax_attend(q @ k.transpose(-1, -2) / math.sqrt(32), v), **TOL64)
    with torch.no_grad():
        mod.beta.fill_(0.7)
    params = [x, mod.c_attn.weight, mod.beta]
    y = mod.heads(x)
    std = ref_softmax_attend(q @ k.transpose(-1, -2) / math.sqrt(32), v)
    swp = ref_softmax_attend(k @ q.transpose(-1, -2) / math.sqrt(32), v)  # query k_i, key q_j, j <= i
    mu, var = swp.mean(-1, keepdim=True), swp.var(-1, unbiased=False, keepdim=True)
    ref = std + math.tanh(0.7) * (swp - mu) / torch.sqrt(var + 1e-5)
    ref = std + torch.tanh(mod.beta) * (ref - std) / math.tanh(0.7)  # same value, with beta in the graph
    torch.testing.assert_close(y, ref, **TOL64)
    for a, b in zip(grads(y, params), grads(ref, params)):
        torch.testing.assert_close(a, b, **TOL64)
    assert mod.attn_flop_mult == 2.0


# ---------------------------------------------------------------------------
# ra_headsel: routing
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_headsel_plain_head_is_plain_attention(fused):
    x = rand(2, 77, 96, seed=3).requires_grad_()
    mod = build64("ra_headsel", ra_fused=fused, ra_threshold=0.1)
    with torch.no_grad():
        mod.s_rec[1] = math.sqrt(0.05)  # w_rec = 0.05 < threshold
    assert mod.rec_on().tolist() == [True, False, True]
    y = mod.heads(x)
    q, k, v = qkv_heads(mod, x)
    # head 1 is plain attention scaled by w_std, over all D dims
    plain = ref_softmax_attend(mod.w_std[1] * q[:, 1] @ k[:, 1].transpose(-1, -2) / math.sqrt(32), v[:, 1])
    torch.testing.assert_close(y[:, 1], plain, **TOL64)
    ref = ref_same_flop(q, k, v, mod.W, mod.w_std, mod.w_rec, rec_on=mod.rec_on())
    torch.testing.assert_close(y, ref, **TOL64)
    params = [x, mod.c_attn.weight, mod.c_attn.bias, mod.W, mod.s_std, mod.s_rec]
    g = grads(y, params)
    for a, b in zip(g, grads(ref, params)):
        torch.testing.assert_close(a, b, **TOL64)
    # the plain head's w_rec gets no task gradient; the L1 alone pushes it further down
    assert g[5][1] == 0 and (g[5][[0, 2]] != 0).all()
    (g_l1,) = torch.autograd.grad(mod.aux_loss(), mod.s_rec)
    assert (g_l1 > 0).all()  # descent lowers every s_rec >= 0, so every w_rec


def test_headsel_once_off_stays_off():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=4, n_embd=64, block_size=32, vocab_size=64,
                          attn="ra_headsel", ra_l1=1.0, ra_threshold=0.1))
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        attn.s_rec[2] = math.sqrt(0.09)  # just under the threshold
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    w_prev = attn.w_rec[2].item()
    for step in range(10):
        idx = torch.randint(0, 64, (4, 32))
        _, loss = model(idx, idx)
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
        assert attn.w_rec[2].item() < w_prev  # only the L1 acts on it: strictly down
        w_prev = attn.w_rec[2].item()
        assert not attn.rec_on()[2]
    assert model.metrics()["attn/l0/ra_frac"] == 0.75


def test_headsel_route_every_refreshes_on_set_step_and_at_eval():
    mod = build64("ra_headsel", ra_route_every=5)
    mod.train()
    with torch.no_grad():
        mod.s_rec[0] = 0.0
    assert mod.rec_on().tolist() == [True, True, True]  # the stored routing until a refresh
    mod.set_step(3)
    assert mod.rec_on().tolist() == [True, True, True]
    mod.eval()
    assert mod.rec_on().tolist() == [False, True, True]  # eval routes by the live gates
    mod.train()
    mod.set_step(5)
    assert mod.rec_on().tolist() == [False, True, True]
    assert "route" in mod.state_dict()  # a resumed run keeps its routing


# ---------------------------------------------------------------------------
# ra_tokensel: per-token gate
# ---------------------------------------------------------------------------

def test_tokensel_matches_reference_and_fused_equals_unfused():
    x = rand(2, 77, 96, seed=3).requires_grad_()
    outs = []
    for fused in (True, False):
        mod = build64("ra_tokensel", ra_fused=fused)
        with torch.no_grad():
            mod.scorer.weight.normal_(0, 0.3)
        params = [x, mod.c_attn.weight, mod.W, mod.s_std, mod.s_rec, mod.scorer.weight, mod.scorer.bias]
        y = mod.heads(x)
        g = torch.sigmoid(mod.scorer(x.detach()))[..., 0]  # (B, T): the scorer reads x through a stop-gradient
        sel = (g > 0.5).double()
        assert 0 < sel.mean() < 1
        torch.testing.assert_close(mod._sel.detach(), sel.mean())
        q, k, v = qkv_heads(mod, x)
        # forward: the hard selection; backward: straight-through (d m / d g = 1)
        ref = ref_same_flop(q, k, v, mod.W, mod.w_std, mod.w_rec, q_gate=sel + g - g.detach())
        torch.testing.assert_close(y, ref, **TOL64)
        gy = grads(y, params)
        for a, b in zip(gy, grads(ref, params)):
            torch.testing.assert_close(a, b, **TOL64)
        assert gy[5].abs().sum() > 0  # the task trains the scorer
        outs.append((mod(x), gy))
        aux = mod.aux_loss()
        torch.testing.assert_close(aux, mod.token_penalty * (sel.mean() - mod.token_frac) ** 2)
        (gb,) = torch.autograd.grad(aux, mod.scorer.bias)
        assert gb.item() * (sel.mean() - mod.token_frac).item() > 0  # descent moves the fraction to the target
        assert set(mod.metrics()) >= {"tok_frac", "w_rec"}
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL64)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, **TOL64)


# ---------------------------------------------------------------------------
# every registered variant
# ---------------------------------------------------------------------------

def tiny_cfg(name, **kw):
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=64, attn=name)
    base.update(kw)
    return GPTConfig(**base)


def tiny_gpt(name, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny_cfg(name, **kw))


# GPTConfig fields any attention module may read without listing them in its `options`
SHARED_FIELDS = {"n_layer", "n_head", "n_embd", "bias", "dropout", "block_size", "vocab_size", "head_dim",
                 "padded_vocab_size"}


class ConfigReads:
    """A GPTConfig stand-in that records the fields a constructor reads."""

    def __init__(self, cfg):
        self._cfg, self.read = cfg, set()

    def __getattr__(self, name):  # called only for names not set in __init__
        self.read.add(name)
        return getattr(self._cfg, name)


def needs_gpu(err):
    """True if err says a variant needs what this machine lacks. On a machine with a CUDA GPU and Triton
    nothing is excused: a kernel failure there is a failure, not a skip."""
    if torch.cuda.is_available() and HAS_TRITON:
        return False
    return isinstance(err, ImportError) or any(s in str(err).lower() for s in ("cuda", "triton", "gpu"))


def check_in_range(name, cls, values, when):
    for k, v in values.items():
        assert k in cls.gate_ranges, f"{name}: {k!r} (gates() or metrics()) has no gate_ranges entry"
        lo, hi = cls.gate_ranges[k]
        v = torch.as_tensor(v, dtype=torch.float64)
        assert torch.isfinite(v).all() and (v >= lo).all() and (hi is None or (v <= hi).all()), \
            f"{name} {when}: {k}={v.tolist()} outside [{lo}, {hi}]"


def check_contract(name):
    """The class declares the contract of attention/__init__.py, and its module keeps it."""
    cls = attention.get_class(name)
    for attr, typ in (("ra_family", bool), ("head_selective", bool), ("attn_flop_mult", float),
                      ("options", tuple), ("gate_ranges", dict)):
        assert isinstance(getattr(cls, attr, None), typ), f"{name}: class attribute {attr} must be a {typ.__name__}"
    assert cls.attn_flop_mult > 0
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - SHARED_FIELDS - {"attn"}
    assert set(cls.options) <= fields, f"{name}: options {set(cls.options) - fields} are not GPTConfig fields"
    for k, (lo, hi) in cls.gate_ranges.items():
        assert isinstance(lo, float) and (hi is None or isinstance(hi, float) and lo <= hi), (name, k, lo, hi)
    # options are exactly the fields the constructor reads (its bases' included)
    cfg = ConfigReads(tiny_cfg(name))
    cls(cfg)
    assert cfg.read - SHARED_FIELDS == set(cls.options), f"{name}: reads {sorted(cfg.read - SHARED_FIELDS)}"

    mod = tiny_gpt(name).transformer.h[0].attn  # with GPT's init and the module's own
    H = 4  # tiny_cfg's n_head
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))

    def gates_after_forward(when):
        y = mod(x)  # some gates are values of the last forward (tok_frac)
        g = mod.gates()
        for k, v in g.items():
            assert torch.is_tensor(v) and not v.requires_grad and tuple(v.shape) in ((H,), (1,)), (name, k, v)
        check_in_range(name, cls, {**g, **(mod.metrics() if hasattr(mod, "metrics") else {})}, when)
        return y.detach(), {k: v.clone() for k, v in g.items()}  # gates() may be views of the parameters

    y0, g0 = gates_after_forward("at init")
    assert cls.ra_family or not g0
    mod.perturb_gates_(torch.Generator().manual_seed(1))
    y1, g1 = gates_after_forward("after perturb_gates_")
    if g0:
        assert any(not torch.equal(g0[k], g1[k]) for k in g0), f"{name}: perturb_gates_ changed no gate"
        assert not torch.allclose(y0, y1), f"{name}: perturb_gates_ does not change the output"
    if cls.head_selective:
        masks = [torch.ones(H, dtype=torch.bool), torch.zeros(H, dtype=torch.bool), torch.arange(H) == 1]
        outs = []
        for mask in masks:
            mod.set_heads_mask(mask)
            outs.append(gates_after_forward(f"after set_heads_mask({mask.tolist()})")[0])
        for i in range(len(outs)):
            for j in range(i):
                assert not torch.allclose(outs[i], outs[j]), f"{name}: masks {i} and {j} give the same output"
        mod.set_heads_mask(masks[2])
        torch.testing.assert_close(mod(x), outs[2], rtol=0, atol=0)  # the output depends on the mask alone


def check_causal(name, perturb=True):
    """Logits at positions <= t do not change when tokens after t do, with every gate live."""
    try:
        model = tiny_gpt(name).eval()
        if perturb:
            gen = torch.Generator().manual_seed(0)
            for block in model.transformer.h:
                block.attn.perturb_gates_(gen)
        idx = torch.randint(0, 64, (2, 40))
        logits, _ = model(idx)
    except (ImportError, RuntimeError, NotImplementedError) as e:
        if needs_gpu(e):
            pytest.skip(f"{name} does not run on this machine: {e}")
        raise
    for t in (0, 17, 38):
        idx2 = idx.clone()
        idx2[:, t + 1:] = torch.randint(0, 64, (2, 39 - t))
        logits2, _ = model(idx2)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def check_trains(name, **kw):
    """30 steps on a synthetic task: the loss falls, every gate parameter gets a gradient; returns the model."""
    model = tiny_gpt(name, **kw)
    attn = model.transformer.h[0].attn
    gates = {n: p for n, p in attn.named_parameters() if not n.startswith(("c_attn", "c_proj"))}
    assert gates
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(64, generator=gen)  # synthetic task: walk a fixed random permutation
    losses = []
    for step in range(30):
        model.set_step(step)
        seq = [torch.randint(0, 64, (8,), generator=gen)]
        for _ in range(64):
            seq.append(perm[seq[-1]])
        seq = torch.stack(seq, 1)  # (8, 65)
        _, loss = model(seq[:, :-1], seq[:, 1:].contiguous())
        (loss + model.aux_loss()).backward()
        if step == 0:
            for n, p in gates.items():
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: {n} gets no gradient"
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.25 * losses[0], losses
    assert all(math.isfinite(v) for v in model.metrics().values())
    check_in_range(name, type(attn), attn.gates(), "after training")
    return model


@pytest.mark.parametrize("name", attention.names())
def test_contract_every_registered_variant(name):
    check_contract(name)


def test_gate_names_mean_the_same_everywhere():
    # a reader (the ladder report, plots) merges gate_ranges by key over variants: one range per key
    seen = {}
    for name in attention.names():
        for k, r in attention.get_class(name).gate_ranges.items():
            assert seen.setdefault(k, (name, r))[1] == r, f"{k}: {r} in {name}, {seen[k][1]} in {seen[k][0]}"


@pytest.mark.parametrize("name", attention.names())
def test_causal_every_registered_variant(name):
    check_causal(name)


@pytest.mark.parametrize("name", attention.ra_names())
def test_variant_trains(name):
    check_trains(name)


def test_headsel_l1_lowers_w_rec_while_training():
    attn = tiny_gpt("ra_headsel").transformer.h[0].attn
    w_rec0 = attn.w_rec.mean().item()
    attn = check_trains("ra_headsel", ra_l1=0.5).transformer.h[0].attn
    assert attn.w_rec.mean().item() < w_rec0


class ToyRA(nn.Module):
    """A throwaway variant for the tests below, written against the contract alone: exact RA with
    a = 1 and a per-head gate g, s_ij = (q_i.k_j + g_h q_j.k_i) / sqrt(D); g = 0 (the init) is the
    baseline, and set_heads_mask makes a head plain by setting its g to 0."""
    ra_family = True
    attn_flop_mult = 2.0  # both score matrices in full
    options = ()
    gate_ranges = {"g": (-math.inf, None), "g_abs": (0.0, None)}
    head_selective = True

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.g = nn.Parameter(torch.zeros(cfg.n_head))

    def forward(self, x):
        T = x.size(1)
        q, k, v = AF.split_heads(self.c_attn(x), self.n_head)  # each (B, nh, T, hs)
        s = q @ k.transpose(-1, -2) + self.g.view(1, -1, 1, 1) * (k @ q.transpose(-1, -2))  # (B, nh, T, T)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return self.c_proj(AF.merge_heads((s / math.sqrt(q.size(-1))).softmax(-1) @ v))

    def metrics(self):
        return {"g_abs": self.g.detach().abs().mean()}

    def gates(self):
        return {"g": self.g.detach()}

    @torch.no_grad()
    def perturb_gates_(self, generator):
        self.g.copy_(torch.empty(self.n_head).uniform_(0.5, 1.5, generator=generator))

    @torch.no_grad()
    def set_heads_mask(self, mask):
        self.g.copy_(torch.where(mask, 0.5, 0.0))


class LeakyToyRA(ToyRA):
    """ToyRA with a bug that only shows while g != 0: every position sees the mean over the sequence."""

    def forward(self, x):
        return super().forward(x) + self.g.mean() * x.mean(dim=1, keepdim=True)  # (B, T, C) + (B, 1, C)


@pytest.fixture
def register(monkeypatch):
    """register(name, cls): what a new variant's file and REGISTRY line do, undone after the test."""
    def reg(name, cls):
        module = types.ModuleType(f"attention._test_{name}")
        setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setitem(attention.REGISTRY, name, f"_test_{name}:{cls.__name__}")
    return reg


def test_new_variant_is_one_class_and_one_registry_line(register, tmp_path):
    import bench

    register("ra_toy", ToyRA)
    assert "ra_toy" in attention.ra_names()
    check_contract("ra_toy")
    check_causal("ra_toy")
    model = check_trains("ra_toy")
    gates = model.gate_values()
    assert set(gates) == {"l0/g", "l1/g"} and len(gates["l0/g"]) == 4
    # bench.py's CPU smoke run measures it, in the heads sweep too (head_selective)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--what", "attn,step", "--sweep", "heads", "--variants", "ra_toy",
                       "--reps", "1", "--step-reps", "1", "--out", str(out)]) == 0
    rows = [r for r in json.loads(out.read_text())["rows"] if r["variant"] == "ra_toy"]
    assert {r["section"] for r in rows} == {"attn", "step", "sweep_heads"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    assert {r["setting"] for r in rows if r["section"] == "sweep_heads"} == {f"ra_heads={k}/4" for k in (0, 1, 2, 4)}


def test_causality_check_catches_a_leak_behind_a_closed_gate(register):
    register("ra_leaky_toy", LeakyToyRA)
    check_causal("ra_leaky_toy", perturb=False)  # g = 0 at init: the leak is switched off, the check passes
    with pytest.raises(AssertionError):
        check_causal("ra_leaky_toy")  # the gates opened through the contract: the leak shows


def _compile_cases():
    # every RA variant; the unfused path too where there is one, with a stored routing where there is one
    cases = [(n, True) for n in attention.ra_names()]
    return cases + [(n, False) for n in attention.ra_names() if "ra_fused" in attention.get_class(n).options]


@pytest.mark.parametrize("name,fused", _compile_cases())
def test_compiles_fullgraph_without_host_sync(name, fused):
    """fullgraph=True fails on any graph break, e.g. .item(), bool(tensor), .cpu() in forward."""
    torch._dynamo.reset()
    options = attention.get_class(name).options
    kw = dict(ra_route_every=4) if "ra_route_every" in options and not fused else {}
    torch.manual_seed(0)
    mod = attention.build(name, cfg_for(name, ra_fused=fused, **kw))
    x = torch.randn(2, 21, 96, requires_grad=True)
    mod(x)  # one eager call first: a one-time notice (the CPU fallback's) is not the forward's business
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    aux = mod.aux_loss() if hasattr(mod, "aux_loss") else None  # stored by the compiled forward
    y.sum().backward()
    torch.testing.assert_close(y, mod(x))
    if aux is not None:
        assert aux.requires_grad  # in the graph, so the optimizer sees it
        torch.testing.assert_close(aux, mod.aux_loss())  # the eager forward's


def test_same_flop_inductor_compile():
    """One real inductor compile of the fused module (the GPU benchmark's path)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = attention.build("ra_same_flop", cfg_for(n_embd=64, n_head=2))
    x = torch.randn(1, 9, 64)
    compiled = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), rtol=1e-5, atol=1e-6)


def test_flop_mult_and_reset_parameters():
    for name, mult in (("ra_same_flop", 1.0), ("ra_headsel", 1.0), ("ra_tokensel", 1.0),
                       ("ra_exact", 1.5), ("ra_swap", 2.0)):
        model = tiny_gpt(name)
        attn = model.transformer.h[0].attn
        assert attn.attn_flop_mult == mult
        if hasattr(attn, "W"):  # GPT's generic init does not touch the module's own parameters
            assert attn.W.shape == (16, 8) and abs(attn.W.std().item() - 0.02) < 0.01
            torch.testing.assert_close(attn.w_std, torch.full((4,), GPTConfig.ra_w_std_init))
            torch.testing.assert_close(attn.w_rec, torch.full((4,), GPTConfig.ra_w_rec_init))
        if name == "ra_tokensel":
            assert attn.scorer.bias.item() == 0.0


def _gate_ref(qkv, m, H, R):
    """The gate written plainly: multiply Qf's last R columns of every head by m, out of place."""
    N, C3 = qkv.shape
    D = C3 // 3 // H
    col = torch.arange(C3, device=qkv.device)
    gated = (col < C3 // 3) & (col % D >= D - R)
    return qkv * torch.where(gated, m.unsqueeze(-1), torch.ones((), dtype=qkv.dtype, device=qkv.device))


def _gate_check(x, m, up, B, T, H, R, compiled=False, tol=None):
    """gate_rec_queries on a fresh buffer x * 1 against _gate_ref (float64), values and the
    gradients of x and m under the upstream gradient up (B*T, 3C); returns the gated buffer's
    data_ptr before and after (equal: in place)."""
    def gated(x, m):
        qkv = x * 1  # a fresh non-leaf buffer, as the projection's output is
        q, k, v = gate_rec_queries(qkv, m, B, T, H, R)
        return torch.cat([t.transpose(1, 2).reshape(B * T, -1) for t in (q, k, v)], dim=-1), qkv, q

    fn = gated
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(lambda x, m: gated(x, m)[0], fullgraph=True)
        out = fn(x, m)
    else:
        out, qkv, q = gated(x, m)
        assert q.data_ptr() == qkv.data_ptr()  # q is a view of the gated buffer, no copy
    ref = _gate_ref(x.double(), m.double(), H, R)
    got = torch.autograd.grad((out.double() * up.double()).sum(), (x, m))
    want = torch.autograd.grad((ref * up.double()).sum(), (x, m))
    for a, b in zip((out,) + got, (ref,) + want):
        a, b = a.double().cpu(), b.double().cpu()
        if tol is None:
            torch.testing.assert_close(a, b, **TOL64)
        else:
            assert ((a - b).norm() / b.norm()).item() < tol


@pytest.mark.parametrize("compiled", [False, True])
def test_gate_rec_queries_matches_reference(compiled):
    B, T, H, D, R = 3, 9, 3, 16, 5
    x = rand(B * T, 3 * H * D, seed=7).requires_grad_()
    m = torch.sigmoid(rand(B * T, seed=8)).requires_grad_()
    _gate_check(x, m, torch.randn(B * T, 3 * H * D, dtype=torch.float64), B, T, H, R, compiled)


_GATE_INTERP_CHECK = """
import torch
from attention import rec_gate
assert rec_gate.INTERPRET and rec_gate._use_kernel(torch.zeros(1))  # the Triton kernel, on the CPU
from tests.test_ra import _gate_check
B, T, H, D, R = 3, 15, 3, 32, 8  # B*T not a multiple of BLOCK_ROWS, H * R not a power of 2
for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, 3 * H * D, generator=g).to(dtype).requires_grad_()
    m = torch.rand(B * T, generator=g).requires_grad_()
    _gate_check(x, m, torch.randn(B * T, 3 * H * D, generator=g), B, T, H, R, tol=tol)
print("GATE_INTERP_OK")
"""


def test_gate_rec_queries_triton_kernel_interpreter():
    """The CUDA path's Triton kernel, run on the CPU by Triton's interpreter (in a subprocess:
    TRITON_INTERPRET must be set before triton is imported)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _GATE_INTERP_CHECK], env=env, cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "GATE_INTERP_OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compiled", [False, True])
def test_gate_rec_queries_cuda(compiled):
    """The Triton kernel on the GPU (bf16), eager and traced by torch.compile into inductor's graph."""
    B, T, H, D, R = 2, 500, 12, 64, 8
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B * T, 3 * H * D, device="cuda", generator=g).bfloat16().requires_grad_()
    m = torch.rand(B * T, device="cuda", generator=g).requires_grad_()
    up = torch.randn(B * T, 3 * H * D, device="cuda", generator=g).bfloat16()
    _gate_check(x, m, up, B, T, H, R, compiled, tol=1e-2)


def test_gate_rec_queries_bad_input():
    qkv = torch.zeros(10, 48)
    with pytest.raises(ValueError, match="m must be"):
        gate_rec_queries(qkv, torch.ones(9), 2, 5, 2, 4)
    with pytest.raises(ValueError, match="contiguous"):
        gate_rec_queries(qkv.t(), torch.ones(48), 2, 5, 2, 4)
    with pytest.raises(ValueError, match="R=8"):
        gate_rec_queries(qkv, torch.ones(10), 2, 5, 2, 8)


def test_tokensel_aux_loss_releases_the_forward_graph():
    # the module must not keep its last forward's autograd graph alive into the next step (it held the
    # scorer's gradient nodes, which broke CUDA-graph capture); metrics keep the value
    mod = build64("ra_tokensel")
    x = rand(2, 33, 96, seed=5).requires_grad_()
    mod(x)
    assert mod._aux.grad_fn is not None and mod._sel.grad_fn is None
    aux = mod.aux_loss()
    assert aux.requires_grad and mod._aux.grad_fn is None
    torch.testing.assert_close(aux.detach(), mod.token_penalty * (mod._sel - mod.token_frac) ** 2)
    torch.testing.assert_close(mod.metrics()["tok_frac"], mod._sel)
    assert not mod.aux_loss().requires_grad  # used up until the next forward


def test_headsel_aux_loss_from_the_forward():
    # the L1 term is computed in the training forward (one compiled graph with the loss) and handed
    # over once; without a forward, or on a second call, aux_loss computes it directly
    mod = build64("ra_headsel", ra_l1=0.5).train()
    want = 0.5 * mod.w_rec.mean()
    torch.testing.assert_close(mod.aux_loss(), want)  # no forward yet
    mod(rand(2, 9, 96, seed=1))
    assert mod._aux is not None
    aux = mod.aux_loss()
    torch.testing.assert_close(aux, want)
    (g,) = torch.autograd.grad(aux, mod.s_rec)
    torch.testing.assert_close(g, 0.5 * 2 * mod.s_rec.detach() / mod.s_rec.numel())  # d/ds mean(s^2)
    assert mod._aux is None and mod.aux_loss().requires_grad
