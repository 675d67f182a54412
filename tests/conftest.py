"""Shared test set-up: the tiny training command line and its generated corpus (pyproject.toml puts the repo root
on sys.path; the float64 RA references are in tests/ra_reference.py)."""

import os
from pathlib import Path

import pytest

from data.prepare import make_test_corpus

# a model small enough that 30 CPU steps take seconds
TINY = ["--preset", "tiny", "--tokenizer", "bytes", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
        "--block-size", "32", "--batch-size", "8", "--warmup-steps", "5", "--lr", "3e-3",
        "--eval-every", "0", "--eval-batches", "2", "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A generated 40-document text corpus as a `files:` dataset. RA_TEST_CORPUS: a folder where this fixture
    ran before, so its data is prepared (GPU machines without `datasets`, which reads the text files)."""
    d = Path(os.environ["RA_TEST_CORPUS"]) if os.environ.get("RA_TEST_CORPUS") else tmp_path_factory.mktemp("corpus")
    glob = make_test_corpus(d / "txt", n_docs=40, seed=0)
    return {"dataset": f"files:{glob}", "data_root": str(d / "data")}
