"""Every registered attention variant keeps the contract of attention/__init__.py: class attributes,
gate names and ranges, causality with every gate live, training; a new variant is one class and one
registry line (ToyRA); the causality check catches a leak; flop multipliers and initial gates."""

import dataclasses
import json
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

import attention
from attention import functional as AF
from attention.triton_setup import HAS_TRITON
from model import GPTConfig
from ra_reference import permutation_batches, tiny_cfg, tiny_gpt


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
    losses = []
    for step, seq in enumerate(permutation_batches(30, 64)):  # seq (8, 65)
        model.set_step(step)
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
