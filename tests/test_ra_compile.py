"""Every RA variant compiles with fullgraph=True (no graph break, no host sync), and one real inductor compile."""

import pytest
import torch

import attention
from ra_reference import cfg_for

pytestmark = pytest.mark.slow  # compiles


def _compile_cases():
    # every RA variant; the unfused path too where there is one (with a stored routing where there is one);
    # ra_exact's cat operands (dense is the default)
    cases = [(n, {}) for n in attention.ra_names()]
    cases += [(n, {"ra_fused": False}) for n in attention.ra_names() if "ra_fused" in attention.get_class(n).options]
    return cases + [("ra_exact", {"ra_exact_operands": "cat"})]


@pytest.mark.parametrize("name,kw", _compile_cases(),
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else c)
def test_compiles_fullgraph_without_host_sync(name, kw):
    """fullgraph=True fails on any graph break, e.g. .item(), bool(tensor), .cpu() in forward."""
    torch._dynamo.reset()
    if "ra_route_every" in attention.get_class(name).options and kw.get("ra_fused") is False:
        kw = {**kw, "ra_route_every": 4}
    torch.manual_seed(0)
    mod = attention.build(name, cfg_for(name, **kw))
    x = torch.randn(2, 21, 96, requires_grad=True)
    mod(x)  # one eager call first: a one-time notice (the CPU fallback's) is not the forward's business
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    aux = mod.aux_loss() if hasattr(mod, "aux_loss") else None  # stored by the compiled forward
    y.sum().backward()
    torch.testing.assert_close(y, mod(x))
    if aux is not None:
        assert aux.requires_grad  # in the graph, so the optimizer sees it
        torch.testing.assert_close(aux, mod.aux_loss())  # the eager forward's


def test_same_flop_inductor_compile():
    """One real inductor compile of the fused module (the GPU benchmark's path)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = attention.build("ra_same_flop", cfg_for(n_embd=64, n_head=2))
    x = torch.randn(1, 9, 64)
    compiled = torch.compile(mod, fullgraph=True)
    torch.testing.assert_close(compiled(x), mod(x), rtol=1e-5, atol=1e-6)
