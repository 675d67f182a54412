"""
Tokenizers: `gpt2` (tiktoken's GPT-2 BPE) and `bytes` (raw UTF-8 bytes).

get_tokenizer(name) returns an object with encode(str) -> list[int], decode(list[int]) -> str,
encode_batch(list[str]), eot, vocab_size and name. encode() treats "<|endoftext|>" inside a text
as ordinary text: only data/prepare.py inserts EOT tokens, between documents.

GPT-2 without tiktoken's download host: tiktoken fetches vocab.bpe/encoder.json from
openaipublic.blob.core.windows.net (or reads them from TIKTOKEN_CACHE_DIR). Where neither works we
take the same BPE ranks from the openai-whisper sdist on PyPI (whisper/assets/gpt2.tiktoken is
byte-identical to tiktoken's r50k_base.tiktoken), check its sha256 and build the encoding ourselves.

This file also holds the small download helpers that prepare.py shares (cache folder, pip download,
sha256 checks, a fast reachability probe).
"""

import base64
import hashlib
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

EOT_TEXT = "<|endoftext|>"

# ---------------------------------------------------------------------------- download helpers


def cache_dir():
    """~/.cache/ra-gpt (or $XDG_CACHE_HOME/ra-gpt): downloads kept across prepares."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ra-gpt"


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(data, expected, what):
    """Raise ValueError unless sha256(data) == expected; `what` names the data in the message."""
    got = sha256_bytes(data)
    if got != expected:
        raise ValueError(f"sha256 mismatch for {what}: got {got}, expected {expected}. The file is corrupt or "
                         f"not the pinned release; delete it (cache: {cache_dir()}) and run again")


def reachable(url, timeout=5.0):
    """True if url answers with a success status within timeout seconds. Libraries that retry for
    minutes (huggingface_hub) or never time out (tiktoken) are only called after this says yes.
    An error status counts as unreachable: intercepting proxies answer 4xx for hosts they block.
    urllib honours HTTPS_PROXY like those libraries do."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()  # GET (not every server allows HEAD); body unread
        return True
    except (OSError, ValueError):  # HTTPError, URLError, timeouts and refused connections are OSErrors
        return False


def pip_download(spec, filename, sha256=None):
    """Fetch the sdist `filename` of requirement `spec` from PyPI with pip into the cache; return its path.
    A cached copy (with the right sha256) is used without touching the network."""
    dest = cache_dir() / "pypi"
    path = dest / filename
    if path.exists() and (sha256 is None or sha256_file(path) == sha256):
        return path
    dest.mkdir(parents=True, exist_ok=True)
    print(f"downloading {spec} from PyPI (pip download --no-deps) into {dest}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--timeout", "20", "--retries", "2", spec, "-d", str(dest)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not path.exists():
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"could not download {spec} from PyPI ({' '.join(cmd)} exited with {p.returncode}, "
                           f"expected {path}):\n{tail}\nCheck that pip can reach PyPI (proxy, index-url), or "
                           f"place {filename} in {dest} by hand")
    if sha256 is not None:
        check_sha256(path.read_bytes(), sha256, f"{path} (from {spec})")
    return path


# ---------------------------------------------------------------------------- tokenizers


class BytesTokenizer:
    """UTF-8 bytes, vocabulary 256. Byte 0 (NUL) doubles as the EOT token: text practically never holds
    NUL, and 256 keeps the embedding at a multiple of 64. A NUL inside a document reads back as EOT."""

    name = "bytes"
    vocab_size = 256
    eot = 0
    source = "utf-8 bytes"

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_batch(self, texts):
        import numpy as np

        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, tokens):
        # EOT shows as "<|endoftext|>" like tiktoken does; invalid UTF-8 (a sample cut mid-character) as U+FFFD
        # int() first: bytes(ndarray) would copy the array's raw buffer, not its values
        data = bytes([int(t) for t in tokens])
        return EOT_TEXT.join(b.decode("utf-8", errors="replace") for b in data.split(b"\0"))


class GPT2Tokenizer:
    """GPT-2 BPE through tiktoken; vocabulary 50257, EOT = 50256 (<|endoftext|>)."""

    name = "gpt2"

    def __init__(self):
        self.enc, self.source = gpt2_encoding()
        self.vocab_size = self.enc.n_vocab
        self.eot = self.enc.eot_token

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts):
        # tiktoken's Rust core releases the GIL, so its thread pool uses every core
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, tokens):
        return self.enc.decode([int(t) for t in tokens], errors="replace")


_TOKENIZERS = {"gpt2": GPT2Tokenizer, "bytes": BytesTokenizer}
_loaded = {}


def get_tokenizer(name):
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; use one of {sorted(_TOKENIZERS)}")
    if name not in _loaded:
        _loaded[name] = _TOKENIZERS[name]()
    return _loaded[name]


# ---------------------------------------------------------------------------- GPT-2 ranks

TIKTOKEN_HOST = "https://openaipublic.blob.core.windows.net"
TIKTOKEN_GPT2_FILES = (f"{TIKTOKEN_HOST}/gpt-2/encodings/main/vocab.bpe",
                       f"{TIKTOKEN_HOST}/gpt-2/encodings/main/encoder.json")
WHISPER_SPEC = "openai-whisper==20250625"
WHISPER_SDIST = "openai_whisper-20250625.tar.gz"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _tiktoken_cached():
    """True if tiktoken's cache already holds GPT-2's files (tiktoken's own cache-folder rules)."""
    d = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if d is None:
        import tempfile

        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return bool(d) and all(os.path.exists(os.path.join(d, hashlib.sha1(u.encode()).hexdigest()))
                           for u in TIKTOKEN_GPT2_FILES)


def gpt2_encoding():
    """(tiktoken.Encoding for GPT-2, where it came from)."""
    import tiktoken

    # tiktoken downloads with requests and no timeout: a firewall that drops packets would hang it.
    # So it only gets to try when its cache has the files or its host answers quickly.
    if _tiktoken_cached() or reachable(TIKTOKEN_GPT2_FILES[0], timeout=5):
        try:
            return tiktoken.get_encoding("gpt2"), "tiktoken"
        except Exception as e:  # noqa: BLE001 - any failure here means: use the fallback
            why = f"tiktoken.get_encoding('gpt2') failed: {type(e).__name__}: {str(e)[:200]}"
    else:
        why = f"{TIKTOKEN_HOST} is unreachable and TIKTOKEN_CACHE_DIR has no GPT-2 files"
    enc = gpt2_from_ranks(whisper_gpt2_ranks())
    print(f"tokenizer: {why}; using the GPT-2 ranks from PyPI's {WHISPER_SPEC} ({WHISPER_MEMBER}, sha256 verified)")
    return enc, f"{WHISPER_SPEC}:{WHISPER_MEMBER}"


def ranks_from_sdist(sdist):
    """Extract and verify gpt2.tiktoken from the openai-whisper sdist at path `sdist`; return its bytes."""
    with tarfile.open(sdist, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("/" + WHISPER_MEMBER)]
        if not members:
            raise ValueError(f"{sdist} has no {WHISPER_MEMBER}; is it the {WHISPER_SPEC} sdist? Delete it and retry")
        data = tar.extractfile(members[0]).read()
    check_sha256(data, GPT2_TIKTOKEN_SHA256, f"{WHISPER_MEMBER} in {sdist}")
    return data


def whisper_gpt2_ranks():
    """The verified bytes of gpt2.tiktoken, extracted once into the cache."""
    path = cache_dir() / "gpt2.tiktoken"
    if path.exists():
        data = path.read_bytes()
        if sha256_bytes(data) == GPT2_TIKTOKEN_SHA256:
            return data
    data = ranks_from_sdist(pip_download(WHISPER_SPEC, WHISPER_SDIST))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def gpt2_from_ranks(data):
    """tiktoken.Encoding equal to tiktoken's gpt2, from the bytes of a .tiktoken ranks file."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str  # gpt2 and r50k_base share ranks and pattern

    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: 50256}, explicit_n_vocab=50257)
