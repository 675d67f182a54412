"""
Attention implementations, by name.

A variant is an nn.Module built as `Class(cfg)` from a GPTConfig that maps the
block input x (B, T, C) to (B, T, C). It owns its QKV and output projections.
Optional hooks the model and train.py use when present:
  aux_loss() -> scalar tensor   regularizer added to the training loss
  metrics()  -> dict            values logged with each step (tensors are fine)
  set_step(step)                the optimizer step, for routing refreshed every N steps
  reset_parameters()            re-applies the module's own init after GPT's generic init
  attn_flop_mult: float         attention FLOPs relative to plain causal attention (for MFU)
  set_ra_heads(mask)            head-selective variants: make exactly these heads RA heads (bench.py)

Adding a variant: one file in this folder plus one line in REGISTRY.
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
}


def names():
    """The registered attention names, in registry order."""
    return list(REGISTRY)


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
