"""ra_exact_headsel: per head, plain attention or exact RA against the float64 reference, for a given heads mask
(outputs and gradients, odd T); plain heads leave the folded call; the capacity follows the routing; compile."""

import pytest
import torch

import attention
import attention.ra_exact_headsel as EH
from attention.functional import merge_heads
from ra_reference import TOL64, build64, grads, qkv_heads, rand, ref_exact

NAME = "ra_exact_headsel"
H, C = 4, 96  # 4 heads of 24 dims
MASKS = [[False, True, False, True], [True, False, False, False], [True] * H, [False] * H]


def module64(**kw):
    mod = build64(NAME, n_head=H, n_embd=C, **kw)
    mod.perturb_gates_(torch.Generator().manual_seed(5))  # a in [0.5, 1.5], |b| in [0.3, 1], every head RA
    return mod


def reference(mod, x, mask):
    """Per-head output (B, H, T, hs) in float64 from the module's own weights: exact RA with b' = w_rec b on the
    heads of mask; on the others explicit plain attention softmax(a q_i.k_j / sqrt(D)) (ref_exact at b = 0)."""
    q, k, v = qkv_heads(mod, x)
    b = torch.where(mask, mod.s_rec.square() * mod.b, torch.zeros_like(mod.b))
    return ref_exact(q, k, v, mod.a, b)


@pytest.mark.parametrize("operands", ["dense", "cat"])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("R" if r else "p" for r in m))
def test_each_head_is_plain_or_exact_ra_against_float64_reference(mask, operands):
    # dense (the default): the RA group's q' from its own projection, in (B, T, H, .) order; cat: ra_exact's cat
    mask = torch.tensor(mask)
    mod = module64(ra_exact_operands=operands)
    with torch.no_grad():
        a, b, s_rec = mod.a.clone(), mod.b.clone(), mod.s_rec.clone()
    mod.set_heads_mask(mask)
    assert mod.n_ra == int(mask.sum()) and mod.rec_on().tolist() == mask.tolist()
    with torch.no_grad():  # keep the perturbed gates on the RA heads (set_heads_mask set them)
        mod.a.copy_(a)
        mod.b.copy_(b)
        mod.s_rec.copy_(torch.where(mask, s_rec, mod.s_rec))
    assert mod.rec_on().tolist() == mask.tolist()
    x = rand(2, 37, C, seed=2)  # odd T
    y, y_ref = mod.heads(x), reference(mod, x, mask)
    torch.testing.assert_close(y, y_ref, **TOL64)
    # the forward (its output projection reads the heads in group order) is c_proj of the same heads
    torch.testing.assert_close(mod(x), mod.c_proj(merge_heads(y_ref)), **TOL64)
    # the RA heads do carry a reciprocal term: they differ from plain attention
    plain = reference(mod, x, torch.zeros(H, dtype=torch.bool))
    for h in range(H):
        assert torch.allclose(y[:, h], plain[:, h], **TOL64) != bool(mask[h]), h
    params = [mod.c_attn.weight, mod.c_attn.bias, mod.a, mod.b, mod.s_rec]
    names = ("c_attn.weight", "c_attn.bias", "a", "b", "s_rec")
    for g, g_ref, name in zip(grads(y, params), grads(y_ref, params), names):
        torch.testing.assert_close(torch.zeros_like(g_ref) if g is None else g, g_ref, **TOL64, msg=name)
    g_b, g_s = grads(y, [mod.b, mod.s_rec])
    for g in (g_b, g_s):  # plain heads: no task gradient on their gate or b; RA heads: one
        g = torch.zeros(H, dtype=torch.float64) if g is None else g
        assert ((g != 0) == mask).all(), (g, mask)


@pytest.mark.parametrize("operands", ["dense", "cat"])
def test_grouped_forward_without_projection_bias(operands):
    mod = module64(bias=False, ra_exact_operands=operands)
    mask = torch.tensor(MASKS[0])
    mod.set_heads_mask(mask)
    x = rand(1, 11, C, seed=4)
    torch.testing.assert_close(mod(x), mod.c_proj(merge_heads(reference(mod, x, mask))), **TOL64)


@pytest.mark.parametrize("operands", ["dense", "cat"])
def test_plain_heads_leave_the_folded_call(monkeypatch, operands):
    # the speed claim: the folded (2D-head-dim) call sees only the RA group, plain SDPA the rest
    seen = []

    def spy(fn, kind):
        def wrapped(q, *args, **kw):
            seen.append((kind, q.size(1), q.size(-1)))
            return fn(q, *args, **kw)
        return wrapped

    monkeypatch.setattr(EH, "sdpa_causal", spy(EH.sdpa_causal, "plain"))
    mod = module64(ra_exact_operands=operands)
    monkeypatch.setattr(mod, "attend", spy(mod.attend, "ra"))  # ra_exact's folded call: q' of head dim 2 hs
    x = rand(1, 9, C)
    for mask, want in ((MASKS[0], [("ra", 2, 48), ("plain", 2, 24)]), (MASKS[2], [("ra", 4, 48)]),
                       (MASKS[3], [("plain", 4, 24)])):
        seen.clear()
        mod.set_heads_mask(torch.tensor(mask))
        mod(x)
        assert seen == want, (mask, seen)


def test_routing_refresh_sets_the_capacity_and_the_live_rule_stays_within_it():
    mod = module64(ra_route_every=5, ra_threshold=0.1)
    mod.train()
    assert mod.n_ra == H
    with torch.no_grad():
        mod.s_rec.copy_(torch.tensor([0.1, 0.6, 0.2, 0.7], dtype=torch.float64))  # w_rec 0.01, 0.36, 0.04, 0.49
    assert mod.rec_on().all()  # training: the stored routing until a refresh
    mod.set_step(3)
    assert mod.n_ra == H and mod.rec_on().all()
    mod.set_step(5)
    assert mod.n_ra == 2 and mod.rec_on().tolist() == [False, True, False, True]
    assert float(mod.metrics()["ra_frac"]) == 0.5
    x = rand(2, 21, C, seed=3)
    torch.testing.assert_close(mod.heads(x), reference(mod, x, mod.rec_on()), **TOL64)
    # a resumed module gets the capacity of its stored routing back
    other = module64(ra_route_every=5, ra_threshold=0.1)
    other.load_state_dict(mod.state_dict())
    assert other.n_ra == 2 and other.train().rec_on().tolist() == [False, True, False, True]
    # an eval forward routes on the live rule: a head that came back above the threshold exceeds the capacity
    # and runs as a plain head (rec_on says so), at most n_ra heads are RA
    mod.eval()
    with torch.no_grad():
        mod.s_rec[0] = 0.5
    assert mod.live_route().tolist() == [True, True, False, True]
    assert mod.rec_on().tolist() == [True, True, False, False]
    torch.testing.assert_close(mod.heads(x), reference(mod, x, mod.rec_on()), **TOL64)
    with pytest.raises(ValueError, match="ra_route_every"):
        attention.build(NAME, mod_cfg(ra_route_every=-1))


def mod_cfg(**kw):
    from ra_reference import cfg_for
    return cfg_for(NAME, n_head=H, n_embd=C, **kw)


def test_starts_at_sdpa_and_the_gate_comes_alive_once_b_moves():
    torch.manual_seed(0)
    mod, base = attention.build(NAME, mod_cfg()), attention.build("sdpa", mod_cfg(attn="sdpa"))
    base.load_state_dict({k: v for k, v in mod.state_dict().items() if k.startswith(("c_attn", "c_proj"))})
    x = torch.randn(2, 15, C)
    torch.testing.assert_close(mod(x), base(x), rtol=1e-6, atol=1e-6)
    mod(x).square().sum().backward()
    assert mod.b.grad.abs().min() > 0  # b = 0 is not stationary
    assert (mod.s_rec.grad == 0).all()  # the gate multiplies b = 0
    mod.zero_grad()
    with torch.no_grad():
        mod.b.fill_(0.1)
    mod(x).square().sum().backward()
    assert mod.s_rec.grad.abs().min() > 0
    # the L1 term pulls every w_rec down
    mod.zero_grad()
    mod.aux_loss().backward()
    torch.testing.assert_close(mod.s_rec.grad, mod.l1 * 2 * mod.s_rec.detach() / H)


@pytest.mark.parametrize("operands", ["dense", "cat"])
@pytest.mark.parametrize("mask", [MASKS[0], MASKS[2]], ids=["grouped", "all_ra"])
def test_compiles_fullgraph_with_groups(mask, operands):
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = attention.build(NAME, mod_cfg(ra_route_every=3, ra_exact_operands=operands))
    mod.perturb_gates_(torch.Generator().manual_seed(1))
    mod.set_heads_mask(torch.tensor(mask))
    x = torch.randn(2, 21, C, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, mod(x))
    assert mod.aux_loss().requires_grad
