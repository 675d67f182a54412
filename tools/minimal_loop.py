"""
Is issue 2's 470k tokens/s reachable on this GPU? A minimal nanoGPT-style GPT-2 124M training loop
(no framework: fused QKV, SDPA, tied embeddings, fused AdamW, bf16 autocast, torch.compile) against
ours (model.GPT with attn=sdpa), batch 16 x 1024 random tokens, in one process.

    python tools/minimal_loop.py      # a CUDA GPU; ~2 min (three compiles)

Prints one markdown row per loop: median ms/step of 30 steps (CUDA events, after 5 warm-up
steps), tokens/s = 16 * 1024 / (s per step), and the first step's time (compilation).
"""
import statistics, sys, time
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for model.py
if not torch.cuda.is_available():
    sys.exit("tools/minimal_loop.py times GPT-2 124M training steps on a CUDA GPU; none is visible here")
torch.backends.cuda.matmul.allow_tf32 = True

class Block(nn.Module):
    def __init__(self, C=768, H=12):
        super().__init__()
        self.H = H
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, 2)
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

class Mini(nn.Module):
    def __init__(self, V=50304, C=768, L=12, T=1024):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.h = nn.ModuleList([Block() for _ in range(L)])
        self.lnf = nn.LayerNorm(C)
        self.head = nn.Linear(C, V, bias=False)
        self.wte.weight = self.head.weight
    def forward(self, idx, tgt):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for b in self.h:
            x = b(x)
        logits = self.head(self.lnf(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), tgt.view(-1))

def run(label, model, clip, loss_of):
    torch._dynamo.reset()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, fused=True)
    cm = torch.compile(model)
    data = [torch.randint(0, 50257, (2, 16, 1024), device="cuda") for _ in range(4)]
    def step(i):
        x, y = data[i % 4]
        with torch.autocast("cuda", torch.bfloat16):
            loss = loss_of(cm, x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    t0 = time.time(); step(0); torch.cuda.synchronize(); first = time.time() - t0
    for i in range(5): step(i)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(30)]
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(ev):
        a.record(); step(i); b.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in ev)
    print(f"| {label} | {ms:.2f} | {16*1024/ms*1e3:,.0f} | {first:.0f} s |", flush=True)

from model import GPT, GPTConfig
print("| loop | ms/step | tokens/s | compile |\n|---|---|---|---|")
run("minimal nanoGPT-style, no clip", Mini().cuda(), False, lambda m, x, y: m(x, y))
run("minimal nanoGPT-style, clip 1.0", Mini().cuda(), True, lambda m, x, y: m(x, y))
run("ours (model.GPT sdpa), clip 1.0", GPT(GPTConfig()).cuda(), True, lambda m, x, y: m(x, y, return_logits=False)[1])
