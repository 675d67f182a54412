"""attention/rec_gate.gate_rec_queries (ra_tokensel's in-place query gate) against a plain float64 gate:
eager, compiled, the Triton kernel under the interpreter and on a GPU, bad input."""

import os
import subprocess
import sys

import pytest
import torch

from attention.rec_gate import gate_rec_queries
from ra_reference import TOL64, rand


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


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_gate_rec_queries_matches_reference(compiled):
    B, T, H, D, R = 3, 9, 3, 16, 5
    x = rand(B * T, 3 * H * D, seed=7).requires_grad_()
    m = torch.sigmoid(rand(B * T, seed=8)).requires_grad_()
    _gate_check(x, m, torch.randn(B * T, 3 * H * D, dtype=torch.float64), B, T, H, R, compiled)


_GATE_INTERP_CHECK = """
import torch
from attention import rec_gate
assert rec_gate.INTERPRET and rec_gate._use_kernel(torch.zeros(1))  # the Triton kernel, on the CPU
from test_rec_gate import _gate_check
B, T, H, D, R = 3, 15, 3, 32, 8  # B*T not a multiple of BLOCK_ROWS, H * R not a power of 2
for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B * T, 3 * H * D, generator=g).to(dtype).requires_grad_()
    m = torch.rand(B * T, generator=g).requires_grad_()
    _gate_check(x, m, torch.randn(B * T, 3 * H * D, generator=g), B, T, H, R, tol=tol)
print("GATE_INTERP_OK")
"""


@pytest.mark.slow
def test_gate_rec_queries_triton_kernel_interpreter():
    """The CUDA path's Triton kernel, run on the CPU by Triton's interpreter (in a subprocess:
    TRITON_INTERPRET must be set before triton is imported)."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "tests")])  # the repo and tests/ (ra_reference)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
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
