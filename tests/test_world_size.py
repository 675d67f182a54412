"""World-size-invariant batches (docs/ddp.md): rank r of N with --grad-accum A reads the micro-batches that one
process with --grad-accum N*A reads, so the two log the same losses and val losses, and a checkpoint resumes on
another world size. The DDP runs use gloo on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import TINY  # noqa: E402  (and the `corpus` fixture)
from data.loader import TokenLoader  # noqa: E402
from data.prepare import ensure_dataset  # noqa: E402
from trainer.runs import global_loader_state  # noqa: E402

# 20 steps on one lr schedule whatever --max-steps says, so a run stopped early continues the same schedule;
# 3 val batches of 8 over 2 ranks: 2 and 1, the uneven split that the weighting must get right; a log line every
# 4 steps, so a run stopped at step 10 leaves a log interval (steps 9-12) open across the resume
COMMON = ["--lr-decay-steps", "20", "--eval-every", "10", "--eval-batches", "3", "--log-every", "4"]
LOGGED = [4, 8, 12, 16, 20]
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def train(args, corpus, out, nproc=1, check=True):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launch, str(ROOT / "train.py"), *TINY, "--dataset", corpus["dataset"], "--data-root",
           corpus["data_root"], "--out-dir", str(out), *COMMON, *args]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def losses(out, name):
    rows = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in rows if "loss" in r},
            {r["step"]: r["val_loss"] for r in rows if "val_loss" in r})


@pytest.fixture(scope="module")
def data_dir(corpus):
    """The corpus prepared with the bytes tokenizer (what the training runs read)."""
    return ensure_dataset(corpus["dataset"], "bytes", corpus["data_root"], log=lambda *a: None)


@pytest.fixture(scope="module")
def single(corpus, data_dir, tmp_path_factory):
    """One process, --grad-accum 2, 20 steps: the reference (it also prepares the data for the DDP runs)."""
    out = tmp_path_factory.mktemp("ws")
    train(["--run-name", "one", "--grad-accum", "2", "--max-steps", "20"], corpus, out)
    return out, losses(out, "one")


def assert_same(a, b, steps):
    assert sorted(a) == steps
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-5), (s, a[s], b[s])


def assert_same_run(out, name, ref_loss, ref_val):
    """The run out/name logged the reference's train losses and val losses."""
    loss, val = losses(out, name)
    assert_same(loss, ref_loss, LOGGED)
    assert_same(val, ref_val, [10, 20])


# ----------------------------------------------------------------------------- loader (no processes)

def test_rank_reads_its_slice_of_the_single_process_micro_batches(data_dir):
    d = data_dir
    N, A, steps = 2, 3, 3
    one = TokenLoader(d, "train", 4, 16, seed=5, accum=N * A)
    ref = [one.next_batch()[0] for _ in range(steps * N * A)]
    for r in range(N):
        rank = TokenLoader(d, "train", 4, 16, rank=r, world_size=N, seed=5, accum=A)
        for s in range(steps):
            for m in range(A):
                assert torch.equal(rank.next_batch()[0], ref[s * N * A + r * A + m]), (r, s, m)
    # one global state: the single process's after 2 steps, loaded by rank 1 of 2, continues rank 1's slice
    one2 = TokenLoader(d, "train", 4, 16, seed=5, accum=N * A)
    for _ in range(2 * N * A):
        one2.next_batch()
    state = one2.state_dict()
    assert state["step"] == 2 * N * A
    r1 = TokenLoader(d, "train", 4, 16, rank=1, world_size=N, seed=5, accum=A)
    r1.load_state_dict(state)
    assert r1.state_dict() == state
    assert torch.equal(r1.next_batch()[0], ref[2 * N * A + A])
    with pytest.raises(ValueError, match="whole number of optimizer steps"):
        r1.load_state_dict({"step": N * A + 1, "seed": 5})
    # a checkpoint from before the global state: one process's list entry is the global state; several
    # ranks' (rank-seeded draws) continue the global stream after the micro-batches they read together
    assert global_loader_state({"loader": [state]}) == (state, None)
    old = {"loader": [{"step": 2 * A, "seed": 5}] * N, "train_config": {"grad_accum": A}}
    new, note = global_loader_state(old)
    assert new == {"step": 2 * N * A, "seed": 5} and "data order differs" in note


def test_val_windows_are_the_same_at_any_world_size(data_dir):
    d = data_dir
    one = TokenLoader(d, "val", 8, 16)
    s1, o1 = one.val_windows(3, global_batches=True)
    assert len(s1) == 24
    for n in (2, 3, 5):
        parts = [TokenLoader(d, "val", 8, 16, rank=r, world_size=n).val_windows(3, global_batches=True)
                 for r in range(n)]
        got = sorted((int(s), int(o)) for ps, po in parts for s, o in zip(ps, po))
        assert got == sorted(zip(s1.tolist(), o1.tolist())), n
        assert all(len(ps) % 8 == 0 for ps, _ in parts)  # whole batches of the single process


# ----------------------------------------------------------------------------- train.py end to end

@pytest.mark.slow
def test_two_processes_log_what_one_process_with_twice_the_accumulation_logs(corpus, single):
    out, (ref_loss, ref_val) = single
    p = train(["--run-name", "two", "--grad-accum", "1", "--max-steps", "20"], corpus, out, nproc=2)
    assert "world=2" in p.stdout and "ddp: parameters identical across 2 ranks" in p.stdout
    assert_same_run(out, "two", ref_loss, ref_val)


@pytest.mark.slow
def test_ddp_overlap_and_bucket_views_log_what_one_process_logs(corpus, single):
    # --compile --ddp-overlap: torch.compile around DDP, the graph cut at DDP's buckets (1 MB: several, in the
    # tiny model) with each bucket's all-reduce inside the compiled backward; --ddp-bucket-view: the gradients
    # are views of DDP's buckets (set to None between steps, views again at the next backward); the same
    # training as one process up to the compiled kernels' float rounding
    out, (ref_loss, ref_val) = single
    p = train(["--run-name", "overlap", "--grad-accum", "1", "--max-steps", "20", "--compile", "--ddp-overlap",
               "--ddp-bucket-mb", "1", "--ddp-bucket-view"], corpus, out, nproc=2)
    assert "ddp: parameters identical across 2 ranks" in p.stdout
    loss, val = losses(out, "overlap")
    assert sorted(loss) == LOGGED
    for s in LOGGED:
        assert loss[s] == pytest.approx(ref_loss[s], rel=1e-4), (s, loss[s], ref_loss[s])
    for s in (10, 20):
        assert val[s] == pytest.approx(ref_val[s], rel=1e-4), (s, val[s], ref_val[s])


@pytest.mark.slow
def test_resume_two_processes_on_one(corpus, single):
    out, (ref_loss, ref_val) = single
    train(["--run-name", "cut", "--grad-accum", "1", "--max-steps", "10"], corpus, out, nproc=2)
    ckpt = torch.load(out / "cut/ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["world_size"] == 2 and ckpt["loader"]["step"] == 10 * 2  # one global loader state
    assert ckpt["interval"]["steps"] == 2  # steps 9-10's losses, means over the ranks, wait for step 12's line
    # another global batch: refused before any work, with the --grad-accum that keeps it
    for bad in ([], ["--grad-accum", "3"]):
        p = train(["--run-name", "cut", "--resume", "--max-steps", "20", *bad], corpus, out, check=False)
        assert p.returncode != 0 and "pass --grad-accum 2" in p.stderr, p.stderr
        assert "| loss" not in p.stdout  # no training step ran
    train(["--run-name", "cut", "--resume", "--max-steps", "20", "--grad-accum", "2"], corpus, out)
    assert_same_run(out, "cut", ref_loss, ref_val)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (tools/gpu_check.sh runs it)")
def test_two_gpus_cuda_graph_replays_the_ddp_steps(tmp_path):
    """--cuda-graph under torchrun: DDP's all-reduce recorded in the graph. The 2-GPU graph run logs the normally
    launched 2-GPU run's losses (bf16 noise) through DDP's 11 warm-up steps, 9 replays, ra_headsel's routing
    refresh and the lr schedule, and its ranks end with identical parameters (the all-reduce really ran). The
    synthetic data, not the `files:` corpus: GPU machines may lack `datasets`, which prepares that one."""
    corpus = {"dataset": "synthetic-recall", "data_root": str(tmp_path / "data")}
    common = ["--device", "cuda", "--attn", "ra_headsel", "--compile", "--ra-route-every", "3", "--max-steps", "20"]
    train(["--run-name", "launched", *common], corpus, tmp_path, nproc=2)
    p = train(["--run-name", "graph", "--cuda-graph", *common], corpus, tmp_path, nproc=2)
    assert "cuda_graph=True" in p.stdout and "ddp: parameters identical across 2 ranks" in p.stdout, p.stdout
    (ref, ref_val), (got, val) = losses(tmp_path, "launched"), losses(tmp_path, "graph")
    assert sorted(got) == LOGGED and got[20] < got[4]
    for s in LOGGED:
        assert got[s] == pytest.approx(ref[s], rel=1e-3, abs=1e-4), (s, got, ref)
    for s in (10, 20):
        assert val[s] == pytest.approx(ref_val[s], rel=1e-3, abs=1e-4), (s, val, ref_val)


def test_a_torchrun_worker_exits_past_the_interpreter_teardown():
    """exit_process: under torchrun (TORCHELASTIC_RUN_ID set), os._exit after flushing, so the exit status and
    every line printed survive and no atexit handler runs; elsewhere a plain sys.exit."""
    code = ("import atexit; from trainer.common import exit_process; atexit.register(lambda: print('atexit ran')); "
            "print('printed', end=''); exit_process(3)")
    for env, atexit_ran in (({"TORCHELASTIC_RUN_ID": "t"}, False), ({}, True)):
        e = {k: v for k, v in ENV.items() if k != "TORCHELASTIC_RUN_ID"}
        p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**e, **env}, capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 3 and p.stdout.startswith("printed"), (env, p.stdout, p.stderr)
        assert ("atexit ran" in p.stdout) == atexit_ran, (env, p.stdout)
