"""The projections every attention variant shares (GPT-2's): one helper instead of the same lines per file."""

import torch.nn as nn


def add_projections(module, cfg):
    """Give `module` n_head, n_embd and, in this order, c_attn (n_embd -> 3 n_embd, rows [q | k | v],
    n_embd / n_head per head), c_proj (n_embd -> n_embd, marked for GPT-2's scaled residual init) and
    resid_dropout. The names are the state_dict keys, and model.py seeds each weight's init from its
    name, so they (and the order) must not change."""
    module.n_head = cfg.n_head
    module.n_embd = cfg.n_embd
    module.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
    module.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
    module.c_proj.residual_proj = True  # GPT-2 scaled init
    module.resid_dropout = nn.Dropout(cfg.dropout)
