"""Each RA module against its float64 reference (tests/ra_reference.py): same-FLOP, exact, swap,
ra_headsel's routing, ra_tokensel's per-token gate, the aux losses."""

import math

import pytest
import torch

import attention
from model import GPT, GPTConfig
from ra_reference import (TOL64, assert_close_with_grads, build64, cfg_for, grads, qkv_heads, rand, ref_exact,
                          ref_same_flop, ref_softmax_attend)


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


@pytest.mark.parametrize("operands", ["dense", "cat"])
def test_exact_module_matches_reference(operands):
    # dense: the projection writes q' per head (and v), each dense in (B, T, H, .) order, and k' is q' swapped and
    # scaled; cat: q' and k' copied from the views q, k; same function, same gradients
    x = rand(2, 77, 96, seed=3).requires_grad_()
    mod = build64("ra_exact", ra_exact_operands=operands)
    cfg = GPTConfig()
    assert mod.a.tolist() == pytest.approx([cfg.ra_w_std_init] * 3) and mod.b.tolist() == pytest.approx([cfg.ra_b_init] * 3)  # the init flags
    with torch.no_grad():
        mod.a.copy_(torch.tensor([1.0, 0.5, -0.2]))
        mod.b.copy_(torch.tensor([0.3, -0.7, 1.1]))
    params = [x, mod.c_attn.weight, mod.c_attn.bias, mod.a, mod.b]
    y = mod.heads(x)
    q, k, v = qkv_heads(mod, x)
    ref = ref_exact(q, k, v, mod.a, mod.b)
    assert_close_with_grads(y, ref, params)
    assert mod.attn_flop_mult == 1.5
    assert list(mod.state_dict()) == ["a", "b", "c_attn.weight", "c_attn.bias", "c_proj.weight", "c_proj.bias"]


def test_exact_operands_option_is_checked():
    with pytest.raises(ValueError, match="ra_exact_operands='fused'; use dense or cat"):
        build64("ra_exact", ra_exact_operands="fused")


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
    assert_close_with_grads(y, ref, params)
    assert mod.attn_flop_mult == 2.0


def test_swap_module_without_norm_matches_reference():
    """ra_swap_norm=none: out = y + tanh(beta) r, r not rescaled."""
    x = rand(2, 77, 96, seed=4).requires_grad_()
    mod = build64("ra_swap", ra_swap_norm="none")
    with torch.no_grad():
        mod.beta.fill_(-0.4)
    params = [x, mod.c_attn.weight, mod.beta]
    q, k, v = qkv_heads(mod, x)
    std = ref_softmax_attend(q @ k.transpose(-1, -2) / math.sqrt(32), v)
    swp = ref_softmax_attend(k @ q.transpose(-1, -2) / math.sqrt(32), v)
    ref = std + torch.tanh(mod.beta) * swp
    y = mod.heads(x)
    assert_close_with_grads(y, ref, params)
    with pytest.raises(ValueError, match="ra_swap_norm='rms'"):
        build64("ra_swap", ra_swap_norm="rms")


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
