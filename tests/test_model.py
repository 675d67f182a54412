"""model.py and the attention registry: shapes, loss at init, errors, FLOP count."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

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


def measured_flops(attn, T, B=2):
    """Matmul FLOPs of one forward + backward, counted by torch's FlopCounterMode: (weights, attention).
    The math backend makes SDPA plain bmm's over the full T x T square; a causal kernel does half of it."""
    torch.manual_seed(0)
    model = GPT(tiny(attn=attn, sdpa_backend="math"))
    idx = torch.randint(0, 101, (B, T))
    with FlopCounterMode(display=False) as fc:
        model(idx, idx)[1].backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    weights = counts.get("aten.mm", 0) + counts.get("aten.addmm", 0)
    return model, weights / (B * T), counts.get("aten.bmm", 0) / 2 / (B * T)


@pytest.mark.parametrize("attn", ["sdpa", "ra_exact", "ra_swap"])
def test_flops_per_token_matches_counted_flops(attn):
    """flops_per_token against the FLOPs the model really runs, forward and backward."""
    model, w32, a32 = measured_flops(attn, 32)
    _, w16, a16 = measured_flops(attn, 16)
    # the attention term, the part that grows with T, exactly (attn_flop_mult included)
    assert model.flops_per_token(32) - model.flops_per_token(16) == pytest.approx(a32 - a16, rel=1e-9)
    # the total, within the biases and LayerNorms that 6N counts as matmul weights
    assert model.flops_per_token(32) == pytest.approx(w32 + a32, rel=0.03)
    assert w16 == w32  # the weight FLOPs per token do not depend on T


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


def test_ra_names_are_the_ra_family():
    assert "sdpa" in attention.names() and "sdpa" not in attention.ra_names()
    assert attention.ra_names() == [n for n in attention.names() if attention.get_class(n).ra_family]
    assert set(attention.ra_names()) >= {"ra_same_flop", "ra_headsel", "ra_tokensel", "ra_exact", "ra_swap"}


@pytest.mark.parametrize("name", attention.names())
def test_gate_values_per_layer_and_head(name):
    torch.manual_seed(0)
    model = GPT(tiny(attn=name))
    idx = torch.randint(0, 101, (2, 9))
    model(idx)  # gates of the last forward (tok_frac) included
    values = model.gate_values()
    want = {f"l{i}/{k}": v for i, b in enumerate(model.transformer.h) for k, v in b.attn.gates().items()}
    assert set(values) == set(want) and (name != "sdpa") == bool(values)
    for k, v in values.items():
        assert isinstance(v, list) and all(isinstance(x, float) for x in v)
        assert v == want[k].float().tolist()
