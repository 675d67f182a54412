"""
Do the variants start from sdpa's initial weights? model.py draws each shared weight from a generator keyed
by its name, so at one seed every variant should; the ladder builds every model once to check, and the
report says if a variant differs (then the seed pairs its data order, not its initialization).
"""

import dataclasses


def init_check(plan, resolved, vocab_size):
    """{variant key: (identical, shared)}: how many of the weights a variant shares with sdpa (same name and
    shape) start from the same values at the first seed. train.py seeds the global RNG and builds GPT(mc); a
    variant whose constructor draws from that RNG shifts every later draw, and then the seed pairs only the
    data order."""
    import torch

    from model import GPT

    def initial(mc, seed):
        mc = dataclasses.replace(mc, vocab_size=vocab_size)
        torch.manual_seed(seed)  # as train.py does, before GPT(mc)
        return GPT(mc).state_dict()

    out, base = {}, None
    for run, (tc, mc) in zip(plan, resolved):
        if run["seed_index"] != 0 or run["repeat_of"]:
            continue
        sd = initial(mc, tc.seed)
        if base is None:  # the baseline comes first
            base = sd
            continue
        # the randomly initialized ones (LayerNorm weights and biases start constant in every variant)
        shared = [k for k in sd if k in base and sd[k].shape == base[k].shape and base[k].numel() > 1
                  and base[k].float().std() > 0]
        out[run["key"]] = (sum(torch.equal(sd[k], base[k]) for k in shared), len(shared))
    return out


def init_note(init):
    differ = {v: f"{a}/{n}" for v, (a, n) in init.items() if a < n}
    if not differ:
        return "init: every variant starts from sdpa's values for the weights it shares with sdpa"
    return (f"init: {', '.join(f'{v} ({x} random shared tensors equal)' for v, x in differ.items())} start from other "
            f"values than sdpa for the weights they share (their constructors draw from the seeded RNG before "
            f"GPT's init): the seed pairs their data order, not their initialization")
