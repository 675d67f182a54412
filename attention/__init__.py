"""
Attention implementations, by name.

A variant is an nn.Module built as `Class(cfg)` from a GPTConfig that maps the
block input x (B, T, C) to (B, T, C). It owns its QKV and output projections.
It declares what it is on the class, so nothing else in the repo (train.py, the
ladder, bench.py, the tests) matches on its name.

Required, on every class in REGISTRY:
  ra_family: bool               True for a reciprocal-attention variant (the ladder, ra_names())
  attn_flop_mult: float         attention FLOPs relative to plain causal attention (MFU, bench)
  options: tuple[str, ...]      the GPTConfig fields the variant reads beyond the shared model
                                fields (n_head, n_embd, bias, dropout, block_size), e.g.
                                ("sdpa_backend", "ra_R", ...); what a run's config is compared on
  gate_ranges: dict             {name: (lo, hi)}: valid range of every key that gates() and
                                metrics() return (lo a float, -inf if unbounded; hi a float or
                                None = unbounded). A key means the same, with the same range, in
                                every variant that uses it.
  head_selective: bool          True if heads can be switched between RA and plain attention;
                                such a class also has set_heads_mask(mask) below
  gates() -> dict[str, Tensor]  per-head gate values, detached (may be views of the parameters),
                                each (n_head,) (or (1,) for a per-layer value): where reciprocity
                                survives, logged over training (GPT.gate_values). {} for a variant
                                without gates.
  perturb_gates_(generator)     in place, under no_grad: set every gate parameter to a random value
                                in its valid range and away from any value that switches the
                                reciprocal branch off (all heads RA, some tokens selected, ...), so
                                that a test (causality, gradients) exercises the reciprocal path.
                                A no-op for a variant without gates.
Required when head_selective:
  set_heads_mask(mask)          mask: bool (n_head,) on the module's device, True = RA head: make
                                exactly these heads RA heads (bench.py's heads sweep)
Optional hooks, used when present:
  aux_loss() -> scalar tensor   regularizer added to the training loss
  metrics()  -> dict            values logged with each step (tensors are fine)
  set_step(step)                the optimizer step, for routing refreshed every N steps
  reset_parameters()            re-applies the module's own init after GPT's generic init

tests/test_ra_contract.py checks the contract of every registered class (options are GPTConfig fields,
every gates()/metrics() key has a range and lies in it at init, set_heads_mask changes the output)
and causality with the gates perturbed; GPT builds and trains any registered name.
So a new variant is one file in this folder plus one line in REGISTRY, nothing else.
Modules are imported on first use, so a variant that needs an optional
package (e.g. Triton) does not break the others.
"""

import importlib

# name -> "module:Class" (module relative to this package)
REGISTRY = {
    "sdpa": "sdpa:CausalSelfAttention",
    "ra_same_flop": "ra_same_flop:SameFlopRA",
    "ra_headsel": "ra_headsel:HeadSelRA",
    "ra_tokensel": "ra_tokensel:TokenSelRA",
    "ra_exact": "ra_exact:ExactRA",
    "ra_swap": "ra_swap:SwapRA",
    "ra_ctr": "ra_ctr:CTRReciprocalAttention",
    "ra_ctr_headsel": "ra_ctr_headsel:CTRHeadSelRA",
    "ra_exact_headsel": "ra_exact_headsel:ExactHeadSelRA",
}


def names():
    """The registered attention names, in registry order."""
    return list(REGISTRY)


def ra_names():
    """The registered names whose class is in the reciprocal-attention family, in registry order.
    A name whose module cannot be imported here (a missing optional package) is left out."""
    out = []
    for name in REGISTRY:
        try:
            cls = get_class(name)
        except ImportError:
            continue
        if cls.ra_family:
            out.append(name)
    return out


def check_name(name):
    if name not in REGISTRY:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(names())}")


def get_class(name):
    check_name(name)
    module_name, cls_name = REGISTRY[name].split(":")
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, cls_name)


def build(name, cfg):
    """Return the attention module registered under `name`, built from cfg."""
    return get_class(name)(cfg)
