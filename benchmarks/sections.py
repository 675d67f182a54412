"""bench.py's sections: the attention rows, the training-step rows, and the sweeps R, T, heads and exact.
Each is section(bench, names, cfg, B, T), adding rows to the Bench."""

import dataclasses

import torch

from .variants import EXACT_FUNCTIONS, FUNCTIONS, SPAN_FUNCTIONS, head_selective_names, variant_names


def section_attn(bench, names, cfg, B, T):
    bench.attn_all("attn", "attn", "", names, bench.functions_for(names), cfg, B, T)


def section_step(bench, names, cfg, B, T):
    for compiled in [m for m in ([False, True] if bench.args.compile else [False]) if m or bench.args.eager]:
        if bench.args.interleave:
            bench.interleaved_steps(names, cfg, B, T, compiled)
            continue
        for name in names:
            bench.step(name, cfg, B, T, compiled)
    torch._dynamo.reset()  # its caches hold the last compiled model


def sweep_R(bench, names, cfg, B, T):
    """The roadmap's benchmark_same_flop_ratios: folded ra_same_flop and the roadmap's unfused form."""
    bench.attn_all("sweep_R", "sweep_R", "", ["sdpa"], [FUNCTIONS[0]], cfg, B, T)
    swept = ["ra_same_flop", "roadmap_unfused"]
    for R in (4, 8, 12, 16):
        for name in swept:
            if name not in variant_names():
                bench.not_registered("sweep_R", f"R={R}", name)
            elif name in names:
                bench.attn_all("sweep_R", "sweep_R", f"R={R}", [name], [f for f in FUNCTIONS if f[1] == name],
                               dataclasses.replace(cfg, ra_R=R), B, T)


def sweep_T(bench, names, cfg, B, T):
    for t in (T, 2 * T, 4 * T):
        bench.attn_all("sweep_T", f"sweep_T/T={t}", f"T={t}", names, bench.functions_for(names),
                       dataclasses.replace(cfg, block_size=t), B, t)


def ra_heads_setter(mask):
    """Make the heads in mask (bool [H]) RA heads, through the module's set_heads_mask(mask)."""
    def prepare(mod):
        mod.set_heads_mask(mask.to(next(mod.parameters()).device))
    return prepare


def sweep_heads(bench, names, cfg, B, T):
    bench.attn_module("sweep_heads", "sweep_heads", "", "sdpa", cfg, B, T)
    for name in head_selective_names():
        if bench.args.variants and name not in names:
            continue
        for frac in (0.0, 0.25, 0.5, 1.0):
            k = round(frac * cfg.n_head)
            mask = torch.arange(cfg.n_head) < k
            bench.attn_module("sweep_heads", "sweep_heads", f"ra_heads={k}/{cfg.n_head}", name, cfg, B, T,
                              prepare=ra_heads_setter(mask))


def sweep_exact(bench, names, cfg, B, T):
    """Exact RA against plain causal SDPA at T, 2T, 4T and head dims D, 2D (1024..4096 and 64, 128
    by default), as bare functions; each (T, D) is its own group, so ratios are to sdpa at that T and D.
    Then #17's span rows: from the projection's output(s) to the attention's output, for sdpa (q, k, v
    views of one output) and ra_exact's dense operands (k' built inside); their ms ratio is the span's."""
    for t in (T, 2 * T, 4 * T):
        for d in (cfg.head_dim, 2 * cfg.head_dim):
            c = dataclasses.replace(cfg, n_embd=cfg.n_head * d, block_size=t)
            for label, owner, where, mult in EXACT_FUNCTIONS:
                dims = (2 * d, 2 * d, d) if label == "exact bound" else None  # pre-built q', k' (2D) and v (D)
                bench.attn_function("sweep_exact", f"sweep_exact/T={t},D={d}", f"T={t} D={d}", label, owner, where,
                                    mult, c, B, t, dims)
            for label, owner, fn, mult, shapes in SPAN_FUNCTIONS:
                bench.attn_function("sweep_exact", f"sweep_exact/T={t},D={d}", f"T={t} D={d}", label, owner, fn,
                                    mult, c, B, t, shapes=shapes(c.n_head, d))


SWEEPS = {"R": sweep_R, "T": sweep_T, "heads": sweep_heads, "exact": sweep_exact}
