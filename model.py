"""
GPT-2 with a pluggable attention layer.

The architecture is GPT-2's (learned positions, pre-LayerNorm, GELU MLP, tied
embeddings, scaled init of residual projections). The only thing that varies
between experiments is the attention module, chosen by name from the
`attention` registry (`GPTConfig.attn`). Attention options are flat `ra_*`
fields here so that every one of them is also a train.py flag.
"""

import inspect
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    attn: str = "sdpa"  # attention implementation, one of attention.names()
    sdpa_backend: str = "auto"  # auto|flash|cudnn|efficient|math: force one SDPA backend
    # --- reciprocal attention (RA) options; see attention/ra_*.py ---
    ra_R: int = 8  # rank of the reciprocal channel (last R dims of each head)
    ra_fused: bool = True  # fold the reciprocal channel into the QKV weight
    # defaults: every variant starts as close to sdpa's function as its math allows, and the
    # head gates survive a short rung unless the task moves them (docs/fair-starts.md says why;
    # the roadmap's starting values were w_std 0.5, l1 1e-2, threshold 0.1, token penalty 1.0)
    ra_w_std_init: float = 1.0  # initial per-head weight of the standard term (1: sdpa's strength)
    ra_w_rec_init: float = 0.3  # initial reciprocal weight per head: w_rec (same-FLOP, ra_exact_headsel), |b| (ctr)
    ra_b_init: float = 0.0  # initial b of exact RA (ra_exact, ra_ctr): 0 is sdpa, and b still gets a gradient
    ra_l1: float = 1e-5  # L1 weight on mean(w_rec) (head-selective variants)
    ra_threshold: float = 1e-3  # heads with w_rec below this become plain heads
    ra_route_every: int = 0  # 0: route on the device every step; N: refresh the routing every N steps
    ra_token_frac: float = 0.2  # target fraction of tokens that use the reciprocal channel
    ra_token_penalty: float = 0.01  # weight of the token-fraction penalty
    ra_quant: str = "none"  # none|int8: precision of the reciprocal channel (int8: fake-quantized, same-FLOP family)
    ra_swap_norm: str = "layernorm"  # layernorm|none: ra_swap's swapped term, LayerNorm(r) (published) or r itself
    ra_exact_operands: str = "dense"  # dense|cat: how ra_exact builds q' = [q, k] (attention/ra_exact.py)
    ra_exact_streams: int = 2  # ra_exact_headsel: its two head groups' attention on 2 CUDA streams at once, or 1

    @property
    def padded_vocab_size(self):
        return (self.vocab_size + 63) // 64 * 64

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    def validate(self):
        """Raise ValueError with a hint on a config that cannot build a model."""
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.sdpa_backend not in ("auto", "flash", "cudnn", "efficient", "math"):
            raise ValueError(f"sdpa_backend={self.sdpa_backend!r}: use auto, flash, cudnn, efficient or math")
        attention.check_name(self.attn)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_proj = True  # gets the scaled init
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = attention.build(cfg.attn, cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        # one draw from the global RNG seeds every shared weight's init (see _init_weights), so
        # variants with extra parameters start from the same weights as sdpa under the same seed
        init_seed = int(torch.randint(0, 2**62, (1,)).item())
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied embeddings
        for name, module in self.named_modules():
            self._init_weights(module, name, init_seed)
        # attention modules may own parameters with their own init (gates, W); let them re-apply it
        for block in self.transformer.h:
            if hasattr(block.attn, "reset_parameters"):
                block.attn.reset_parameters()

    def _init_weights(self, module, name, init_seed):
        # each weight draws from a generator keyed by its name, not from the shared stream: an
        # attention variant's extra parameters then cannot shift the init of the weights it
        # shares with the baseline (same seed, same c_attn, MLP, embeddings in every variant)
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return
        gen = torch.Generator().manual_seed((init_seed + zlib.crc32(name.encode())) % 2**63)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream
        # does not grow with depth
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual_proj", False) else 0.02
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen, device="cpu") * std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx, targets=None, return_logits=True):
        """idx (B, T) token ids -> (logits (B, T, padded_vocab) or None, loss or None).
        Training passes return_logits=False: a compiled step that also returns the logits (1.6 GB at
        GPT-2 124M, batch 16 x 1024) keeps them alive and writes them out, which costs step time
        (measured in docs/bench.md)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.cfg.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, padded_vocab); the padded columns are never targets
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            if not return_logits:
                logits = None
        return logits, loss

    def aux_loss(self):
        """Sum of the regularizers the attention modules report (a zero tensor when none)."""
        total = torch.zeros((), device=self.lm_head.weight.device)
        for block in self.transformer.h:
            if hasattr(block.attn, "aux_loss"):
                total = total + block.attn.aux_loss()
        return total

    def metrics(self):
        """Per-layer attention metrics, {'attn/l{i}/{name}': value}, plus a mean over layers."""
        out, sums = {}, {}
        for i, block in enumerate(self.transformer.h):
            if hasattr(block.attn, "metrics"):
                for k, v in block.attn.metrics().items():
                    v = float(v)  # one host sync per metric: only call this when logging
                    out[f"attn/l{i}/{k}"] = v
                    sums[k] = sums.get(k, 0.0) + v
        for k, v in sums.items():
            out[f"attn/mean/{k}"] = v / len(self.transformer.h)
        return out

    def gate_values(self):
        """Per-head gate values of every layer, {'l{i}/{gate}': [float per head]} ({} for sdpa): where
        reciprocity survives. One host sync for all of them: only call this when logging."""
        keys, flat = [], []
        for i, block in enumerate(self.transformer.h):
            for k, v in block.attn.gates().items():
                keys.append((f"l{i}/{k}", v.numel()))
                flat.append(v.detach().float().reshape(-1))
        if not flat:
            return {}
        values = torch.cat(flat).tolist()  # the one sync
        out, at = {}, 0
        for k, n in keys:
            out[k] = values[at:at + n]
            at += n
        return out

    def set_step(self, step):
        """Tell attention modules the optimizer step (for routing refreshed every N steps)."""
        for block in self.transformer.h:
            if hasattr(block.attn, "set_step"):
                block.attn.set_step(step)

    def flops_per_token(self, T=None):
        """Training FLOPs per token (forward + backward = 3x forward).

        Weights: 6 * N (each parameter is a multiply-add forward, twice that backward),
        N excluding the position table, which is a lookup. The tied lm_head is counted
        once, as the matmul it is. Attention: causal QK^T and PV forward cost
        2 * 2 * T * C / 2 per token per layer, so 6 * L * T * C for training, times the
        attention module's `attn_flop_mult` (e.g. 1.5 for exact RA via a 2D-wide QK).
        """
        T = T or self.cfg.block_size
        n = self.num_params(non_embedding=True)
        attn = 0.0
        for block in self.transformer.h:
            attn += 6 * T * self.cfg.n_embd * getattr(block.attn, "attn_flop_mult", 1.0)
        return 6 * n + attn

    def configure_optimizer(self, weight_decay, lr, betas, device_type, capturable=False):
        # decay the >=2-D weights (matmuls, embeddings); not biases, LayerNorms or per-head gates.
        # capturable: step() may be recorded in a CUDA graph (cuda_graph.py); lr must then be a tensor
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=lr, betas=betas, capturable=capturable, **({"fused": True} if fused else {}))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx (B, T); the context is cropped to block_size."""
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.cfg.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, : self.cfg.vocab_size] / max(temperature, 1e-6)  # drop the padding
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx
