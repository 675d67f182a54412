"""train.py end to end on CPU: CLI errors, a short run whose loss falls, exact resume, DDP (gloo), wandb offline."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY  # (and the `corpus` fixture)

ROOT = Path(__file__).resolve().parents[1]


def run_train(args, corpus, tmp_path, env=None, check=True, timeout=300):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--dataset", corpus["dataset"],
           "--data-root", corpus["data_root"], "--out-dir", str(tmp_path / "runs"), *args]
    e = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_help_lists_every_field():
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0
    for flag in ("--attn", "--preset", "--dataset", "--tokenizer", "--max-steps", "--batch-size", "--block-size",
                 "--out-dir", "--seed", "--resume", "--compile", "--wandb", "--ra-R", "--n-layer", "--sdpa-backend"):
        assert flag in p.stdout, flag
    assert "sdpa" in p.stdout  # the attention names are listed


def test_help_describes_every_flag_with_the_presets_values():
    """--help shows the value a flag takes when not given: the preset's where it sets one (tiny without a GPU:
    block size 128, bytes), and every flag has a description, not just its default."""
    from trainer import config

    parser = config.build_parser("tiny", config.load_preset("tiny"))
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and not action.help.startswith("("), action.option_strings
    p = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--help"], cwd=ROOT, capture_output=True,
                       text=True)
    text = " ".join(p.stdout.split())
    assert "context length in tokens (preset tiny: 128)" in text, text
    assert "(preset tiny: bytes)" in text and "(default: 1000)" in text  # --max-steps: not in the preset
    p = subprocess.run([sys.executable, "train.py", "--preset", "gpt2-124m", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert "context length in tokens (preset gpt2-124m: 1024)" in " ".join(p.stdout.split())


def test_memory_check_names_what_does_not_fit():
    """A GPU run whose training state alone (16 bytes per parameter, 4 more for DDP's buckets, sharded under
    --fsdp) exceeds the free memory stops before building the model, saying what it needs and what fits; the
    parameter floor it uses is below every variant's real count."""
    import attention
    from model import GPT, GPTConfig
    from trainer.common import gpt_params_floor, memory_shortfall
    from trainer.config import TrainConfig

    gib = 2 ** 30
    assert memory_shortfall(1e9, 15 * gib, 1, TrainConfig(), "x") is None  # 14.9 GiB
    msg = memory_shortfall(1e9, 10 * gib, 1, TrainConfig(), "gpt2-1b")
    assert "--preset gpt2-1b" in msg and "needs 14.9 GiB per GPU" in msg and "10.0 GiB are free" in msg, msg
    assert "--fsdp on N GPUs it is 14.9 GiB / N" in msg
    assert "needs 18.6 GiB" in memory_shortfall(1e9, 15 * gib, 2, TrainConfig(), "x")  # DDP's buckets
    assert memory_shortfall(1e9, 15 * gib, 2, TrainConfig(ddp_bucket_view=True), "x") is None  # no bucket copy
    assert memory_shortfall(1e9, 8 * gib, 2, TrainConfig(fsdp=True), "x") is None  # 7.5 GiB per GPU
    for name in attention.names():
        mc = GPTConfig(attn=name, n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=300, bias=False)
        with torch.random.fork_rng():
            assert gpt_params_floor(mc) <= sum(p.numel() for p in GPT(mc).parameters()), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory check reads a CUDA GPU's free memory")
def test_a_model_too_big_for_the_gpu_stops_before_any_work(tmp_path):
    synthetic = {"dataset": "synthetic-recall", "data_root": str(tmp_path / "data")}  # no `datasets` needed
    p = run_train(["--device", "cuda", "--n-layer", "64", "--n-head", "128", "--n-embd", "16384", "--max-steps", "1"],
                  synthetic, tmp_path, check=False)
    assert p.returncode != 0 and "does not fit: its training state alone needs" in p.stderr, p.stderr[-2000:]
    assert "| loss" not in p.stdout and "Traceback" not in p.stderr


@pytest.mark.parametrize("args, message", [
    (["--attn", "nope"], "unknown attention 'nope'; valid names"),
    (["--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["--max-steps", "-5"], "--max-steps=-5 must be positive"),
    (["--ddp-bucket-mb", "0"], "--ddp-bucket-mb=0 must be positive"),
    (["--ddp-overlap"], "without --compile DDP already overlaps"),
    (["--batch-size", "abc"], "invalid int value: 'abc'"),
    (["--compile", "maybe"], "expected true/false"),
    (["--preset", "huge"], "unknown preset 'huge'; available:"),
    (["--n-embd", "65"], "must be divisible by n_head"),
    (["--tokenizer", "bpe"], "use gpt2 or bytes"),
    (["--cuda-graph", "--device", "cpu"], "--cuda-graph needs a CUDA GPU"),
    (["--attn", "ra_ctr", "--ra-quant", "int8"], "ra_ctr: ra_quant='int8' is not implemented"),  # the variant's own check
    (["--attn", "ra_headsel", "--ra-route-every", "-1"], "ra_route_every=-1 must be >= 0"),
    (["--resume", "--overwrite"], "give one of them"),
])
def test_bad_cli_input_fails_before_work(args, message, tmp_path):
    p = subprocess.run([sys.executable, "train.py", *args, "--out-dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr, p.stderr
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.slow
def test_short_run_loss_falls_and_logs(corpus, tmp_path):
    run_train(["--max-steps", "30", "--run-name", "falls", "--eval-every", "15"], corpus, tmp_path)
    run = tmp_path / "runs" / "falls"
    log = read_log(run / "log.jsonl")
    train = [r for r in log if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.5, (first, last)
    for key in ("aux_loss", "lr", "ms_per_step", "tokens_per_s"):
        assert key in train[-1]
    assert "mfu" not in train[-1]  # unknown peak on a CPU: omitted, not made up
    assert [r["step"] for r in log if "val_loss" in r] == [15, 30]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["attn"] == "sdpa" and cfg["n_layer"] == 2 and cfg["vocab_size"] == 256
    assert (run / "ckpt.pt").exists() and json.loads((run / "summary.json").read_text())["status"] == "done"
    p = subprocess.run([sys.executable, "sample.py", "--run", str(run), "--prompt", "The ", "--tokens", "20"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = p.stdout.split("-" * 40)[0]  # sample.py ends each sample with a line of dashes
    assert text.startswith("The ") and len(text) > len("The ") + 5, p.stdout


@pytest.mark.slow
def test_resume_continues_exactly(corpus, tmp_path):
    common = ["--lr-decay-steps", "16", "--grad-accum", "2"]
    run_train(["--max-steps", "16", "--run-name", "straight", *common], corpus, tmp_path)
    run_train(["--max-steps", "8", "--run-name", "split", *common], corpus, tmp_path)
    # the resume names only what changes: the saved config supplies --lr-decay-steps and --grad-accum
    run_train(["--max-steps", "16", "--run-name", "split", "--resume"], corpus, tmp_path)
    straight = {r["step"]: r["loss"] for r in read_log(tmp_path / "runs/straight/log.jsonl") if "loss" in r}
    split = {r["step"]: r["loss"] for r in read_log(tmp_path / "runs/split/log.jsonl") if "loss" in r}
    assert sorted(split) == list(range(1, 17))
    for s in range(1, 17):
        assert split[s] == pytest.approx(straight[s], abs=1e-6), s


@pytest.mark.slow
def test_sigterm_checkpoints_then_resume(corpus, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "--dataset", corpus["dataset"], "--data-root",
           corpus["data_root"], "--out-dir", str(tmp_path / "runs"), "--run-name", "sig", "--max-steps", "100000"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"})
    for line in p.stdout:  # wait until training is under way
        if line.startswith("step") and "loss" in line:
            break
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out
    assert "stopped by signal" in out
    ckpt_step = json.loads((tmp_path / "runs/sig/summary.json").read_text())["step"]
    p2 = run_train(["--run-name", "sig", "--resume", "--max-steps", str(ckpt_step + 3)], corpus, tmp_path)
    assert f"resuming sig from step {ckpt_step}" in p2.stdout


@pytest.mark.slow
def test_resume_checks_the_merged_config(corpus, tmp_path):
    """The saved config and the flags given at resume are checked together: a --cuda-graph run resumed
    with --device cpu (TINY's) stops with a message instead of replaying a graph that recorded nothing."""
    run_train(["--max-steps", "2", "--run-name", "merged"], corpus, tmp_path)
    path = tmp_path / "runs" / "merged" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["train_config"]["cuda_graph"] = True  # as if written by a GPU run with --cuda-graph
    torch.save(ckpt, path)
    p = run_train(["--max-steps", "4", "--run-name", "merged", "--resume"], corpus, tmp_path, check=False)
    assert p.returncode != 0
    assert "--resume: --cuda-graph needs a CUDA GPU" in p.stderr, p.stderr


@pytest.mark.slow
def test_nonfinite_loss_stops_with_message(corpus, tmp_path):
    p = run_train(["--max-steps", "30", "--run-name", "nan", "--lr", "1e9", "--min-lr", "1e8", "--warmup-steps",
                   "0", "--grad-clip", "0"], corpus, tmp_path, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "stopping: the loss is" in p.stdout


@pytest.mark.slow
def test_synthetic_recall_dataset(tmp_path):
    """--dataset synthetic-recall is generated on first use (data/prepare.py's ensure_dataset)."""
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, "--dataset", "synthetic-recall",
                        "--data-root", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--run-name", "rec",
                        "--max-steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert [r["step"] for r in read_log(tmp_path / "runs/rec/log.jsonl") if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_torchrun_gloo_two_processes(corpus, tmp_path):
    # prepare first so both ranks find the data
    run_train(["--max-steps", "1", "--run-name", "prep"], corpus, tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), *TINY, "--dataset", corpus["dataset"], "--data-root", corpus["data_root"],
           "--out-dir", str(tmp_path / "runs"), "--run-name", "ddp", "--max-steps", "6", "--eval-every", "3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ddp: parameters identical across 2 ranks" in p.stdout
    log = read_log(tmp_path / "runs/ddp/log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 7))
    assert "world=2" in p.stdout


@pytest.mark.slow
def test_wandb_offline_writes_files(corpus, tmp_path):
    pytest.importorskip("wandb")
    run_train(["--max-steps", "3", "--run-name", "wb", "--wandb", "--wandb-group", "g"], corpus, tmp_path,
              env={"WANDB_MODE": "offline"})
    runs = list((tmp_path / "runs/wb/wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--cuda-graph needs a CUDA GPU")
@pytest.mark.parametrize("attn", ["ra_headsel", "ra_tokensel"])
def test_cuda_graph_replays_the_same_steps(attn, corpus, tmp_path):
    """--cuda-graph records the step once and replays it: the losses match a normally launched run's
    through grad accumulation, the lr schedule and ra_headsel's routing refresh; a graph run that is
    stopped and resumed (a new capture) matches one that was not."""
    common = ["--device", "cuda", "--attn", attn, "--compile", "--grad-accum", "2", "--ra-route-every", "3",
              "--lr-decay-steps", "12"]
    run_train(["--max-steps", "12", "--run-name", "launched", *common], corpus, tmp_path)
    run_train(["--max-steps", "12", "--run-name", "graph", "--cuda-graph", *common], corpus, tmp_path)
    losses = {name: {r["step"]: r["loss"] for r in read_log(tmp_path / f"runs/{name}/log.jsonl") if "loss" in r}
              for name in ("launched", "graph")}
    assert sorted(losses["graph"]) == list(range(1, 13))
    assert losses["graph"][12] < losses["graph"][1]
    for s in range(1, 13):  # steps 1-3 are the warm-up, 4-12 graph replays
        assert losses["graph"][s] == pytest.approx(losses["launched"][s], rel=1e-3, abs=1e-4), s
    if attn == "ra_headsel":
        run_train(["--max-steps", "7", "--run-name", "split", "--cuda-graph", *common], corpus, tmp_path)
        p = run_train(["--max-steps", "12", "--run-name", "split", "--resume", "--device", "cuda"], corpus, tmp_path)
        split = {r["step"]: r["loss"] for r in read_log(tmp_path / "runs/split/log.jsonl") if "loss" in r}
        for s in range(1, 13):
            assert split[s] == pytest.approx(losses["graph"][s], rel=1e-3, abs=1e-4), (s, p.stdout[-3000:])
