"""Shared test set-up: the tiny training command line and its generated corpus (pyproject.toml puts the repo root
on sys.path; the float64 RA references are in tests/ra_reference.py)."""

import os
from pathlib import Path

import pytest

from data.prepare import dataset_dir, make_test_corpus

# a model small enough that 30 CPU steps take seconds
TINY = ["--preset", "tiny", "--tokenizer", "bytes", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
        "--block-size", "32", "--batch-size", "8", "--warmup-steps", "5", "--lr", "3e-3",
        "--eval-every", "0", "--eval-batches", "2", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def needs_datasets():
    """For tests that prepare a `files:` corpus: data/prepare.py reads the files with `datasets`, which some GPU
    machines lack; there the test skips instead of failing."""
    pytest.importorskip("datasets", reason="needs the `datasets` package (data/prepare.py reads files: corpora "
                                           "with it): pip install datasets")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, request):
    """A generated 40-document text corpus as a `files:` dataset. RA_TEST_CORPUS: a folder where this fixture
    ran before, so its data is prepared (GPU machines without `datasets`, which reads the text files)."""
    d = Path(os.environ["RA_TEST_CORPUS"]) if os.environ.get("RA_TEST_CORPUS") else tmp_path_factory.mktemp("corpus")
    glob = make_test_corpus(d / "txt", n_docs=40, seed=0)
    name = f"files:{glob}"
    if not (dataset_dir(name, "bytes", d / "data") / "meta.json").exists():  # the training tests read it as bytes
        request.getfixturevalue("needs_datasets")
    return {"dataset": name, "data_root": str(d / "data")}
