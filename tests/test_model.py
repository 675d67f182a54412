"""model.py and the attention registry: shapes, loss at init, errors, FLOP count."""

import math

import pytest
import torch

import attention
from model import GPT, GPTConfig


def tiny(**kw):
    base = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=101)
    base.update(kw)
    return GPTConfig(**base)


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    targets = torch.randint(0, cfg.vocab_size, (3, 17))  # not idx: tied embeddings favour repeating the input
    logits, loss = model(idx, targets)
    assert cfg.padded_vocab_size == 128  # padded to a multiple of 64
    assert logits.shape == (3, 17, 128)
    # at init the prediction is near uniform, so the loss is near ln(padded vocab)
    assert abs(loss.item() - math.log(128)) < 0.3
    logits, loss = model(idx)
    assert loss is None
    # training asks for the loss only (train.py, bench.py): same loss, no logits
    no_logits, loss2 = model(idx, targets, return_logits=False)
    assert no_logits is None and torch.equal(loss2, model(idx, targets)[1])


def test_tied_embeddings_and_scaled_init():
    cfg = tiny(n_layer=6)
    model = GPT(cfg)
    assert model.transformer.wte.weight is model.lm_head.weight
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 6)) < 0.002


def test_too_long_sequence_errors():
    model = GPT(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_registry_errors_and_names():
    assert "sdpa" in attention.names()
    with pytest.raises(ValueError, match="valid names: .*sdpa"):
        attention.build("nope", tiny())
    with pytest.raises(ValueError, match="unknown attention"):
        GPT(tiny(attn="nope"))
    with pytest.raises(ValueError, match="divisible"):
        GPT(tiny(n_embd=65))


def test_aux_loss_zero_for_baseline_and_generate():
    model = GPT(tiny())
    aux = model.aux_loss()
    assert aux.shape == () and aux.item() == 0.0
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 40)  # crosses block_size: context is cropped
    assert out.shape == (2, 41)
    assert int(out.max()) < 101  # never samples a padding id


def test_flops_per_token():
    cfg = tiny()
    model = GPT(cfg)
    n = model.num_params()
    expected = 6 * n + cfg.n_layer * 6 * cfg.block_size * cfg.n_embd
    assert model.flops_per_token() == expected


def test_optimizer_groups():
    model = GPT(tiny())
    opt = model.configure_optimizer(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backend", ["math", "auto"])
def test_sdpa_backend_matches_reference(backend):
    torch.manual_seed(0)
    cfg = tiny(sdpa_backend=backend)
    attn = attention.build("sdpa", cfg).double()
    x = torch.randn(2, 9, cfg.n_embd, dtype=torch.float64)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / math.sqrt(C // 4)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(attn(x), attn.c_proj(ref))


def test_same_seed_same_shared_init_across_variants():
    """Paired comparisons need it: a variant's extra parameters must not shift the shared init."""
    states = {}
    for name in attention.names():
        torch.manual_seed(7)
        states[name] = GPT(tiny(attn=name)).state_dict()
    base = states["sdpa"]
    for name, sd in states.items():
        shared = [k for k in base if k in sd]
        assert len(shared) == len(base), name
        for k in shared:
            assert torch.equal(base[k], sd[k]), (name, k)
    torch.manual_seed(8)
    assert not torch.equal(GPT(tiny()).state_dict()["lm_head.weight"], base["lm_head.weight"])
