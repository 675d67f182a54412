"""Run under torchrun (gloo, CPU): every registered attention variant, FSDP2-sharded as train.py --fsdp shards
it, against the same model unsharded: one forward + backward (aux loss included, with a large --ra-l1 so that
its gradient counts), then the loss and every gradient compared. Prints one line per variant,
`variant NAME loss_diff GRAD_DIFF ok|FAIL`, and exits 1 on any failure (tests/test_fsdp.py runs it)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attention  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from trainer import fsdp  # noqa: E402
from trainer.common import exit_process  # noqa: E402


def check(name):
    mc = GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, attn=name, ra_R=4, ra_l1=0.1)
    torch.manual_seed(0)
    ref = GPT(mc)
    torch.manual_seed(0)
    model = fsdp.shard(GPT(mc), "float32")
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 16), generator=gen)
    y = torch.randint(0, 256, (4, 16), generator=gen)
    losses = []
    for m in (model, ref):
        _, loss = m(x, y, return_logits=False)
        aux = m.aux_loss()
        (loss + aux).backward()
        losses.append((loss + aux).item())
    grad_diff = 0.0
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.full_tensor() if p.grad is not None else torch.zeros_like(q)
        grad_diff = max(grad_diff, (g - (q.grad if q.grad is not None else 0)).abs().max().item())
    with fsdp.gathered(model):  # the logging path: whole gates on every rank
        same_gates = model.gate_values() == ref.gate_values()
    loss_diff = abs(losses[0] - losses[1])
    ok = all(map(lambda v: v == v, losses)) and loss_diff <= 1e-6 and grad_diff <= 1e-6 and same_gates
    return loss_diff, grad_diff, ok


def main():
    dist.init_process_group("gloo")
    failed = False
    for name in attention.names():
        loss_diff, grad_diff, ok = check(name)
        failed |= not ok
        if dist.get_rank() == 0:
            print(f"variant {name} {loss_diff:.3g} {grad_diff:.3g} {'ok' if ok else 'FAIL'}", flush=True)
    # every rank's last collective finished before any rank tears the group down: without it, a loaded
    # machine saw both ranks abort at exit ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()
    exit_process(1 if failed else 0)  # (and past the interpreter's teardown, where a gloo rank can still abort)


if __name__ == "__main__":
    main()
