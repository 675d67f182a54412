"""bench.py's CPU smoke run: every registered variant gets rows, sdpa is the 1.0 baseline, failures stay in their row."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

import attention
import bench


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(["--device", "cpu", "--what", "all", "--T", "32", "--reps", "2", "--step-reps", "2", "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_smoke_run_covers_every_variant(smoke):
    meta, rows = smoke["meta"], smoke["rows"]
    assert meta["smoke"] and meta["device"] == "cpu" and meta["torch"] and meta["date"] and "--what" in meta["argv"]
    assert {r["section"] for r in rows} == {"attn", "step", "sweep_R", "sweep_T", "sweep_heads", "sweep_exact"}
    for name in attention.names() + ["roadmap_unfused"]:
        for section, kind, passes in [("attn", "module", "fwd"), ("attn", "module", "fwd+bwd"), ("step", "model", "eager")]:
            assert any(r["section"] == section and r["kind"] == kind and r["variant"] == name and r["passes"] == passes
                       for r in rows), (name, section, passes)
    assert all(r["status"] != "pending" for r in rows)
    # GPU-only kernels say skipped and why on a CPU, not a driver error
    assert not [r for r in rows if "active drivers" in r["status"]]
    ctr = [r for r in rows if r["variant"] == "ctr_attention"]
    assert ctr and all(r["status"].startswith("skipped: no CUDA GPU") for r in ctr), {r["status"] for r in ctr}
    # the baseline and the roadmap's own formulation (both defined without optional packages) run everywhere
    for r in rows:
        if r["variant"] in ("sdpa", "roadmap_unfused"):
            assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0, r
    sdpa = [r for r in rows if r["variant"] == "sdpa"]
    assert sdpa and all(r["ratio"] == 1.0 for r in sdpa)
    # ratios are ms / sdpa ms of the same section, pass and setting
    step = {r["variant"]: r for r in rows if r["section"] == "step" and r["status"] == "ok"}
    for r in step.values():
        assert r["ratio"] == pytest.approx(r["ms"] / step["sdpa"]["ms"])
        assert r["params"]["flops_per_token"] > 0 and r["tokens_per_s"] > 0
    assert {r["setting"] for r in rows if r["section"] == "sweep_R" and r["variant"] == "roadmap_unfused"} == {
        "R=4", "R=8", "R=12", "R=16"}
    assert {r["setting"] for r in rows if r["section"] == "sweep_T"} == {"T=32", "T=64", "T=128"}


def test_failing_variant_is_reported_not_fatal(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(attention.REGISTRY, "broken", "sdpa:NoSuchClass")
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--what", "attn,step", "--variants", "broken", "--reps", "1",
                       "--step-reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == {"sdpa", "broken"}  # sdpa always runs as the baseline
    broken = [r for r in rows if r["variant"] == "broken"]
    assert broken and all(r["status"].startswith("error: AttributeError") and r["ms"] is None for r in broken)
    assert all(r["status"] == "ok" for r in rows if r["variant"] == "sdpa")
    assert "SMOKE RUN (CPU)" in capsys.readouterr().out


def test_bad_arguments_fail_before_any_work(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--variants", "sdpa,nope"])
    err = capsys.readouterr().err
    assert "unknown variant(s) nope" in err and "roadmap_unfused" in err
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--sweep", "X"])


def test_exact_sweep_rows_ratios_and_the_bound_is_exact_ra(tmp_path, capsys):
    """--sweep exact: sdpa, the bound, the fold, CTR and the two span rows at each (T, D), ratios to that T and
    D's sdpa, exact RA counted as 1.5x sdpa's FLOPs; the bound, fed folded operands, computes exact RA itself,
    and the span rows, fed projection outputs, compute sdpa and exact RA."""
    import torch

    from attention.functional import ra_operands, reciprocal_attention, reciprocal_attention_matmul, sdpa_causal
    from benchmarks.variants import EXACT_FUNCTIONS, SPAN_FUNCTIONS, load_function

    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--sweep", "exact", "--B", "1", "--H", "2", "--T", "16", "--D", "8",
                       "--reps", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["section"] for r in rows} == {"sweep_exact"}
    headsel = ["headsel span (1/4 RA, 2 streams)", "headsel span (1/4 RA, 1 stream)"]
    labels = ["sdpa", "exact bound", "reciprocal_attention", "ctr_attention", "sdpa span", "exact span (dense)"] + headsel
    for T in (16, 32, 64):
        for D in (8, 16):
            at = {(r["variant"], r["passes"]): r for r in rows if r["params"]["T"] == T and r["params"]["D"] == D}
            assert sorted(at) == sorted((v, p) for v in labels for p in ("fwd", "fwd+bwd")), (T, D)
            for (v, p), r in at.items():
                if v == "ctr_attention":
                    assert r["status"].startswith("skipped: no CUDA GPU") and r["ratio"] is None, r
                    continue
                assert r["status"] == "ok" and r["ratio"] == pytest.approx(r["ms"] / at[("sdpa", p)]["ms"]), r
                if v in headsel:  # 1 RA head of 2: its q' and v, the plain head's [q | k | v]
                    assert r["params"]["input_shapes"] == [[1, T, 1, 2 * D], [1, T, 1, D], [1, T, 3 * D]], r
                elif "span" in v:  # projection outputs in: sdpa's (B, T, 3, H, D), ra_exact's q' and v
                    assert r["params"]["input_shapes"] == ([[1, T, 3, 2, D]] if v == "sdpa span"
                                                           else [[1, T, 2, 2 * D], [1, T, 2, D]]), r
                else:
                    assert r["params"]["head_dims"] == ([2 * D, 2 * D, D] if v == "exact bound" else [D, D, D]), r
                mult = 1.0 if v.startswith("sdpa") else 1.125 if v in headsel else 1.5
                flops = 4 * 1 * 2 * T * T * D / 2 * mult * (3.5 if p == "fwd+bwd" else 1.0)
                assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12), r
    printed = capsys.readouterr().out
    assert "| function | exact bound | T=64 D=16 | fwd+bwd |" in printed and "x sdpa" in printed
    assert "| function exact bound |" in printed  # the summary's ratio line

    bound = load_function(next(f[2] for f in EXACT_FUNCTIONS if f[0] == "exact bound"), {})
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 13, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    a, b = torch.tensor([1.0, 0.0, -0.7], dtype=torch.float64), torch.tensor([0.3, 1.2, 0.0], dtype=torch.float64)
    y = bound(*ra_operands(q, k, a, b), v, dict(backend="auto"))
    torch.testing.assert_close(y, reciprocal_attention(q, k, v, a, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, reciprocal_attention_matmul(q, k, v, a, b), rtol=1e-10, atol=1e-10)
    # the span rows compute what they are named for, from projection outputs
    span = {f[0]: f[2] for f in SPAN_FUNCTIONS}
    qkv = torch.stack([q, k, v], dim=1).permute(0, 3, 1, 2, 4)  # (B, T, 3, H, D)
    torch.testing.assert_close(span["sdpa span"](qkv, dict(backend="auto")), sdpa_causal(q, k, v), rtol=1e-12, atol=1e-12)
    qk, vt = torch.cat([q, k], dim=-1).transpose(1, 2), v.transpose(1, 2)  # (B, T, H, 2D), (B, T, H, D)
    y = span["exact span (dense)"](qk, vt, dict(a=a, b=b, backend="auto"))
    torch.testing.assert_close(y, reciprocal_attention(q, k, v, a, b), rtol=1e-12, atol=1e-12)
    # head-selective (3 heads: 1 RA head, 2 plain), on the CPU one stream whatever the row asks for: head 0 exact RA
    # with a_0, b_0, heads 1, 2 plain attention
    plain = torch.cat([t[:, 1:].transpose(1, 2).flatten(2) for t in (q, k, v)], dim=-1)  # (B, T, 3 * 2 D)
    want = torch.cat([reciprocal_attention(q[:, :1], k[:, :1], v[:, :1], a[:1], b[:1]),
                      sdpa_causal(q[:, 1:], k[:, 1:], v[:, 1:])], dim=1)
    for label in headsel:
        y = span[label](qk[:, :, :1], vt[:, :, :1], plain, dict(a=a, b=b, backend="auto"))
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_roadmap_unfused_matches_its_formula():
    """Its scores are q_i.k_j over D-R dims plus (k_i W).(q_j W): check against explicit softmax."""
    import torch

    torch.manual_seed(0)
    B, H, T, D, R = 1, 2, 5, 8, 3
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    torch.manual_seed(1)
    y = bench.roadmap_unfused_attention(q, k, v, R)
    torch.manual_seed(1)
    W = torch.randn(D, R)  # the same fresh W the function draws
    s = q[..., :D - R] @ k[..., :D - R].transpose(-1, -2) + (k @ W) @ (q @ W).transpose(-1, -2)
    s = (s / D ** 0.5).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(y, s.softmax(-1) @ v)


def test_kernel_categories_and_profile_table():
    assert bench.kernel_category("flash_bwd_kernel<...>") == "attention"
    assert bench.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "gemm"
    assert bench.kernel_category("nvjet_tst_128x256_64x4") == "gemm"
    assert bench.kernel_category("void at::native::multi_tensor_apply_kernel<FusedAdamW...>") == "optimizer"
    assert bench.kernel_category("triton_per_fused__to_copy_add_mul_sum_3") == "compiled"
    assert bench.kernel_category("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"

    def row(variant, ms, cats):
        top = [(v, 1.0, k) for k, v in cats.items()]
        return dict(variant=variant, passes="compile", ms=ms,
                    profile=dict(categories=cats, top=top, total_ms=sum(cats.values())))

    rows = [row("sdpa", 10.0, {"gemm": 6.0, "attention": 2.0, "compiled": 1.5}),
            row("ra_x", 10.5, {"gemm": 6.0, "attention": 2.0, "compiled": 1.7, "other": 0.1})]
    table = bench.profile_table(rows)
    lines = table.splitlines()
    # the variant's own line, then its difference to sdpa: step +0.5 = kernels +0.3 + idle +0.2
    diff = next(line for line in lines if "- sdpa" in line)
    cells = [c.strip() for c in diff.strip("|").split("|")]
    assert cells[2:5] == ["+0.50", "+0.30", "+0.20"]
    assert "top kernels per step" in table and "ra_x (compile)" in table
    assert bench.profile_table([dict(variant="sdpa", passes="eager", ms=1.0)]) == ""


def test_interleaved_step_timing_pairs_rounds(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--what", "step", "--variants", "ra_same_flop", "--interleave", "3",
                       "--step-reps", "6", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    sdpa, ra = rows["sdpa"], rows["ra_same_flop"]
    assert len(sdpa["rounds_ms"]) == len(ra["rounds_ms"]) == 3
    paired = sorted(m / b for m, b in zip(ra["rounds_ms"], sdpa["rounds_ms"]))
    assert ra["ratio_paired"] == pytest.approx(paired[1]) and ra["ratio_range"] == pytest.approx([paired[0], paired[2]])
    assert sdpa["ratio_paired"] == 1.0 and ra["status"] == "ok" and ra["ms"] == pytest.approx(sorted(ra["rounds_ms"])[1])


def test_ra_heads_sets_the_step_rows_heads(tmp_path, monkeypatch, capsys):
    """--ra-heads K: each head-selective variant's step row trains with the first K heads of every layer as RA
    heads (set_heads_mask), says so in its setting and its table line; other variants are built as they are."""
    from benchmarks import runner

    masks = []
    real = runner.build_model

    def spy(name, cfg):
        model = real(name, cfg)
        for block in model.transformer.h:
            if hasattr(block.attn, "set_heads_mask"):
                orig = block.attn.set_heads_mask
                block.attn.set_heads_mask = lambda m, orig=orig, name=name: (masks.append((name, m.tolist())), orig(m))
        return model

    monkeypatch.setattr(runner, "build_model", spy)
    out = tmp_path / "b.json"
    assert bench.main(["--device", "cpu", "--what", "step", "--variants", "ra_exact_headsel,ra_same_flop",
                       "--ra-heads", "1", "--out", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["ra_exact_headsel"]["setting"] == "ra_heads=1/2" and rows["ra_exact_headsel"]["status"] == "ok"
    assert rows["ra_same_flop"]["setting"] == rows["sdpa"]["setting"] == ""
    assert masks == [("ra_exact_headsel", [True, False])] * 2  # both layers of the CPU model (2 heads each)
    assert "| ra_exact_headsel ra_heads=1/2 | eager |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--what", "step", "--ra-heads", "3"])  # the CPU model has 2 heads
    assert "--ra-heads 3: use 0..2" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_attention_rows_are_cuda_graph_replays(tmp_path):
    out = tmp_path / "b.json"
    assert bench.main(["--what", "attn", "--variants", "ra_same_flop,ra_tokensel", "--T", "256", "--reps", "5",
                       "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        assert r["status"] == "ok" and r["timing"] == "cuda graph", r


def test_step_overhead_tool_needs_a_gpu():
    """tools/step_overhead.py times GPU steps: without CUDA it stops at once with a clear message."""
    import subprocess

    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU: the tool would run for minutes")
    r = subprocess.run([sys.executable, "tools/step_overhead.py", "--variants", "sdpa"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr


# -- graphed step rows (--cuda-graph) on a CPU: the CUDA calls and the training step replaced by fakes


class FakeModel:
    def to(self, dev):
        return self

    def train(self):
        return self

    def flops_per_token(self, T):
        return 1.0

    def num_params(self):
        return 1


def fake_graphed_bench(monkeypatch, fail=(), interleave=0, clocks=False):
    """A Bench whose step rows are graphed (--cuda-graph on a 'cuda' device) with no GPU. Returns it and the
    calls to make_train_step as (variant, graph_pool) and the variants built. A variant in `fail` raises
    cuda_graph.CaptureError at its 4th step, where the capture happens."""
    import argparse

    import torch

    import cuda_graph
    from benchmarks import runner

    calls, built = [], []
    for f in ("reset_peak_memory_stats", "synchronize"):
        monkeypatch.setattr(torch.cuda, f, lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())  # a new handle per call
    monkeypatch.setattr(runner, "time_ms", lambda fn, warmup, reps, dev: (fn(), 1.0)[1])

    def build_model(name, cfg):
        built.append(name)
        return FakeModel()

    monkeypatch.setattr(runner, "build_model", build_model)

    def make_train_step(model, cfg, B, T, compiled, autocast, n_inputs, graphed=False, graph_pool=None):
        name = built[-1]
        calls.append((name, graph_pool))
        n = iter(range(100))

        def train_step():
            if next(n) == 3 and name in fail:
                raise cuda_graph.CaptureError("capturing the training step as a CUDA graph failed (RuntimeError: x)")

        return train_step

    args = argparse.Namespace(cuda_graph=True, out=None, n_inputs=1, step_warmup=1, step_reps=2, profile=0,
                              peak_flops=None, interleave=interleave, ra_heads=None, clocks=clocks)
    bench = runner.Bench(args, torch.device("cuda"), torch.float32, {}, make_train_step)
    return bench, calls, built


def test_graphed_steps_timed_one_by_one_get_private_pools(monkeypatch):
    # each graph is freed before the next capture: a shared pool would be one whose graphs are all gone,
    # which trips the CUDA caching allocator's assert at the next capture
    bench, calls, _ = fake_graphed_bench(monkeypatch)
    for name in ("sdpa", "ra_same_flop"):
        bench.step(name, None, 2, 8, compiled=False)
    assert [r["status"] for r in bench.rows] == ["ok", "ok"] and bench.rows[0]["passes"] == "eager+graph"
    assert calls == [("sdpa", None), ("ra_same_flop", None)]


def test_interleaved_graphed_steps_share_one_pool_per_call(monkeypatch):
    # --interleave keeps all graphs alive together: one pool for them; a new one for the next call's graphs
    bench, calls, _ = fake_graphed_bench(monkeypatch, interleave=2)
    bench.interleaved_steps(["sdpa", "ra_same_flop"], None, 2, 8, compiled=False)
    bench.interleaved_steps(["sdpa", "ra_same_flop"], None, 2, 8, compiled=False)
    assert [r["status"] for r in bench.rows] == ["ok"] * 4
    pools = [pool for _, pool in calls]
    assert pools[0] is not None and pools[0] is pools[1] and pools[2] is pools[3] and pools[2] is not pools[0]


def test_failed_step_capture_skips_later_graphed_rows(monkeypatch, capsys):
    # a failed capture leaves the CUDA RNG unusable: no later capture (nor a model built on the GPU)
    bench, calls, built = fake_graphed_bench(monkeypatch, fail=("ra_same_flop",))
    for name in ("sdpa", "ra_same_flop", "ra_exact", "ra_ctr_headsel"):
        bench.step(name, None, 2, 8, compiled=False)
    sdpa, failed, *later = bench.rows
    assert sdpa["status"] == "ok"
    assert failed["status"].startswith("error: CaptureError: capturing the training step")
    assert "after the failed" not in failed["status"]  # its own error, not one after a failed capture
    assert bench.capture_failed == "ra_same_flop (eager+graph)"
    for r in later:
        assert r["status"] == ("skipped: the CUDA-graph capture of ra_same_flop (eager+graph) failed earlier in this "
                               f"process and leaves the CUDA RNG unusable; rerun with --variants {r['variant']}"), r
        assert r["ms"] is None
    assert built == [c[0] for c in calls] == ["sdpa", "ra_same_flop"]  # nothing built or captured after the failure
    err = capsys.readouterr().err
    assert "[bench] ra_same_flop (model, step) failed" in err and err.count("failed:") == 1  # a skip prints nothing


FAKE_SMI = """#!/bin/sh
# a stand-in for nvidia-smi: checks that it was asked for one GPU by id, then prints samples until stopped
[ "$1" = "-i" ] && [ "$2" = "GPU-fake" ] || { echo "unexpected arguments: $*" >&2; exit 2; }
echo "1500, 300.00, 10"
while true; do echo "1740, 693.50, 100"; echo "[N/A], [N/A], [N/A]"; echo "1755, 691.00, 97"; sleep 0.02; done
"""


def fake_nvidia_smi(tmp_path, monkeypatch):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{os.environ['PATH']}")


def test_clock_sampler_parses_busy_samples_and_records_nothing_without_nvidia_smi(tmp_path, monkeypatch):
    from benchmarks import clocks

    assert clocks.parse("1740, 693.5, 100\n[N/A], [N/A], [N/A]\nwarning\n") == [(1740.0, 693.5, 100.0)]
    assert clocks.summary([(1500.0, 300.0, 10.0)]) is None  # only an idle sample: nothing to report
    fake_nvidia_smi(tmp_path, monkeypatch)
    sampler = clocks.Sampler("GPU-fake", period_ms=20)
    for _ in range(2):  # two blocks (rounds) accumulate
        with sampler:
            time.sleep(0.3)
    got = clocks.summary(sampler.samples)
    assert sampler.enabled and got["n"] >= 4 and got["sm_mhz"] in (1740.0, 1747.5, 1755.0) and 690 < got["power_w"] < 694
    assert all(s[2] >= 90 for s in sampler.samples if s[0] != 1500.0)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    off = clocks.Sampler("GPU-fake")
    with off:
        pass
    assert not off.enabled and off.samples == [] and not clocks.Sampler(None).enabled


def test_clocks_of_interleaved_rounds_reach_the_rows_and_the_profile_table(tmp_path, monkeypatch):
    from benchmarks import clocks, runner

    fake_nvidia_smi(tmp_path, monkeypatch)
    monkeypatch.setattr(clocks, "gpu_id", lambda device: "GPU-fake")
    fake, _, _ = fake_graphed_bench(monkeypatch, interleave=2, clocks=True)
    monkeypatch.setattr(runner, "time_ms", lambda fn, warmup, reps, dev: (fn(), time.sleep(0.3), 1.0)[2])
    fake.interleaved_steps(["sdpa", "ra_same_flop"], None, 2, 8, compiled=False)
    for r in fake.rows:  # two rounds of 0.3 s each, sampled every 100 ms
        assert r["status"] == "ok" and r["clocks"]["timed"]["n"] >= 2 and 690 < r["clocks"]["timed"]["power_w"] < 694
    rows = [dict(r, profile=dict(categories={"gemm": 1.0}, top=[], total_ms=1.0)) for r in fake.rows]
    table = bench.profile_table(rows)
    assert "SM clock and power" in table and "MHz" in table and "no samples" in table  # no --profile samples here


def test_clocks_needs_a_gpu_and_interleave(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--what", "step", "--clocks", "--interleave", "2"])
    assert "--clocks samples a GPU's clock" in capsys.readouterr().err
