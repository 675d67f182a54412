"""ra_exact_headsel: per head, plain attention or exact RA against the float64 reference, for a given heads mask
(outputs and gradients, odd T); plain heads leave the folded call; the capacity follows the routing; compile."""

import pytest
import torch

import attention
import attention.ra_exact as ra_exact_module
import attention.ra_exact_headsel as EH
from attention import two_stream
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
    # the folded call (q' of head dim 2 hs), which every exact-RA path reaches through ra_exact.attend_folded
    monkeypatch.setattr(ra_exact_module, "folded_attention", spy(ra_exact_module.folded_attention, "ra"))
    mod = module64(ra_exact_operands=operands)
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


def test_streams_option_is_checked():
    with pytest.raises(ValueError, match="ra_exact_streams=3; use 2"):
        build64(NAME, n_head=H, n_embd=C, ra_exact_streams=3)


# ----------------------------------------------------------------------------- two CUDA streams (GPU only)

def test_pair_ops_on_meta_tensors():
    # runs without a GPU: the two custom ops and their autograd wiring on meta tensors, through ATen's cuDNN attention
    # schemas and meta kernels (a torch whose schemas changed fails here, in CI); outputs and gradients keep the
    # (B, T, H, .) order of the inputs, which the module relies on (its output projection reads them as views)
    mk = lambda h, d: torch.empty(2, 37, h, d, device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    ins = [mk(3, 96), mk(3, 96), mk(3, 48), mk(5, 64), mk(5, 64), mk(5, 64)]
    y1, y2 = two_stream.causal_attention_pair(*ins, 48 ** -0.5, None)
    assert y1.shape == (2, 3, 37, 48) and y2.shape == (2, 5, 37, 64)
    assert y1.transpose(1, 2).is_contiguous() and y2.transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad([y1, y2], ins, [torch.empty_like(y1), torch.empty_like(y2)])
    for g, x in zip(grads, ins):
        assert g.shape == x.shape and g.transpose(1, 2).is_contiguous()
    assert not two_stream.usable(torch.empty(1, 1, 1, 64, dtype=torch.bfloat16))  # on the CPU: one stream


def _pair_ok():
    if not torch.cuda.is_available():
        return False
    t = torch.empty(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    return two_stream.usable(t)


needs_pair = pytest.mark.skipif(not _pair_ok(), reason="needs a CUDA GPU where two_stream runs (Hopper or newer, cuDNN)")


def _explicit(q, k, v, scale):
    """Causal attention with explicit (T, T) scores in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    T = s.size(-1)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s.softmax(-1) @ v.double()


@needs_pair
@pytest.mark.parametrize("T", [37, 128])
def test_pair_against_float64_and_causal(T):
    # two attentions of different head dims (qk 96, v 48; qk 64, v 64), odd T: outputs and gradients of each
    # against float64 explicit scores; then causality: changing the inputs after position t leaves y[:t]
    g = torch.Generator(device="cuda").manual_seed(T)
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).bfloat16().requires_grad_()
    B = 2
    ins = [rnd(B, 3, T, 96), rnd(B, 3, T, 96), rnd(B, 3, T, 48), rnd(B, 5, T, 64), rnd(B, 5, T, 64), rnd(B, 5, T, 64)]
    y1, y2 = two_stream.causal_attention_pair(*ins, 48 ** -0.5, None)
    r1 = _explicit(*ins[:3], 48 ** -0.5)
    r2 = _explicit(*ins[3:], 64 ** -0.5)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1.double(), r1, **tol)
    torch.testing.assert_close(y2.double(), r2, **tol)
    g1, g2 = torch.randn_like(y1), torch.randn_like(y2)
    got = torch.autograd.grad([y1, y2], ins, [g1, g2])
    want = torch.autograd.grad([r1, r2], ins, [g1.double(), g2.double()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=3e-2, atol=3e-2)
    t = T // 2
    later = [x.detach().clone() for x in ins]
    for x in later:
        x[:, :, t:] = torch.randn_like(x[:, :, t:])
    z1, z2 = two_stream.causal_attention_pair(*later, 48 ** -0.5, None)
    assert torch.equal(z1[:, :, :t], y1.detach()[:, :, :t]) and torch.equal(z2[:, :, :t], y2.detach()[:, :, :t])


@needs_pair
def test_pair_op_registration():
    # torch.library's own checks of the custom op: fake kernel against the real one, autograd registration
    B, T = 2, 64
    mk = lambda h, d: torch.randn(B, h, T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    args = (mk(2, 128), mk(2, 128), mk(2, 64), mk(4, 64), mk(4, 64), mk(4, 64), 0.125, 0.125)
    torch.library.opcheck(two_stream._pair, args)


def _gpu_module(streams, mask):
    from ra_reference import cfg_for
    torch.manual_seed(0)
    cfg = cfg_for(NAME, ra_exact_streams=streams, n_head=12, n_embd=768, block_size=256)
    mod = attention.build(NAME, cfg).cuda()
    mod.perturb_gates_(torch.Generator().manual_seed(1))
    mod.set_heads_mask(torch.tensor(mask, device="cuda"))
    return mod


def _fwd_bwd(mod, x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = mod(x)
    grads = torch.autograd.grad(y.float().square().sum(), [x] + list(mod.parameters()), allow_unused=True)
    return [y] + [g for g in grads if g is not None]


@needs_pair
def test_two_streams_match_one_stream_eager_and_compiled():
    # the module at 3 RA heads of 12 (a 124M layer, T = 255): two streams, eager and compiled (fullgraph, inductor),
    # compute what one stream computes, the output and the gradients of the input and of every parameter
    mask = [True] * 3 + [False] * 9
    one, two = _gpu_module(1, mask), _gpu_module(2, mask)
    x = torch.randn(4, 255, 768, device="cuda", requires_grad=True)
    want = _fwd_bwd(one, x)
    for got in (_fwd_bwd(two, x), _fwd_bwd(torch.compile(two, fullgraph=True), x)):
        _assert_near(got, want)


@needs_pair
def test_two_streams_in_a_cuda_graph():
    # a compiled training step (forward, backward) captured as one CUDA graph the way train.py --cuda-graph does
    # (cuda_graph.graphed: warm-up on a side stream, then capture and replay), with the groups on two streams and
    # on one: the replayed outputs and parameter gradients agree
    from cuda_graph import graphed
    mask = [True] * 3 + [False] * 9
    x = torch.randn(4, 255, 768, device="cuda")
    results = {}
    for streams in (1, 2):
        mod = _gpu_module(streams, mask)
        compiled = torch.compile(mod, fullgraph=True)
        static_x, out = torch.zeros_like(x), {}

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out["y"] = compiled(static_x)
            out["y"].float().square().sum().backward()

        run = graphed(step, torch.optim.SGD(mod.parameters(), lr=0.0), warmup=2)
        for _ in range(3):  # two warm-up steps, then the capture and its first replay
            static_x.copy_(torch.randn_like(x))
            run()
        static_x.copy_(x)
        run()  # a replay on x
        torch.cuda.synchronize()
        results[streams] = [out["y"].clone()] + [p.grad.clone() for p in mod.parameters() if p.grad is not None]
        run.release()
    _assert_near(results[2], results[1])


def _assert_near(got, want, rel=1e-2):
    """Each tensor within rel of its reference in norm (bf16 attention: elementwise tolerances do not fit both the
    outputs and the weight gradients, sums over 1020 tokens)."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)
        assert err < rel, (i, tuple(b.shape), float(err))
