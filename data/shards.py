"""
Token shards in llm.c's format: a header of 256 little-endian int32 (magic 20240520, version 1,
token count at index 2; the rest zero) followed by the tokens as little-endian uint16.
The same files load in llm.c (dev/data/*.py write this layout) and here through np.memmap.
"""

import os

import numpy as np

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")  # uint16: vocabularies up to 65536 (GPT-2 has 50257)
REPAIR = "delete the dataset folder and re-run python data/prepare.py for it (its meta.json names the source)"


class ShardError(ValueError):
    """A shard file that is not what data/prepare.py writes (corrupt, truncated or another format)."""


def write_shard(path, tokens):
    """Write tokens (ints in [0, 65536)) to path; readers never see a half-written file."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard({path}): tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"write_shard({path}): token ids must be in [0, 65536) to fit uint16, got "
                         f"[{tokens.min()}, {tokens.max()}]; a vocabulary this large needs another format")
    if tokens.size >= 2**31:
        raise ValueError(f"write_shard({path}): {tokens.size} tokens do not fit the int32 count; write smaller shards")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, tokens.size
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            tokens.astype(TOKEN_DTYPE, copy=False).tofile(f)
        os.replace(tmp, path)  # atomic on POSIX and Windows: the old file or the new one, never a mix
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_header(path):
    """Validate path's header and size; return its token count."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header "
                         f"(truncated or not a shard); {REPAIR}")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic number {header[0]}, expected {MAGIC} (not an llm.c token shard, "
                         f"or corrupted); {REPAIR}")
    if header[1] != VERSION:
        raise ShardError(f"{path}: shard version {header[1]}, expected {VERSION} (version 1 = uint16 tokens); "
                         f"{REPAIR}")
    count = int(header[2])
    expected = HEADER_BYTES + TOKEN_DTYPE.itemsize * count
    if count < 0 or size != expected:
        what = "truncated" if size < expected else "has extra bytes"
        raise ShardError(f"{path}: {size} bytes, but its header says {count} tokens = {expected} bytes "
                         f"({what}; an interrupted copy?); {REPAIR}")
    return count


def read_shard(path):
    """Return the tokens of a shard as a read-only uint16 memmap (nothing is read until used)."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)  # mmap cannot map zero bytes
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))
