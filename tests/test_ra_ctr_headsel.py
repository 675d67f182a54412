"""ra_ctr_headsel on CPU (the pure-torch exact-RA path): gate routing, L1, causality, training."""

import pytest
import torch

import attention
from model import GPT, GPTConfig
from ra_reference import permutation_batches, ref_exact


def cfg(**kw):
    # ra_threshold pinned: the routing tests below place gates on either side of 0.1
    base = dict(n_layer=2, n_head=3, n_embd=96, block_size=64, vocab_size=64, attn="ra_ctr_headsel", ra_threshold=0.1)
    base.update(kw)
    return GPTConfig(**base)


def test_routed_off_heads_are_plain_and_match_reference():
    torch.manual_seed(0)
    mod = attention.build("ra_ctr_headsel", cfg()).double()
    with torch.no_grad():
        mod.b.copy_(torch.tensor([0.05, -0.4, 0.7], dtype=torch.float64))  # head 0 under ra_threshold=0.1
        mod.a.copy_(torch.tensor([1.0, 0.8, 1.2], dtype=torch.float64))
    assert mod.rec_on().tolist() == [False, True, True]
    x = torch.randn(2, 37, 96, dtype=torch.float64)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 3, 32).transpose(1, 2) for t in mod.c_attn(x).split(C, dim=2))
    b_eff = torch.tensor([0.0, -0.4, 0.7], dtype=torch.float64)
    ref = mod.c_proj(ref_exact(q, k, v, mod.a, b_eff).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(mod(x), ref)
    # the routed-off head's b gets no task gradient, only the L1's
    mod(x).square().sum().backward()
    assert mod.b.grad[0].item() == 0.0 and mod.b.grad[1].item() != 0.0
    mod.zero_grad()
    mod.aux_loss().backward()
    torch.testing.assert_close(mod.b.grad, mod.l1 * torch.sign(mod.b.detach()) / 3)


def test_route_every_and_metrics():
    mod = attention.build("ra_ctr_headsel", cfg(ra_route_every=5))
    with torch.no_grad():
        mod.b.copy_(torch.tensor([0.05, 0.3, 0.3]))
    assert mod.rec_on().tolist() == [True, True, True]  # training: the stored routing until a refresh
    mod.set_step(3)
    assert mod.rec_on().tolist() == [True, True, True]
    mod.set_step(5)
    assert mod.rec_on().tolist() == [False, True, True]
    m = mod.metrics()
    assert float(m["ra_frac"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ra_route_every"):
        attention.build("ra_ctr_headsel", cfg(ra_route_every=-1))


def test_trains_and_l1_lowers_gates():
    torch.manual_seed(0)
    model = GPT(cfg(ra_l1=0.5))
    attn = model.transformer.h[0].attn
    w0 = attn.w_rec.mean().item()
    opt = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95), "cpu")
    losses = []
    for step, seq in enumerate(permutation_batches(30, 48)):
        model.set_step(step)
        _, loss = model(seq[:, :-1], seq[:, 1:].contiguous())
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert attn.w_rec.mean().item() < w0
