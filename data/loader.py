"""
Batches of token windows from the shards that data/prepare.py writes.

Train: random windows of block_size+1 tokens (x = window[:-1], y = window[1:]). The run draws one global
stream of micro-batches: micro-batch g is drawn from a torch.Generator seeded with (seed, 0, g), whatever
the world size. An optimizer step reads world_size * accum of them; rank r takes micro-batches
r*accum .. r*accum + accum - 1 of each step's block (docs/ddp.md). So rank r of N with accumulation A reads
what one process with accumulation N*A reads, and the global batch of a step does not depend on N. The
loader's whole state is the global micro-batch counter (at an optimizer-step boundary): a resume from
state_dict() draws exactly the batches an uninterrupted run would, at any world size whose N*A is the same.

Val: a fixed set of windows that does not depend on seed or rank: consecutive windows at stride
block_size whose targets tile the split, thinned evenly over the whole split when max_batches asks
for fewer. global_batches=True (train.py's eval): max_batches counts batches of B over all ranks, so the
windows are the same at any world size, and rank r evaluates the single process's batches r, r+N, ...
global_batches=False (the older count): max_batches * B windows per rank, every world_size-th window each.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from data.shards import read_shard


def load_meta(data_dir):
    """meta.json of a prepared dataset, with a hint to prepare it when it is missing."""
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        d = Path(data_dir)
        raise FileNotFoundError(f"{path} not found: {d} has not been prepared (or its preparation did not finish). "
                                f"Run: python data/prepare.py {d.parent.name} --tokenizer {d.name} "
                                f"(for a files-... folder pass the same files:GLOB, or --name {d.parent.name})")
    return json.loads(path.read_text())


def _seed(*ints):
    # a stable 63-bit mix; seed*K + rank would collide between (seed, rank) pairs
    return int.from_bytes(hashlib.sha256(repr(ints).encode()).digest()[:8], "little") >> 1


class TokenLoader:
    """Batches from data_dir's `split` shards (train_*.bin or val_*.bin). rank/world_size: this
    process's place in DDP; accum: its micro-batches per optimizer step (--grad-accum). pin_memory: return
    page-locked tensors for non_blocking copies (CUDA only)."""

    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, seed=0, pin_memory=False,
                 accum=1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size <= 0 or block_size <= 0 or accum <= 0:
            raise ValueError(f"batch_size={batch_size}, block_size={block_size} and accum={accum} must be positive")
        self.data_dir, self.split = Path(data_dir), split
        self.B, self.T = batch_size, block_size
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)  # ints: _seed hashes repr
        self.accum = int(accum)
        self.pin_memory = pin_memory and torch.cuda.is_available()  # pinning needs a CUDA build and device
        self.meta = load_meta(self.data_dir)
        paths = sorted(self.data_dir.glob(f"{split}_*.bin"))
        if not paths:
            raise FileNotFoundError(f"{self.data_dir} has no {split}_*.bin shards (splits are train and val); "
                                    f"re-run python data/prepare.py for it")
        self.shards = [read_shard(p) for p in paths]  # memmaps: only the windows drawn are read
        lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.num_tokens = int(lengths.sum())
        # windows never cross a shard boundary: shard i has len-T start positions
        self._starts = np.maximum(lengths - block_size, 0)
        self._cum = np.cumsum(self._starts)
        if self._cum[-1] == 0:
            raise ValueError(f"{self.data_dir}: the {split} split has {self.num_tokens:,} tokens"
                             + (f" in shards of at most {lengths.max():,}" if len(paths) > 1 else "")
                             + f", but one window needs block_size+1 = {block_size + 1} tokens (within a shard). "
                             f"Use a smaller --block-size, or prepare more data (a larger corpus, or a larger "
                             f"--val-frac for val)")
        self.step = 0  # this rank's draws so far
        self.generator = torch.Generator()

    # ---------------------------------------------------------------- train
    def global_index(self, j):
        """The global micro-batch that this rank's j-th draw reads: step j // accum's block of world_size * accum
        micro-batches, of which this rank takes its own accum consecutive ones (one process: j itself)."""
        step, micro = divmod(j, self.accum)
        return (step * self.world_size + self.rank) * self.accum + micro

    def next_batch(self):
        """(x, y) int64 tensors of shape (B, T) from random windows; y is x shifted left by one."""
        # the 0 was the rank before the stream became global; kept so a 1-process run draws what it always drew
        self.generator.manual_seed(_seed(self.seed, 0, self.global_index(self.step)))
        self.step += 1
        idx = torch.randint(0, int(self._cum[-1]), (self.B,), generator=self.generator).numpy()
        shard = np.searchsorted(self._cum, idx, side="right")
        offset = idx - (self._cum[shard] - self._starts[shard])
        return self._gather(shard, offset)

    def state_dict(self):
        """{"step": global micro-batches read by all ranks, "seed"}: the same on every rank between optimizer
        steps, and the same for any world size and accum with the same world_size * accum."""
        step, micro = divmod(self.step, self.accum)
        if micro and self.world_size > 1:
            raise ValueError(f"rank {self.rank} is {micro} micro-batches into an optimizer step; the global "
                             f"state exists only between steps")
        return {"step": step * self.world_size * self.accum + micro, "seed": self.seed}

    def load_state_dict(self, state):
        # the saved seed wins: a resume continues the stream the checkpoint was drawn from
        per_step = self.world_size * self.accum
        step, micro = divmod(int(state["step"]), per_step)
        if micro and self.world_size > 1:
            raise ValueError(f"the loader state is {state['step']} global micro-batches, not a whole number of "
                             f"optimizer steps of world_size * accum = {per_step}; it cannot be split across "
                             f"{self.world_size} ranks")
        self.step, self.seed = step * self.accum + micro, int(state["seed"])

    # ---------------------------------------------------------------- val
    def val_windows(self, max_batches=None, global_batches=False):
        """(shard, offset) arrays of this rank's fixed eval windows. global_batches: the set is at most
        max_batches * B windows whatever the world size, and this rank gets whole batches of B of it (those
        a single process evaluates as batch rank, rank + world_size, ...; a rank may get none). Otherwise
        at most max_batches * B per rank, every world_size-th window, all ranks the same count."""
        per_shard = [max((len(s) - 1) // self.T, 0) for s in self.shards]
        shard = np.repeat(np.arange(len(self.shards)), per_shard)
        offset = np.concatenate([np.arange(n, dtype=np.int64) * self.T for n in per_shard])
        n = len(shard)
        cap = None if max_batches is None else max_batches * self.B * (1 if global_batches else self.world_size)
        if cap is not None and n > cap:
            keep = np.linspace(0, n - 1, cap).round().astype(np.int64)
            shard, offset, n = shard[keep], offset[keep], len(keep)
        if global_batches:
            batch = np.arange(n) // self.B
            mine = batch % self.world_size == self.rank
            return shard[mine], offset[mine]
        n -= n % self.world_size  # equal counts, so no rank waits in a collective for another
        if n == 0:
            raise ValueError(f"{self.data_dir}: the {self.split} split has {len(shard)} windows of block_size+1 = "
                             f"{self.T + 1} tokens, fewer than world_size = {self.world_size}; use a smaller "
                             f"--block-size or prepare more data")
        return shard[:n][self.rank::self.world_size], offset[:n][self.rank::self.world_size]

    def val_batches(self, max_batches=None, global_batches=False):
        """Yield (x, y) over the fixed eval windows (val_windows), B at a time (the last batch may be smaller)."""
        shard, offset = self.val_windows(max_batches, global_batches)
        for i in range(0, len(shard), self.B):
            yield self._gather(shard[i:i + self.B], offset[i:i + self.B])

    # ----------------------------------------------------------------
    def _gather(self, shard, offset):
        b, T = len(shard), self.T
        x = torch.empty((b, T), dtype=torch.int64, pin_memory=self.pin_memory)
        y = torch.empty((b, T), dtype=torch.int64, pin_memory=self.pin_memory)
        xn, yn = x.numpy(), y.numpy()
        for i, (s, o) in enumerate(zip(shard, offset)):
            w = self.shards[s][o:o + T + 1]  # one contiguous read from the memmap
            xn[i] = w[:-1]
            yn[i] = w[1:]
        return x, y
