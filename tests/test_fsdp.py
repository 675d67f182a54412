"""train.py --fsdp (FSDP2, trainer/fsdp.py) on CPU with gloo: 2 processes x accum 1 log what 1 process x accum 2
without --fsdp logs; a --fsdp run stopped and resumed (DCP checkpoint) on 2 or on 1 process equals the
uninterrupted run; every attention variant sharded computes the unsharded loss and gradients; the options it
cannot run with are refused before any work."""

import os
import subprocess
import sys

import pytest
import torch

from test_world_size import assert_same_run, data_dir, losses, single, train  # noqa: F401  (fixtures)
from trainer.config import TrainConfig, check_fsdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flags, says", [
    ({"cuda_graph": True}, "--fsdp with --cuda-graph"),
    ({"ddp_overlap": True}, "--fsdp with --ddp-overlap"),
    ({"ddp_bucket_view": True}, "--fsdp with --ddp-bucket-view"),
    ({"dtype": "float16"}, "--fsdp with --dtype float16"),
    ({"device": "mps"}, "not on mps"),
])
def test_fsdp_refuses_what_it_cannot_combine_with(flags, says):
    with pytest.raises(ValueError, match=says):
        check_fsdp(TrainConfig(fsdp=True, **flags))
    check_fsdp(TrainConfig(fsdp=True))  # the plain --fsdp passes


@pytest.mark.slow
def test_fsdp_compile_logs_what_the_uncompiled_run_logs(corpus, single):
    # --compile under --fsdp compiles each Block's forward (inductor, on the CPU too) before sharding: the same
    # losses as the uncompiled reference up to the compiled kernels' float rounding, and a checkpoint whose
    # parameter names are an uncompiled run's
    out, (ref_loss, ref_val) = single
    p = train(["--run-name", "fc", "--fsdp", "--compile", "--grad-accum", "2", "--max-steps", "20"], corpus, out)
    assert "compile=True" in p.stdout and "fsdp=True" in p.stdout
    loss, val = losses(out, "fc")
    for s in ref_loss:
        assert loss[s] == pytest.approx(ref_loss[s], rel=1e-4), (s, loss[s], ref_loss[s])
    for s in ref_val:
        assert val[s] == pytest.approx(ref_val[s], rel=1e-4), (s, val[s], ref_val[s])
    meta = torch.load(out / "fc" / "ckpt.pt", weights_only=False)
    names = os.listdir(out / "fc" / meta["dcp"])
    assert names and not any("_orig_mod" in n for n in names)
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(out / "fc" / meta["dcp"])).read_metadata().state_dict_metadata
    assert "model.transformer.h.0.attn.c_attn.weight" in keys and not any("_orig_mod" in k for k in keys), keys


@pytest.mark.slow
def test_every_attention_variant_sharded_equals_unsharded():
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "tests", "fsdp_check.py")], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [x for x in p.stdout.splitlines() if x.startswith("variant ")]
    import attention

    assert [x.split()[1] for x in lines] == attention.names(), p.stdout + p.stderr
    assert p.returncode == 0 and all(x.endswith(" ok") for x in lines), p.stdout + p.stderr


@pytest.mark.slow
def test_fsdp_two_processes_log_what_one_process_with_twice_the_accumulation_logs(corpus, single):
    out, (ref_loss, ref_val) = single
    p = train(["--run-name", "fsdp2", "--fsdp", "--grad-accum", "1", "--max-steps", "20"], corpus, out, nproc=2)
    assert "world=2" in p.stdout and "fsdp=True" in p.stdout
    assert_same_run(out, "fsdp2", ref_loss, ref_val)


@pytest.mark.slow
def test_fsdp_resume_on_two_and_on_one_process(corpus, single):
    out, (ref_loss, ref_val) = single
    train(["--run-name", "cut", "--fsdp", "--grad-accum", "1", "--max-steps", "10"], corpus, out, nproc=2)
    ckpt = torch.load(out / "cut/ckpt.pt", map_location="cpu", weights_only=False)
    assert ckpt["dcp"] == "ckpt_dcp/step-00000010" and ckpt["model"] is None and ckpt["world_size"] == 2
    assert sorted(x.name for x in (out / "cut/ckpt_dcp").iterdir()) == ["step-00000010"]
    # the format cannot change on resume: refused before any step
    p = train(["--run-name", "cut", "--resume", "--fsdp", "false", "--max-steps", "20", "--grad-accum", "2"], corpus,
              out, check=False)
    assert p.returncode != 0 and "--fsdp is True" in p.stderr and "| loss" not in p.stdout, p.stderr
    # a copy of the stopped run resumes on 1 process (DCP reshards the 2 ranks' shards), the original on 2
    import shutil

    shutil.copytree(out / "cut", out / "cut1")
    (out / "cut1" / "train.lock").unlink(missing_ok=True)
    train(["--run-name", "cut1", "--resume", "--max-steps", "20", "--grad-accum", "2"], corpus, out)
    train(["--run-name", "cut", "--resume", "--max-steps", "20"], corpus, out, nproc=2)
    for name in ("cut", "cut1"):
        assert_same_run(out, name, ref_loss, ref_val)
    # the checkpoint at the end replaced the one at step 10 (its shards went after the commit)
    assert sorted(x.name for x in (out / "cut/ckpt_dcp").iterdir()) == ["step-00000020"]
