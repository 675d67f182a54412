"""The functional forms against the float64 references (tests/ra_reference.py): reciprocal_attention,
the same-FLOP form, its weight fold (the autograd Function, its backward, gradcheck, an inductor
compile), quantize_rec."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from attention import fold
from attention import functional as AF
from ra_reference import TOL64, assert_close_with_grads, rand, ref_exact, ref_same_flop


@pytest.mark.parametrize("D", [32, 64])
def test_reciprocal_attention_matches_reference(D):
    B, H, T = 2, 3, 77
    q, k, v = (rand(B, H, T, D, seed=i).requires_grad_() for i in range(3))
    a = (torch.rand(H, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.rand(H, dtype=torch.float64) - 0.5).requires_grad_()  # a negative b is allowed
    inputs = (q, k, v, a, b)
    ref = ref_exact(*inputs)
    for fn in (AF.reciprocal_attention, AF.reciprocal_attention_matmul, AF.reciprocal_attention_padded_v):
        assert_close_with_grads(fn(*inputs), ref, inputs)
    # float32 against the float64 reference
    out32 = AF.reciprocal_attention(*(t.detach().float() for t in inputs))
    torch.testing.assert_close(out32.double(), ref.detach(), rtol=1e-4, atol=1e-5)


def test_dense_operands_from_projection_outputs_match_reference():
    """ra_operands_dense: q' and v as projection outputs dense in (B, T, H, .) order; the folded attention over
    what it returns is exact RA (outputs and gradients of the projection outputs, a and b), and its operands
    keep that order (what lets cuDNN return the gradients in the projection's layout)."""
    B, H, T, D = 2, 3, 77, 32
    qk = rand(B, T, H, 2 * D, seed=0).requires_grad_()  # per head [q_h, k_h]
    v = rand(B, T, H, D, seed=1).requires_grad_()
    a = (torch.rand(H, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.rand(H, dtype=torch.float64) - 0.5).requires_grad_()
    qf, kf, vh = AF.ra_operands_dense(qk, v, a, b)
    assert qf.shape == kf.shape == (B, H, T, 2 * D) and vh.shape == (B, H, T, D)
    assert all(t.transpose(1, 2).is_contiguous() for t in (qf, kf, vh))
    out = AF.folded_attention(qf, kf, vh, D ** -0.5)
    q, k = qk[..., :D].transpose(1, 2), qk[..., D:].transpose(1, 2)
    assert_close_with_grads(out, ref_exact(q, k, v.transpose(1, 2), a, b), (qk, v, a, b))


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
    assert_close_with_grads(AF.ra_same_flop(*inputs), ref_same_flop(*inputs), inputs)


def test_fold_equals_activation_formula():
    """F.linear(x, folded weight) == same_flop_qk on the activations, bias and plain heads included."""
    C, H = 96, 3
    D, R = C // H, 8
    weight, bias, x = rand(3 * C, C, seed=1), rand(3 * C, seed=2), rand(2, 5, C, seed=3)
    W, s_std, s_rec = rand(D, R, seed=4), rand(H, seed=5), rand(H, seed=6)
    rec_on = torch.tensor([True, False, True])
    w, b = fold.fold_same_flop_qkv(weight, bias, W, s_std, s_rec, rec_on)
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
    got = fold.fold_same_flop_qkv(weight, b, W, s_std, s_rec, rec_on)
    want = ref_fold(weight, b, W, s_std, s_rec, rec_on)
    assert (got[1] is None) == (not bias)
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w, **TOL64)
    for g, w in zip(fold_grads(got, params), fold_grads(want, params)):
        torch.testing.assert_close(g, w, **TOL64)
    # the autograd-derived implementation it replaced agrees too
    old = fold._fold_same_flop_qkv_autograd(weight, b, W, s_std, s_rec, rec_on)
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
        got = fold._fold_backward(weight.detach(), None if b is None else b.detach(), W.detach(), s_std.detach(),
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
            fn = lambda w, bb, WW, s, r: fold.fold_same_flop_qkv(w, bb, WW, s, r, rec_on)
            assert torch.autograd.gradcheck(fn, (weight, b, W, s_std, s_rec))
        else:
            fn = lambda w, WW, s, r: fold.fold_same_flop_qkv(w, None, WW, s, r, rec_on)[0]
            assert torch.autograd.gradcheck(fn, (weight, W, s_std, s_rec))


@pytest.mark.slow
def test_fold_inductor_compile_grads():
    """The compiled fold (fullgraph; the fused backward) against the reference, values and grads."""
    torch._dynamo.reset()
    weight, b, W, s_std, s_rec = fold_inputs(C=32, H=2, R=4)
    params = [weight, b, W, s_std, s_rec]
    compiled = torch.compile(fold.fold_same_flop_qkv, fullgraph=True)
    for rec_on in (None, torch.tensor([False, True])):
        got = compiled(weight, b, W, s_std, s_rec, rec_on)
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
