"""Running the quality ladder: the --repeat, --sweep and --gpus planning, the GPU worker pool, a ladder folder's
corpus and flags, the errors before any run, and small CPU ladders end to end (in-process, through the GPU
workers' path, and as subprocesses), with compare.py rebuilding the same table from the run folders
(tests/test_quality_report.py checks the numbers those reports hold)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import attention
import quick_quality_test as qqt
from data.synthetic import make_synthetic
from ladder import workers
from ladder.plan import check_gpus, one_pass, plan_runs, strip_flag
from ladder.state import check_state, corpus_identity


ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- planning: --repeat, --sweep, --gpus

def test_repeat_and_sweep_planning(tmp_path):
    a = qqt.parse_args(["--rung", "short", "--seeds", "2", "--variants", "ra_same_flop,ra_headsel", "--repeat",
                        "--sweep", "ra_R=4,12", "--dataset", "shakespeare"])
    plan = plan_runs(a, "x", tmp_path)
    names = [Path(r["run_dir"]).name for r in plan]
    assert names[:5] == ["sdpa-s1337", "ra_same_flop-ra_R4-s1337", "ra_same_flop-ra_R12-s1337",
                         "ra_headsel-ra_R4-s1337", "ra_headsel-ra_R12-s1337"]
    assert len(plan) == 2 * 5 + 1 and names[-1] == "sdpa-s1337-repeat"
    rep, first = plan[-1], plan[0]
    assert rep["repeat_of"] == "sdpa-s1337" and rep["seed"] == first["seed"] == 1337
    # the repeat runs exactly the first seed's command, in its own folder
    assert strip_flag(rep["argv"], ("--run-name",)) == strip_flag(first["argv"], ("--run-name",))
    assert plan[1]["argv"][-2:] == ["--ra-R", "4"]
    jobs = workers.plan_jobs(plan)
    # one job per variant key (all its seeds in one process), the repeat apart; longest first
    assert [len(j["runs"]) for j in jobs] == [2, 2, 2, 2, 2, 1]
    assert jobs[-1]["runs"] == [rep] and all(len({r["key"] for r in j["runs"]}) == 1 for j in jobs)
    with pytest.raises(SystemExit):
        qqt.parse_args(["--variants", "ra_swap", "--sweep", "ra_R=4,8"])  # ra_swap does not read ra_R


def test_gpu_pool_stops_cleanly_on_two_interrupts(tmp_path):
    """`timeout -s INT` signals the ladder and then its process group: two SIGINTs. The pool passes the stop
    on to its workers, waits for them to checkpoint (exit 130) and reports the ladder interrupted."""
    runs = [{"key": k, "run_dir": str(tmp_path / f"{k}-s1"), "argv": [], "attn": k, "seed": 1, "repeat_of": None}
            for k in ("a", "b", "c")]
    code = ("import sys, time\ntry:\n    print('started', flush=True); time.sleep(30)\n"
            "except KeyboardInterrupt:\n    time.sleep(0.3); print('checkpointed', flush=True); sys.exit(130)\n")

    def fake_worker(job_file, gpu):
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # only the pool's SIGINT reaches it

    def interrupt_twice():
        time.sleep(1.5)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs as a background job
    threading.Thread(target=interrupt_twice, daemon=True).start()
    t0 = time.time()
    records, interrupted = workers.run_pool(workers.plan_jobs(runs), ["0", "1"], tmp_path / "jobs",
                                            launch_worker=fake_worker)
    assert interrupted and time.time() - t0 < 10  # the workers stopped, not slept out
    assert len(records) == 2  # the third job was never started
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back


def test_gpu_pool_runs_one_job_per_gpu_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert workers.gpu_ids(2) == ["3", "5"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert workers.gpu_ids(2) == ["0", "1"]
    runs = [{"key": k, "run_dir": str(tmp_path / f"{k}-s{s}"), "argv": [], "attn": k, "seed": s, "repeat_of": None}
            for k in ("a", "b", "c") for s in (1, 2)]
    started = []

    def fake_worker(job_file, gpu):  # each "worker" takes 1 s and writes its runs' ladder_run.json
        job = json.loads(Path(job_file).read_text())
        started.append((gpu, time.time(), [r["seed"] for r in job["runs"]]))
        code = "".join(f"import pathlib,json; p=pathlib.Path({r['run_dir']!r}); p.mkdir(parents=True); "
                       f"(p/'ladder_run.json').write_text(json.dumps({{'status': 'done'}}));" for r in job["runs"])
        return subprocess.Popen([sys.executable, "-c", code + "import time; time.sleep(1); print('ok')"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    records, interrupted = workers.run_pool(workers.plan_jobs(runs), ["0", "1"], tmp_path / "jobs",
                                            launch_worker=fake_worker)
    assert not interrupted and len(records) == 6 and all(r["status"] == "done" for r in records)
    assert len(started) == 3 and {g for g, _, _ in started} == {"0", "1"}  # the third on whichever GPU freed first
    assert all(s == [1, 2] for *_, s in started)
    t = sorted(t for _, t, _ in started)
    assert t[1] - t[0] < 0.8 and t[2] - t[0] > 0.8  # two at once; the third waits for a free GPU


def test_errors_before_any_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(workers, "visible_gpus", lambda: 2)
    with pytest.raises(SystemExit, match=r"--gpus 3 but 2 GPUs are visible"):
        qqt.main(["--rung", "short", "--gpus", "3", "--out-dir", str(tmp_path / "l"), "--dataset", "nope"])
    assert not (tmp_path / "l").exists()
    a = qqt.parse_args(["--rung", "short", "--launch", "subprocess", "--gpus", "2"])
    with pytest.raises(SystemExit, match="needs --launch workers"):
        check_gpus(a)
    # a ladder folder remembers its corpus and flags
    state = {"corpus": {"name": "prose", "tokens": {"train": 100, "val": 10}, "sha256": "a" * 64},
             "flags": {"lr": 6e-4, "max_steps": 1400}, "rung": "short"}
    check_state(tmp_path, state)
    check_state(tmp_path, state)  # the same corpus and flags: fine
    other = {**state, "corpus": {**state["corpus"], "tokens": {"train": 101, "val": 10}, "sha256": "b" * 64}}
    with pytest.raises(SystemExit, match="another version of the corpus"):
        check_state(tmp_path, other)
    with pytest.raises(SystemExit, match=r"other training flags \(lr: 0.0006 then, 0.001 now\)"):
        check_state(tmp_path, {**state, "flags": {"lr": 1e-3, "max_steps": 1400}})
    # a flag the code gained after the folder was started: fine at its default, refused at another value
    check_state(tmp_path, {**state, "flags": {**state["flags"], "ra_swap_norm": "layernorm"}})
    with pytest.raises(SystemExit, match=r"ra_swap_norm: 'layernorm' then, 'none' now"):
        check_state(tmp_path, {**state, "flags": {**state["flags"], "ra_swap_norm": "none"}})
    meta = {"name": "prose", "tokens": {"train": 100, "val": 10}, "created": "then"}
    assert corpus_identity(meta) == corpus_identity({**meta, "created": "now"})  # re-prepared: same
    assert corpus_identity(meta) != corpus_identity({**meta, "tokens": {"train": 99, "val": 10}})


def test_one_pass_steps_and_val_batches():
    import train

    tc, mc, _ = train.resolve_config(["--preset", "gpt2-124m", "--batch-size", "16", "--device", "cpu"])
    meta = {"name": "prose", "tokens": {"train": 23_000_000, "val": 1_200_000}}
    steps, eval_batches = one_pass(meta, tc, mc)
    assert steps == 23_000_000 // (16 * 1024) == 1403
    assert eval_batches == math.ceil(((1_200_000 - 1) // 1024) / 16)


# ----------------------------------------------------------------------------- the CLI

def test_cli_rejects_flags_the_ladder_owns_and_unknown_variants(capsys):
    with pytest.raises(SystemExit):
        qqt.parse_args(["--steps", "5", "--seed", "3"])
    assert "use --seeds / --seed0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qqt.parse_args(["--variants", "sdpa,nope"])
    assert "unknown attention 'nope'; registered:" in capsys.readouterr().err
    a = qqt.parse_args(["--steps", "7", "--variants", "ra_same_flop", "--train-args", "--ra-R 4", "--batch-size", "2"])
    assert a.rung == "sanity" and a.seeds == 1 and a.variants == ["sdpa", "ra_same_flop"]
    assert a.passthrough == ["--ra-R", "4", "--batch-size", "2"]
    assert qqt.parse_args([]).rung == "full" and qqt.parse_args(["--rung", "short"]).seeds == 3


# ----------------------------------------------------------------------------- a real sanity ladder on CPU

# tiny everything: 20 steps of a 2-layer, 64-wide model on 32-token windows take a few seconds per variant
SHRINK = "--n-embd 64 --n-head 2 --block-size 32 --batch-size 8 --device cpu"


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ladder")
    variants = ["sdpa"] + [v for v in ("ra_same_flop", "ra_headsel") if v in attention.names()]
    cmd = [sys.executable, str(ROOT / "quick_quality_test.py"), "--steps", "20", "--variants", ",".join(variants),
           "--out-dir", str(tmp / "ladder"), "--data-root", str(tmp / "data"), "--train-args", SHRINK]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    # generous: tools/gpu_check.sh runs 8 test files at once, and there this ladder can take over 300 s
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    return {"dir": tmp / "ladder", "proc": p, "variants": variants, "cmd": cmd, "tmp": tmp, "env": env}


@pytest.mark.slow
def test_sanity_ladder_writes_results(ladder):
    p, out = ladder["proc"], ladder["dir"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "sanity: PASS" in p.stdout
    res = json.loads((out / "results.json").read_text())
    assert [v["label"] for v in res["variants"]] == ladder["variants"]
    assert all(v["n_ok"] == 1 and v["passes"] and v["ms_per_step"] > 0 for v in res["variants"])
    for v in ladder["variants"]:
        run = out / f"{v}-s1337"
        assert (run / "config.json").exists() and (run / "log.jsonl").exists() and (run / "train.log").exists()
    md = (out / "results.md").read_text()
    for v in ladder["variants"]:
        assert f"| {v} | 1/1 |" in md  # a row of the main table
    assert "n=1, no CI" in md
    assert "- init: " in md  # the check of equal initial values of the shared weights
    for q in ("keeps val loss (within noise)?**", "**head-selective helps?**", "**quality-per-ms better than baseline?"):
        assert q in md, q
    for png in ("val_loss_vs_step.png", "val_loss_vs_time.png"):
        assert (out / png).stat().st_size > 1000


def tables(md):
    return md[md.index("## Final validation loss"):md.index("## Runs")]


@pytest.mark.slow
def test_compare_rebuilds_the_same_table(ladder, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(ladder["dir"]), "--out", str(tmp_path / "cmp")],
                       cwd=ladder["tmp"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rebuilt = (tmp_path / "cmp" / "results.md").read_text()
    assert tables(rebuilt) == tables((ladder["dir"] / "results.md").read_text())
    # single run folders work too
    p = subprocess.run([sys.executable, str(ROOT / "compare.py"), str(ladder["dir"] / "sdpa-s1337"),
                        str(ladder["dir"] / f"{ladder['variants'][1]}-s1337"), "--out", str(tmp_path / "two"),
                        "--no-plots"], cwd=ladder["tmp"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and f"| {ladder['variants'][1]} | 1/1 |" in p.stdout, p.stdout + p.stderr


@pytest.mark.slow
def test_rerun_reuses_finished_runs(ladder):
    p = subprocess.run(ladder["cmd"], cwd=ladder["tmp"], env=ladder["env"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"runs: {len(ladder['variants'])} finished (reused), 0 to resume, 0 to start" in p.stdout
    assert "python train.py" not in p.stdout  # nothing ran again
    assert "sanity: PASS" in p.stdout


def test_synthetic_dataset_is_cached_and_loads(tmp_path):
    from data.loader import TokenLoader

    out = make_synthetic("recall", tmp_path, train_tokens=5000, val_tokens=1000)
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert make_synthetic("recall", tmp_path, train_tokens=5000, val_tokens=1000) == out
    assert (out / "meta.json").stat().st_mtime_ns == mtime  # same parameters: not rebuilt
    x, y = TokenLoader(out, "train", 4, 32, seed=0).next_batch()
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    toks = x.flatten().tolist() + y[:, -1].tolist()
    data = bytes(TokenLoader(out, "val", 1, 200).next_batch()[0][0].tolist())
    # after every '?' comes the document's key, an uppercase letter
    for i in range(len(data) - 1):
        if data[i] == ord("?"):
            assert 65 <= data[i + 1] <= 90
    assert max(toks) < 256


@pytest.mark.slow
def test_a_failing_variant_is_a_failed_row_not_the_end(monkeypatch, tmp_path):
    # a variant that builds but raises in forward, run in-process next to sdpa: sdpa still runs and reports
    import types

    import torch.nn as nn

    class Broken(nn.Module):
        ra_family, head_selective, options, gate_ranges, attn_flop_mult = True, False, (), {}, 1.0  # the contract

        def __init__(self, cfg):
            super().__init__()

        def forward(self, x):
            raise RuntimeError("boom from the broken test variant")

    module = types.ModuleType("attention.broken_for_test")
    module.Broken = Broken
    monkeypatch.setitem(sys.modules, "attention.broken_for_test", module)
    monkeypatch.setitem(attention.REGISTRY, "broken", "broken_for_test:Broken")
    out = tmp_path / "ladder"
    rc = qqt.main(["--steps", "4", "--variants", "broken", "--launch", "inprocess", "--out-dir", str(out),
                   "--data-root", str(tmp_path / "data"), "--train-args", SHRINK])
    assert rc == 1
    md = (out / "results.md").read_text()
    assert "| broken | 0/1 | FAILED |" in md and "| sdpa | 1/1 |" in md
    assert "boom from the broken test variant" in (out / "broken-s1337" / "train.log").read_text()
    assert json.loads((out / "broken-s1337" / "ladder_run.json").read_text())["status"] == "failed (exit 1)"


@pytest.mark.slow
def test_subprocess_launch(tmp_path):
    out = tmp_path / "ladder"
    p = subprocess.run([sys.executable, str(ROOT / "quick_quality_test.py"), "--steps", "4", "--variants", "sdpa",
                        "--launch", "subprocess", "--out-dir", str(out), "--data-root", str(tmp_path / "data"),
                        "--train-args", SHRINK], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "WANDB_MODE": "disabled"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert json.loads((out / "sdpa-s1337" / "ladder_run.json").read_text())["launch"] == "subprocess"
    assert (out / "results.md").exists()


@pytest.mark.slow
def test_worker_ladder_end_to_end_with_repeat_and_state(tmp_path):
    # the GPU path on a CPU: one worker process per variant (its two seeds in one process), the repeat in a
    # third; CPU training is deterministic, so the same-seed repeat must come out identical
    out = tmp_path / "ladder"
    cmd = [sys.executable, str(ROOT / "quick_quality_test.py"), "--steps", "6", "--variants", "ra_same_flop",
           "--seeds", "2", "--repeat", "--launch", "workers", "--out-dir", str(out), "--data-root",
           str(tmp_path / "data"), "--train-args", SHRINK]
    # one GPU visible at most, so one worker slot whatever the machine (a 2-GPU machine would start a worker per
    # GPU); the training itself runs on the CPU (SHRINK)
    env = {**os.environ, "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": "0"}
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # one worker slot, labelled by its CUDA_VISIBLE_DEVICES entry
    slots = re.findall(r"^\[gpu (\S+)\] ", p.stdout, flags=re.M)
    assert len(slots) >= 3 and len(set(slots)) == 1 and "3 job" not in p.stdout
    assert "ra_same_flop-s1337 (1/2): starting" in p.stdout and "ra_same_flop-s1338 (2/2): starting" in p.stdout
    rec = json.loads((out / "sdpa-s1337-repeat" / "ladder_run.json").read_text())
    assert rec["launch"] == "worker" and rec["repeat_of"] == "sdpa-s1337" and rec["status"] == "done"
    res = json.loads((out / "results.json").read_text())
    assert [v["n_runs"] for v in res["variants"]] == [2, 2]
    assert res["repeats"][0]["diff"] == 0.0
    md = (out / "results.md").read_text()
    assert "Δ = +0.0000 nats" in md and "MDE ±" in md
    assert json.loads((out / "ladder_state.json").read_text())["flags"]["max_steps"] == 6
    # other flags on the same folder: refused before any run
    p = subprocess.run(cmd[:-1] + [SHRINK + " --lr 1e-3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "other training flags (lr: 0.002 then, 0.001 now)" in p.stderr, p.stderr[-2000:]
    assert "[gpu" not in p.stdout
