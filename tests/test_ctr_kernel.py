"""
Tests of the CTR reciprocal-attention kernel (attention/ctr_kernel.py) and the ra_ctr module.

The Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before triton is
imported; other test files may import triton first, so the kernel checks run in a subprocess that
executes this file as a script (`python tests/test_ctr_kernel.py --interp`). Everything is compared
with a plain float64 reference (explicit score matrix, causal mask, softmax).
"""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # also run as a script (see above), with tests/ but not the repo on sys.path
    sys.path.insert(0, ROOT)

from ra_reference import ref_exact  # noqa: E402


def _inputs(B, H, T, D, dtype, device="cpu", b_vals=None, seed=0, a_vals=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    a = (1.0 + 0.3 * torch.randn(H, generator=g)).to(device)
    if a_vals is not None:
        a = torch.tensor(a_vals, dtype=torch.float32).to(device)
    b = (0.5 * torch.randn(H, generator=g)).to(device) if b_vals is None else torch.tensor(b_vals, dtype=torch.float32).to(device)
    do = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, a, b, do


def _grads(fn, q, k, v, a, b, do):
    xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v, a, b)]
    out = fn(*xs)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [x.grad for x in xs]


def _rel(x, y):
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()


NAMES = ("out", "dq", "dk", "dv", "da", "db")


def compare(fn, B, H, T, D, dtype, b_vals=None, seed=0, skip_db_heads=None, a_vals=None):
    q, k, v, a, b, do = _inputs(B, H, T, D, dtype, b_vals=b_vals, seed=seed, a_vals=a_vals)
    got = _grads(fn, q, k, v, a, b, do)
    want = _grads(ref_exact, q, k, v, a, b, do)
    errs = {}
    for name, g, w in zip(NAMES, got, want):
        assert g is not None, name
        assert torch.isfinite(g.float()).all(), name
        if name == "db" and skip_db_heads is not None:
            assert (g[skip_db_heads] == 0).all(), "db at b=0 heads must be 0 with db_at_zero=False"
            keep = [h for h in range(H) if h not in skip_db_heads]
            g, w = g[keep], w[keep]
        errs[name] = _rel(g, w)
    return errs


# ---------------------------------------------------------------------- the interpreter checks
def _interp_main():
    """Run under TRITON_INTERPRET=1 (see test_kernel_interpreter)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from attention import ctr_kernel as ck

    assert ck.INTERPRET and ck.HAS_TRITON
    tol = {torch.float32: 2e-4, torch.float16: 1.5e-2}
    cases = [
        # (B, H, T, D, dtype, b per head, fwd cfg, bwd cfg)
        (2, 3, 77, 32, torch.float32, [0.4, 0.0, -0.6], dict(BLOCK_M=32, BLOCK_N=16), dict(BLOCK_M=16, BLOCK_N=32)),
        (2, 3, 77, 64, torch.float16, [0.0, 0.7, 0.3], dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=16, BLOCK_N=16)),
        (2, 3, 64, 64, torch.float16, [0.5, -0.3, 0.0], dict(BLOCK_M=32, BLOCK_N=16), dict(BLOCK_M=16, BLOCK_N=32)),
    ]
    failures = []
    for i, (B, H, T, D, dtype, b_vals, fc, bc) in enumerate(cases):
        fn = lambda q, k, v, a, b, fc=fc, bc=bc: ck.ctr_attention(q, k, v, a, b, fwd_config=fc, bwd_config=bc)  # noqa: E731
        errs = compare(fn, B, H, T, D, dtype, b_vals=b_vals, seed=i)
        bad = {n: e for n, e in errs.items() if not e < tol[dtype]}
        print(f"case {i}: B={B} H={H} T={T} D={D} {str(dtype)[6:]} b={b_vals}: "
              + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (f"  FAIL {bad}" if bad else "  ok"))
        if bad:
            failures.append(i)
    # db_at_zero=False: heads with b == 0 get db = 0, the rest exact
    fn = lambda q, k, v, a, b: ck.ctr_attention(q, k, v, a, b, db_at_zero=False,  # noqa: E731
                                                fwd_config=dict(BLOCK_M=16, BLOCK_N=16),
                                                bwd_config=dict(BLOCK_M=16, BLOCK_N=16))
    errs = compare(fn, 1, 2, 40, 32, torch.float32, b_vals=[0.0, 0.5], seed=7, skip_db_heads=[0])
    bad = {n: e for n, e in errs.items() if not e < 2e-4}
    print("case db_at_zero=False: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (f"  FAIL {bad}" if bad else "  ok"))
    if bad:
        failures.append("db_at_zero")
    # |b| > |a| and a == 0 (the forward's swapped accumulation order), next to a plain head
    fn = lambda q, k, v, a, b: ck.ctr_attention(q, k, v, a, b,  # noqa: E731
                                                fwd_config=dict(BLOCK_M=16, BLOCK_N=16),
                                                bwd_config=dict(BLOCK_M=16, BLOCK_N=16))
    errs = compare(fn, 1, 3, 40, 32, torch.float32, a_vals=[0.0, 0.5, 1.0], b_vals=[0.7, -1.2, 0.0], seed=8)
    bad = {n: e for n, e in errs.items() if not e < 2e-4}
    print("case a=0 / |b|>|a|: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + (f"  FAIL {bad}" if bad else "  ok"))
    if bad:
        failures.append("swap")
    # ctr_attention is a torch.library custom op: autotuned default configs, eager and under
    # torch.compile(fullgraph=True), i.e. without a graph break
    fn = lambda q, k, v, a, b: ck.ctr_attention(q, k, v, a, b)  # noqa: E731
    errs = compare(fn, 1, 3, 45, 32, torch.float32, b_vals=[0.4, 0.0, -0.6], seed=9)
    q, k, v, a, b, do = _inputs(1, 3, 45, 32, torch.float32, b_vals=[0.4, 0.0, -0.6], seed=9)
    got = _grads(torch.compile(fn, fullgraph=True), q, k, v, a, b, do)
    want = _grads(ref_exact, q, k, v, a, b, do)
    errs.update({f"compiled_{n}": _rel(g, w) for n, g, w in zip(NAMES, got, want)})
    bad = {n: e for n, e in errs.items() if not e < 2e-4}
    print("case custom op, eager + compiled: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
          + (f"  FAIL {bad}" if bad else "  ok"))
    if bad:
        failures.append("custom_op")
    print("INTERP_FAILURES", failures)
    return 1 if failures else 0


@pytest.mark.slow
def test_kernel_interpreter():
    # the interpreter runs the kernels on CPU tensors; on a GPU machine the GPU is hidden from it
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--interp"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    print(r.stdout[-4000:], r.stderr[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "INTERP_FAILURES []" in r.stdout


# ---------------------------------------------------------------------- CPU: torch path and module
def test_torch_fallback_matches_reference():
    from attention.ctr_kernel import reciprocal_attention_torch

    errs = compare(lambda *x: reciprocal_attention_torch(*x), 2, 3, 37, 16, torch.float32, b_vals=[0.3, 0.0, -0.8])
    assert all(e < 1e-5 for e in errs.values()), errs


def test_ra_ctr_module_cpu():
    import attention
    from model import GPT, GPTConfig

    assert "ra_ctr" in attention.names()
    cfg = GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, attn="ra_ctr")
    torch.manual_seed(0)
    model = GPT(cfg)
    blk = model.transformer.h[0].attn
    assert blk.attn_flop_mult == 1.5
    a, b = blk.head_weights()
    assert torch.allclose(a, torch.ones(2)) and torch.allclose(b, torch.full((2,), cfg.ra_b_init))
    idx = torch.randint(0, 64, (2, 20))
    _, loss = model(idx, idx)
    loss.backward()
    assert blk.b.grad is not None and blk.a.grad is not None and torch.isfinite(blk.b.grad).all()
    m = model.metrics()
    assert "attn/mean/b_abs" in m and abs(m["attn/mean/b_abs"] - abs(cfg.ra_b_init)) < 1e-6

    # the module computes exact RA: with b = 0 it is the sdpa baseline
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        blk.b.zero_()
        from attention.sdpa import CausalSelfAttention

        base = CausalSelfAttention(cfg)
        base.load_state_dict({k: v for k, v in blk.state_dict().items() if k.startswith("c_")})
        assert torch.allclose(blk(x), base(x), atol=1e-5)


# ---------------------------------------------------------------------- GPU (skipped without CUDA)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,D", [(77, 64), (256, 128), (300, 32)])
def test_kernel_gpu_bf16(T, D):
    pytest.importorskip("triton")
    from attention.ctr_kernel import ctr_attention

    H = 4
    q, k, v, a, b, do = _inputs(2, H, T, D, torch.bfloat16, device="cuda", b_vals=[0.5, 0.0, -0.4, 0.0], seed=T + D)
    got = _grads(lambda *x: ctr_attention(*x), q, k, v, a, b, do)
    want = _grads(lambda q_, k_, v_, a_, b_: ref_exact(q_.float(), k_.float(), v_.float(), a_, b_).float(),
                  q.float(), k.float(), v.float(), a, b, do.float())
    for name, g, w in zip(NAMES, got, want):
        err = _rel(g, w)
        assert err < 2e-2, (name, err)


if __name__ == "__main__":
    if "--interp" in sys.argv:
        sys.exit(_interp_main())
