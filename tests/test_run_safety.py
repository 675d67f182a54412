"""train.py's run-folder safety on CPU: an old run is never written over, one process per run folder (a lock),
both data splits checked before the first step, and a resume that continues the log, the training time and
the time budget exactly (after SIGTERM and after kill -9), with clear errors for bad checkpoints and flags."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest
import train
from data.prepare import dataset_dir
from data.shards import write_shard
from trainer import config, runs

ROOT = Path(__file__).resolve().parents[1]

TINY = [*conftest.TINY, "--lr-decay-steps", "60"]  # (and the `corpus` fixture)


def argv(corpus, tmp_path, *args):
    return [*TINY, "--dataset", corpus["dataset"], "--data-root", corpus["data_root"],
            "--out-dir", str(tmp_path / "runs"), *args]


def run_train(args, corpus, tmp_path, check=True):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv(corpus, tmp_path, *args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def losses(path):
    return [(r["step"], r["loss"]) for r in read_log(path) if "loss" in r]


# ----------------------------------------------------------------------------- an old run is never written over

@pytest.mark.slow
def test_existing_run_refuses_then_overwrite_moves_it_aside(corpus, tmp_path):
    run_train(["--max-steps", "2", "--run-name", "r"], corpus, tmp_path)
    run = tmp_path / "runs" / "r"
    before = {f: (run / f).read_bytes() for f in ("config.json", "log.jsonl", "ckpt.pt")}
    p = run_train(["--max-steps", "3", "--run-name", "r", "--seed", "5"], corpus, tmp_path, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "already holds a run" in p.stderr and "--resume" in p.stderr and "--overwrite" in p.stderr
    assert "--run-name" in p.stderr and "Traceback" not in p.stderr
    assert {f: (run / f).read_bytes() for f in before} == before  # untouched
    run_train(["--max-steps", "3", "--run-name", "r", "--seed", "5", "--overwrite"], corpus, tmp_path)
    assert {f: (tmp_path / "runs" / "r.old-1" / f).read_bytes() for f in before} == before  # moved, not deleted
    assert [s for s, _ in losses(run / "log.jsonl")] == [1, 2, 3]
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    assert not (run / "train.lock").exists()


# ----------------------------------------------------------------------------- one process per run folder

def test_live_lock_fails_at_once_naming_the_holder(corpus, tmp_path):
    lock = runs.RunLock(tmp_path / "runs" / "busy")  # held by this (live) test process
    try:
        t0 = time.time()
        p = run_train(["--max-steps", "2", "--run-name", "busy"], corpus, tmp_path, check=False)
        assert p.returncode == 1 and "is in use by another run" in p.stderr, p.stderr
        assert f"pid {os.getpid()}" in p.stderr
        assert time.time() - t0 < 60 and "step" not in p.stdout  # at once, before any training
        assert not (tmp_path / "runs" / "busy" / "config.json").exists()
    finally:
        lock.release()
    assert not (tmp_path / "runs" / "busy").exists()  # the lock's empty folder goes with it


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(corpus, tmp_path):
    run = tmp_path / "runs" / "stale"
    run.mkdir(parents=True)
    (run / "train.lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    p = run_train(["--max-steps", "2", "--run-name", "stale"], corpus, tmp_path)
    assert "took over the lock of a run that is no longer running" in p.stdout and "999999" in p.stdout
    assert not (run / "train.lock").exists()


def test_main_releases_the_lock_on_return_and_on_error(corpus, tmp_path, capsys):
    """The quality ladder calls train.main several times in one process."""
    assert train.main(argv(corpus, tmp_path, "--max-steps", "1", "--run-name", "a")) == 0
    with pytest.raises(train.RunError, match="already holds a run"):
        train.main(argv(corpus, tmp_path, "--max-steps", "1", "--run-name", "a"))
    assert not (tmp_path / "runs" / "a" / "train.lock").exists()
    assert train.main(argv(corpus, tmp_path, "--max-steps", "2", "--run-name", "a", "--resume")) == 0
    assert [s for s, _ in losses(tmp_path / "runs/a/log.jsonl")] == [1, 2]


def test_checkpoint_temp_file_is_unique_per_process(tmp_path, monkeypatch):
    written = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: (written.append(Path(path)), real_save(obj, path)))
    runs.save_checkpoint(tmp_path / "ckpt.pt", {"x": 1})
    assert written == [tmp_path / f"ckpt.pt.tmp{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


# ----------------------------------------------------------------------------- data checked before the first step

def handmade_dataset(tmp_path, val_bytes):
    """A prepared-looking dataset whose val split is given as raw bytes (train is fine)."""
    name = f"files:{tmp_path}/handmade/*.txt"
    d = dataset_dir(name, "bytes", str(tmp_path / "data"))
    d.mkdir(parents=True)
    write_shard(d / "train_000000.bin", np.arange(2000) % 256)
    (d / "val_000000.bin").write_bytes(val_bytes)
    (d / "meta.json").write_text(json.dumps({"vocab_size": 256, "tokenizer": "bytes", "source": name}))
    return name


def shard_bytes(tmp_path, n):
    write_shard(tmp_path / "v.bin", np.arange(n) % 256)
    return (tmp_path / "v.bin").read_bytes()


@pytest.mark.parametrize("case, message", [
    ("empty", "the val split has 0 tokens"),
    ("short", "the val split has 20 tokens"),  # block size 32: one window needs 33
    ("truncated", "truncated"),
])
def test_bad_val_split_stops_before_the_first_step(case, message, tmp_path):
    val = {"empty": shard_bytes(tmp_path, 0), "short": shard_bytes(tmp_path, 20),
           "truncated": shard_bytes(tmp_path, 500)[:-100]}[case]
    name = handmade_dataset(tmp_path, val)
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--dataset", name, "--data-root",
                        str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--run-name", "v",
                        "--max-steps", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 1, p.stdout + p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "val" in p.stderr and ("prepare" in p.stderr or "--block-size" in p.stderr)  # what to do
    assert "step" not in p.stdout
    assert not (tmp_path / "runs" / "v").exists()


# ----------------------------------------------------------------------------- resume

@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_stop_and_resume_logs_what_an_uninterrupted_run_logs(how, corpus, tmp_path):
    """Checkpoints every 4 steps, a log line every 3: the line after the stop spans it, and must average the
    same steps as an uninterrupted run's. kill -9 leaves lines after the checkpoint: they move aside."""
    common = ["--log-every", "3", "--ckpt-every", "4", "--eval-every", "6"]
    cmd = [sys.executable, str(ROOT / "train.py"), *argv(corpus, tmp_path, "--run-name", "cut", "--max-steps",
                                                         "100000", *common)]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    for line in p.stdout:  # past a checkpoint, and a log line after it
        if line.startswith("step") and "loss" in line and int(line.split()[1]) >= 9:
            break
    p.send_signal(getattr(signal, how))
    out = p.communicate(timeout=120)[0]
    run = tmp_path / "runs" / "cut"
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    s = ckpt["step"]
    if how == "SIGTERM":
        assert p.returncode == 0 and "stopped by signal" in out, out
        assert all(step % 3 == 0 for step, _ in losses(run / "log.jsonl"))  # no off-grid line at the stop
    else:
        assert s % 4 == 0 and max(step for step, _ in losses(run / "log.jsonl")) > s  # lines after the checkpoint
    end = s + 7
    p2 = run_train(["--run-name", "cut", "--resume", "--max-steps", str(end), *common], corpus, tmp_path)
    if how == "SIGKILL":
        assert "log.discarded.jsonl" in p2.stdout
        assert all(r["step"] > s for r in read_log(run / "log.discarded.jsonl"))
    run_train(["--run-name", "straight", "--max-steps", str(end), *common], corpus, tmp_path)
    assert losses(run / "log.jsonl") == losses(tmp_path / "runs/straight/log.jsonl")  # bit-identical
    vals = lambda path: [(r["step"], r["val_loss"]) for r in read_log(path) if "val_loss" in r]
    assert vals(run / "log.jsonl") == vals(tmp_path / "runs/straight/log.jsonl")
    # the training time continues from the checkpoint's
    times = [r["train_time_s"] for r in read_log(run / "log.jsonl") if "loss" in r]
    assert times == sorted(times) and ckpt["train_time_s"] > 0
    assert [r for r in read_log(run / "log.jsonl") if r["step"] > s][0]["train_time_s"] > ckpt["train_time_s"]


@pytest.mark.slow
def test_time_budget_counts_the_time_before_the_resume(corpus, tmp_path):
    run_train(["--max-steps", "6", "--run-name", "budget"], corpus, tmp_path)
    spent = torch.load(tmp_path / "runs/budget/ckpt.pt", weights_only=False)["train_time_s"]
    assert spent > 0
    # a budget already used up by the first part: the resumed run stops after one step
    p = run_train(["--run-name", "budget", "--resume", "--max-steps", "50", "--max-time-min", str(spent / 60 / 2)],
                  corpus, tmp_path)
    assert "time budget reached" in p.stdout
    assert json.loads((tmp_path / "runs/budget/summary.json").read_text())["step"] == 7


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint"])
def test_unreadable_checkpoint_names_the_file_and_what_to_do(damage, corpus, tmp_path):
    run_train(["--max-steps", "2", "--run-name", "bad"], corpus, tmp_path)
    path = tmp_path / "runs" / "bad" / "ckpt.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    p = run_train(["--run-name", "bad", "--resume", "--max-steps", "4"], corpus, tmp_path, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert str(path) in p.stderr and "--overwrite" in p.stderr


@pytest.mark.slow
def test_resume_rejects_flags_that_cannot_change(corpus, tmp_path):
    run_train(["--max-steps", "2", "--run-name", "fixed"], corpus, tmp_path)
    p = run_train(["--run-name", "fixed", "--resume", "--max-steps", "4", "--n-layer", "3", "--seed", "9"], corpus,
                  tmp_path, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "--seed is 1337 (given: 9)" in p.stderr and "--n-layer is 2 (given: 3)" in p.stderr, p.stderr
    # the same values again (the quality ladder re-sends its whole command line) are fine
    run_train(["--run-name", "fixed", "--resume", "--max-steps", "4", "--n-layer", "2", "--seed", "1337"], corpus,
              tmp_path)


# ----------------------------------------------------------------------------- attention options

def test_unused_attention_option_is_a_warning():
    _, _, notes, _ = config.parse_args(["--attn", "ra_exact", "--ra-quant", "int8", "--ra-R", "8", "--ra-l1", "0.5"])
    warned = [n for n in notes if n.startswith("warning:")]
    assert len(warned) == 2, notes  # --ra-R 8 is the default: nothing to warn about
    assert any("--ra-quant int8 has no effect: --attn ra_exact does not use it" in n for n in warned)
    assert any("--ra-l1 0.5" in n for n in warned)
    _, _, notes, _ = config.parse_args(["--attn", "ra_headsel", "--ra-l1", "0.5"])
    assert not [n for n in notes if n.startswith("warning:")]


def test_attention_options_checked_on_the_meta_device(monkeypatch):
    """A variant's constructor checks its options; train.py builds one module on the meta device to ask it,
    so a bad option stops the run before anything is written. A variant without `options` gets no warnings."""
    import attention

    seen = []

    class Picky(torch.nn.Module):
        def __init__(self, cfg):
            super().__init__()
            seen.append(torch.empty(1).device.type)
            if cfg.ra_R > 4:
                raise ValueError(f"picky: ra_R={cfg.ra_R} must be <= 4")

    monkeypatch.setitem(attention.REGISTRY, "picky", "sdpa:Picky")
    attention.get_class("sdpa")  # imports attention.sdpa, where the registry entry points
    monkeypatch.setattr(sys.modules["attention.sdpa"], "Picky", Picky, raising=False)
    with pytest.raises(SystemExit):
        config.parse_args(["--attn", "picky", "--ra-R", "8"])
    _, _, notes, _ = config.parse_args(["--attn", "picky", "--ra-R", "2", "--ra-quant", "int8"])
    assert seen == ["meta", "meta"] and not [n for n in notes if n.startswith("warning:")]


# ----------------------------------------------------------------------------- what a run says about its gates

def test_gates_logged_per_head_and_heads_off_said(corpus, tmp_path, capsys):
    """Every training log line carries each layer's per-head gates; a head-selective run whose RA heads have
    all switched off says so once (a threshold above w_rec's start switches every head off at once)."""
    assert train.main(argv(corpus, tmp_path, "--attn", "ra_headsel", "--ra-threshold", "1.0", "--max-steps", "3",
                           "--run-name", "off")) == 0
    out = capsys.readouterr().out
    assert out.count("every RA head has switched off by step 1") == 1, out
    recs = [r for r in read_log(tmp_path / "runs/off/log.jsonl") if "loss" in r]
    n_layer, n_head = 2, 2  # TINY
    for r in recs:
        assert sorted(r["gates"]) == sorted(f"l{i}/{g}" for i in range(n_layer) for g in ("w_std", "w_rec", "ra_on"))
        assert all(len(v) == n_head for v in r["gates"].values())
        assert all(v == [0.0] * n_head for k, v in r["gates"].items() if k.endswith("ra_on"))
    assert train.main(argv(corpus, tmp_path, "--attn", "sdpa", "--max-steps", "2", "--run-name", "plain")) == 0
    assert "switched off" not in capsys.readouterr().out
    assert all("gates" not in r for r in read_log(tmp_path / "runs/plain/log.jsonl"))
