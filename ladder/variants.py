"""
What the ladder needs to know about an attention variant, read from its class (attention.get_class):
  ra_family       True for reciprocal-attention variants (sdpa: False)
  gate_ranges     {gate metric name: (lo, hi)}, hi None = unbounded: the range its gates must stay in
  head_selective  whether it switches whole heads between RA and plain attention (ra_frac)
  options         the GPTConfig fields it reads (the report lists their values per variant)
  attn_flop_mult  its attention FLOPs relative to sdpa's (the GPU workers start costlier jobs first)
A name the registry does not know (a run folder from an older checkout) gets the neutral answers.
"""

import attention


def _cls(name):
    try:
        return attention.get_class(name)
    except (ValueError, ImportError, AttributeError):
        return None


def ra_names():
    return list(attention.ra_names())


def default_variants():
    """The baseline sdpa and every registered RA-family variant."""
    return ["sdpa"] + [n for n in ra_names() if n != "sdpa"]


def gate_ranges(name):
    return dict(getattr(_cls(name), "gate_ranges", None) or {})


def head_selective(name):
    return bool(getattr(_cls(name), "head_selective", False))


def flop_mult(name):
    """Attention FLOPs relative to plain causal attention (1.0 when unknown): slower variants start first."""
    return float(getattr(_cls(name), "attn_flop_mult", 1.0) or 1.0)


def options(name):
    return tuple(getattr(_cls(name), "options", None) or ())


def all_options():
    """Every GPTConfig field some registered variant reads: those may differ between variants of a
    comparison without making it unlike (each variant has its own attention settings)."""
    out = set()
    for n in attention.names():
        out.update(options(n))
    return out
