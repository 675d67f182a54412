"""tools/ddp_overlap.py on the CPU (gloo, 2 processes, dynamo without inductor): every configuration runs,
the DDP ways of combining compile and DDP and FSDP2 compute the same training step, and the bf16 all-reduce
hook a step within bf16 rounding of it."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "ddp_overlap.py")
SMALL = ["--preset", "tiny", "--device", "cpu", "--compile-backend", "eager", "--steps", "3", "--warmup", "1",
         "--batch-size", "2"]


def rows(stdout):
    """{config label: (ms, loss)} from the tool's table."""
    out = {}
    for m in re.finditer(r"^\| ([a-z][^|]*?) \| ([\d.]+) \| [\d,]+ \| [^|]+ \| ([-\d.]+) \|$", stdout, re.M):
        out[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    return out


@pytest.mark.slow
def test_configs_run_and_ddp_orders_agree(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TOOL,
                        "--configs", "single,single:eager,inside,outside,outside:view:b1,outside:bf16,manual,fsdp,fsdp:compile,"
                        "outside:solo:b1,single:a2,outside:solo:a2",
                        "--profile", "1", "--profile-out", str(tmp_path)] + SMALL,
                       cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = rows(p.stdout)
    assert list(r) == ["single", "single eager=True", "inside", "outside",
                       "outside gradient_as_bucket_view=True bucket_cap_mb=1", "outside bf16=True", "manual", "fsdp",
                       "fsdp compile=True", "outside solo=True bucket_cap_mb=1", "single accum=2",
                       "outside solo=True accum=2"], p.stdout
    assert all(ms > 0 for ms, _ in r.values())
    # same weights, batches and averaged gradients: the DDP, manual all-reduce and FSDP rows train alike (fp32)
    losses = [loss for label, (_, loss) in r.items() if not label.startswith("single") and "bf16" not in label
              and "solo" not in label and "accum" not in label]
    assert max(losses) - min(losses) < 1e-5, r
    # gradients rounded to bf16 before the optimizer: the same training within bf16 rounding, but not bit-equal
    assert 0 < abs(r["outside bf16=True"][1] - r["outside"][1]) < 1e-2, r
    assert abs(r["single"][1] - r["single eager=True"][1]) < 1e-5, r
    # each rank in a DDP group of its own: no averaging, so rank 0 trains as the single process does
    assert abs(r["outside solo=True bucket_cap_mb=1"][1] - r["single"][1]) < 1e-5, r
    # accumulation (aN): the micro-steps without DDP's sync accumulate as one process does, and they change the
    # training (two batches per step, not one)
    assert abs(r["outside solo=True accum=2"][1] - r["single accum=2"][1]) < 1e-5, r
    assert abs(r["single accum=2"][1] - r["single"][1]) > 1e-4, r
    assert "x 2," in p.stdout  # the world size in the header
    assert re.search(r"all-reduce of the gradients, [\d.]+M float32 .* ms", p.stdout), p.stdout
    assert p.stdout.count("top kernels per step") == 12, p.stdout  # --profile: one list per configuration
    # --profile-out: every configuration's whole op table, one file each
    assert len(list(tmp_path.glob("*.txt"))) == 12 and (tmp_path / "outside.txt").read_text().count(" ms x") > 8
    # every DDP configuration's ranks: the fastest and the slowest rank's median
    assert re.search(r"^outside solo=True bucket_cap_mb=1: [\d.]+-[\d.]+ ms$", p.stdout, re.M), p.stdout


def test_one_process_runs_only_single_and_bad_configs_are_refused(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, TOOL, "--configs", "single,outside"] + SMALL, cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "only `single` runs" in p.stdout and list(rows(p.stdout)) == ["single"]
    for bad, msg in (("sideways", "starts with single, inside, outside, manual or fsdp"),
                     ("outside:fast", "is not view, bf16, solo, bMB (e.g. b100) or aN"), ("single:view", "single has no DDP options"),
                     ("fsdp:view", "fsdp has no options but compile"), ("manual:b10", "manual has no options"),
                     ("fsdp:graph", "fsdp has no graph option"), ("single:eager:graph", "recorded from the compiled"),
                     ("single:graph", "needs a CUDA GPU"), ("manual:a2", "manual has no aN option"),
                     ("outside:a0", "one aN option with N >= 1"), ("outside:a2:a3", "one aN option")):
        p = subprocess.run([sys.executable, TOOL, "--configs", bad] + SMALL, cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env=env)
        assert p.returncode != 0 and msg in p.stderr, p.stderr[-2000:]
    # --dataset: real windows, new ones every step (here the generated synthetic-recall set, a small vocabulary)
    p = subprocess.run([sys.executable, TOOL, "--configs", "single:a2", "--dataset", "synthetic-recall", "--data-root",
                        str(tmp_path / "data")] + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (ms, loss), = rows(p.stdout).values()
    assert ms > 0 and loss < 7.0, p.stdout  # the dataset's small vocabulary, not GPT-2's 50257 tokens (about 10.8)
    p = subprocess.run([sys.executable, TOOL, "--configs", "single", "--dataset", "nonesuch", "--data-root",
                        str(tmp_path / "data")] + SMALL, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0 and "--dataset nonesuch" in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    p = subprocess.run([sys.executable, TOOL, "--configs", "single", "--profile-out", "somewhere"] + SMALL, cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode != 0 and "add --profile 3" in p.stderr, p.stderr[-2000:]
