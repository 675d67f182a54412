"""
Synthetic datasets that need attention, generated in-process (no download), written in the same
llm.c shard format and meta.json that data/prepare.py writes, so train.py trains on them like on
any prepared dataset (--dataset synthetic-recall --tokenizer bytes):

    python data/synthetic.py recall                # -> data/synthetic-recall/bytes/
    python data/synthetic.py copy --out-root /tmp/data

Tasks (bytes tokenizer, EOT = byte 0; each document starts with EOT and ends with '\n'):

  recall  EOT K x x ? K x ? K ... '\n'      e.g.  "\0Tqz?Tvw?T?Tm\n"
          K is a random uppercase key; then n items (n uniform in [min_len, max_len]), each
          "?K" with probability q (= 0.5) or one random lowercase letter. After '?' the next
          token is K: one attention hop (from '?' back to the key) predicts it, nothing else
          can. A tiny model learns this in ~100 steps (the quality ladder's sanity rung).
  copy    EOT s_1 ... s_L '=' s_1 ... s_L '\n'   e.g.  "\0qfxbma=qfxbma\n"
          s: L distinct lowercase letters, L uniform in [min_len, max_len]. The second half
          needs an induction head (two composed hops); tiny models take far longer (no copying
          after 2000 steps of the tiny preset), so this is a harder task for longer runs.

Reference losses in meta.json, nats per token over the stream (= E[information per document] /
E[tokens per document], the chain rule over a document's free choices):
  recall  tokens       E[3 + n (1 + q)]
          ideal        ln 26 (K) + H(n) + E[n] (H_b(q) + (1 - q) ln 26)      per document
          no_attention_bound = ideal + E[n] q ln 26 per document (every answer K unknown)
  copy    tokens       E[2L + 3]
          ideal        H(L) + E[sum_{k=1..L} ln(27 - k)]   (letter k out of the 27 - k unused)
          no_attention_bound = ideal + E[sum_k ln(27 - k)] (the copy as uncertain as the original)
"ideal" is a floor no causal model can beat: windows of block_size tokens cut documents,
so the achievable val loss sits above it, and a val loss clearly below it means the model sees
future tokens (a causality leak). "no_attention_bound" is a lower bound for any model that does
not retrieve the earlier tokens: a val loss below it shows that attention does its job.
"""

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # run as a script: make `data.*` importable

import numpy as np

from data.shards import write_shard

TASKS = ("recall", "copy")
DEFAULTS = {"recall": {"min_len": 8, "max_len": 24, "q": 0.5}, "copy": {"min_len": 6, "max_len": 16}}
LOWER = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
UPPER = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
QUERY, SEP, NEWLINE, EOT = ord("?"), ord("="), ord("\n"), 0
LN26 = math.log(26)


def dataset_name(task):
    return f"synthetic-{task}"


def task_of(dataset):
    """'synthetic-recall' -> 'recall'; None for a dataset this module does not make."""
    if dataset.startswith("synthetic-") and dataset[len("synthetic-"):] in TASKS:
        return dataset[len("synthetic-"):]
    return None


def recall_documents(n_docs, min_len, max_len, q, rng):
    """n_docs recall documents as one uint16 token stream."""
    docs = []
    for _ in range(n_docs):
        key = UPPER[rng.integers(26)]
        is_query = rng.random(rng.integers(min_len, max_len + 1)) < q  # (n,) item kinds
        width = 1 + is_query  # an item is "?K" (2 tokens) or one letter
        items = np.empty(int(width.sum()), dtype=np.uint16)
        start = np.cumsum(width) - width
        items[start] = np.where(is_query, QUERY, LOWER[rng.integers(26, size=len(width))])
        items[start[is_query] + 1] = key
        docs.append(np.concatenate([[EOT, key], items, [NEWLINE]]).astype(np.uint16))
    return np.concatenate(docs)


def copy_documents(n_docs, min_len, max_len, rng):
    """n_docs copy documents as one uint16 token stream."""
    docs = []
    for _ in range(n_docs):
        s = LOWER[rng.permutation(26)[:rng.integers(min_len, max_len + 1)]]  # L distinct letters
        docs.append(np.concatenate([[EOT], s, [SEP], s, [NEWLINE]]).astype(np.uint16))
    return np.concatenate(docs)


def reference_losses(task, min_len, max_len, q=None):
    """{'ideal', 'no_attention_bound'} in nats per token (see the module docstring)."""
    lengths = range(min_len, max_len + 1)
    p = 1.0 / len(lengths)
    h_len = math.log(len(lengths))  # the length is uniform: its entropy
    mean_len = sum(p * n for n in lengths)
    if task == "recall":
        h_q = -(q * math.log(q) + (1 - q) * math.log(1 - q)) if 0 < q < 1 else 0.0
        tokens = 3 + mean_len * (1 + q)
        ideal = LN26 + h_len + mean_len * (h_q + (1 - q) * LN26)
        extra = mean_len * q * LN26
    else:
        tokens = 3 + 2 * mean_len
        letters = sum(p * sum(math.log(27 - k) for k in range(1, n + 1)) for n in lengths)
        ideal, extra = h_len + letters, letters
    return {"ideal": ideal / tokens, "no_attention_bound": (ideal + extra) / tokens}


def make_synthetic(task="recall", out_root="data", *, train_tokens=1_000_000, val_tokens=50_000, min_len=None,
                   max_len=None, q=None, seed=0, force=False):
    """Write <out_root>/synthetic-<task>/bytes/{train,val}_000000.bin and meta.json; return the folder.
    An existing folder made with the same parameters is kept as it is (unless force)."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; use one of {', '.join(TASKS)}")
    d = DEFAULTS[task]
    min_len = d["min_len"] if min_len is None else min_len
    max_len = d["max_len"] if max_len is None else max_len
    limit = 26 if task == "copy" else 10_000  # copy: distinct letters
    if not 1 <= min_len <= max_len <= limit:
        raise ValueError(f"{task}: need 1 <= min_len <= max_len <= {limit}, got {min_len}, {max_len}")
    if task == "recall":
        q = d["q"] if q is None else q
        if not 0 < q < 1:
            raise ValueError(f"recall: q={q} must be in (0, 1)")
    elif q is not None:
        raise ValueError("q is a recall option")
    if train_tokens <= 0 or val_tokens <= 0:
        raise ValueError(f"train_tokens={train_tokens} and val_tokens={val_tokens} must be positive")
    params = {"task": task, "train_tokens": train_tokens, "val_tokens": val_tokens, "min_len": min_len,
              "max_len": max_len, "q": q, "seed": seed}
    out = Path(out_root) / dataset_name(task) / "bytes"
    meta_path = out / "meta.json"
    if meta_path.exists() and not force:
        try:
            if json.loads(meta_path.read_text()).get("params") == params:
                return out
        except json.JSONDecodeError:
            pass  # a broken meta.json: rebuild
    t0 = time.time()
    tmp = out.with_name(out.name + ".partial")  # built aside and swapped in, like prepare.py
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mean_len = (min_len + max_len) / 2
    doc_tokens = 3 + mean_len * (1 + q) if task == "recall" else 3 + 2 * mean_len
    tokens, docs, shards = {}, {}, {}
    for split, n_tok, stream in (("train", train_tokens, 1), ("val", val_tokens, 2)):
        rng = np.random.default_rng([seed, stream])  # one generator stream per split
        n_docs = max(1, math.ceil(n_tok / doc_tokens))
        arr = (recall_documents(n_docs, min_len, max_len, q, rng) if task == "recall"
               else copy_documents(n_docs, min_len, max_len, rng))
        write_shard(tmp / f"{split}_000000.bin", arr)
        tokens[split], docs[split], shards[split] = int(arr.size), n_docs, [f"{split}_000000.bin"]
    meta = {
        "name": dataset_name(task), "dataset": dataset_name(task),
        "source": f"data/synthetic.py {task} (generated, seed {seed})", "inputs": {},
        "tokenizer": "bytes", "tokenizer_source": "utf-8 bytes", "vocab_size": 256, "eot": EOT, "dtype": "uint16",
        "tokens": tokens, "documents": docs, "shards": shards, "params": params,
        "reference_loss": reference_losses(task, min_len, max_len, q),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - t0, 2),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", nargs="?", default="recall", choices=TASKS)
    p.add_argument("--out-root", default="data", help="output goes to OUT_ROOT/synthetic-TASK/bytes")
    p.add_argument("--train-tokens", type=int, default=1_000_000)
    p.add_argument("--val-tokens", type=int, default=50_000)
    p.add_argument("--min-len", type=int, default=None, help="items (recall) or letters (copy) per document")
    p.add_argument("--max-len", type=int, default=None)
    p.add_argument("--q", type=float, default=None, help="recall: probability that an item is a query '?K'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the same parameters are there")
    a = p.parse_args(argv)
    try:
        out = make_synthetic(a.task, a.out_root, train_tokens=a.train_tokens, val_tokens=a.val_tokens,
                             min_len=a.min_len, max_len=a.max_len, q=a.q, seed=a.seed, force=a.force)
    except ValueError as e:
        sys.exit(f"error: {e}")
    meta = json.loads((out / "meta.json").read_text())
    ref = meta["reference_loss"]
    print(f"wrote {out}: train {meta['tokens']['train']:,} tokens, val {meta['tokens']['val']:,} tokens; "
          f"reference loss (nats/token): ideal {ref['ideal']:.3f}, no-attention bound {ref['no_attention_bound']:.3f}")


if __name__ == "__main__":
    main()
