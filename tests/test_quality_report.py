"""The quality ladder's numbers: its statistics against scipy and hand-computed values, the MDE and
seeds-needed logic, and the verdicts, repeats, pooled spread, gate plots and reports it builds from hand-made
run folders (tests/test_quality.py runs the ladder itself)."""

import json
import math

import pytest
from scipy import stats

import attention
from data.synthetic import reference_losses
from ladder import plots
from ladder import stats as ls
from ladder.report import render_tables, write_report
from ladder.results import build_results
from ladder.runs import discover_runs, load_run, run_passes

# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("p, df, t", [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764),
                                      (0.975, 9, 2.2622), (0.975, 29, 2.0452), (0.95, 5, 2.0150)])
def test_t_quantile_matches_tables(p, df, t):
    assert ls.t_quantile(p, df) == pytest.approx(t, abs=1e-4)


def test_paired_ci_by_hand_and_undecided():
    base = {1: 3.00, 2: 3.10, 3: 3.20}
    var = {1: 3.01, 2: 3.13, 3: 3.19}  # d = +0.01, +0.03, -0.01: mean 0.01, sd 0.02
    d = ls.paired_delta(var, base)
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)  # = 0.049683
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.01) and d["sd"] == pytest.approx(0.02)
    assert d["half_width"] == pytest.approx(half) and half == pytest.approx(0.049683, abs=1e-6)
    assert d["lo"] == pytest.approx(0.01 - half) and d["hi"] == pytest.approx(0.01 + half)
    # a CI that contains 0 is undecided; at sd 0.02 the CI half-width drops below 0.01 at n = 18:
    # t(0.975, 16) * 0.02 / sqrt(17) = 0.01028, t(0.975, 17) * 0.02 / sqrt(18) = 0.00995
    assert d["verdict"] == "undecided" and d["seeds_needed"] == 18
    assert "~18 seeds would decide its sign" in ls.decide_note(d)


def test_seeds_needed_edges():
    assert ls.seeds_needed(0.0, 0.02) is None  # a zero mean is never decided
    assert ls.seeds_needed(0.01, 0.0) == 2  # no spread: two seeds give a zero-width CI
    assert ls.seeds_needed(1e-6, 0.5) is None  # far below the spread: more than MAX_SEEDS
    for mean, sd in ((0.01, 0.02), (-0.03, 0.01), (0.1, 0.3)):
        n = ls.seeds_needed(mean, sd)
        assert ls.half_width(sd, n) < abs(mean) and (n == 2 or ls.half_width(sd, n - 1) >= abs(mean))


def test_paired_ci_worse_and_better():
    base = {1: 3.0, 2: 3.0, 3: 3.0}
    worse = ls.paired_delta({1: 3.10, 2: 3.12, 3: 3.11}, base)  # d mean 0.11, sd 0.01: 0.11 -+ 4.3027 * 0.01 / sqrt(3)
    assert worse["lo"] == pytest.approx(0.085158, abs=1e-6) and worse["hi"] == pytest.approx(0.134842, abs=1e-6)
    assert worse["verdict"] == "worse" and ls.decide_note(worse) == ""
    better = ls.paired_delta({1: 2.90, 2: 2.88, 3: 2.89}, base)
    assert better["verdict"] == "better" and better["hi"] < 0


def test_pairing_removes_the_seed_to_seed_spread():
    # seeds differ by 0.5 nats, the variant is 0.010-0.012 lower on every seed: paired, that is a clear win
    base = {1: 3.0, 2: 3.5, 3: 4.0, 4: 9.9}  # seed 4 has no variant run: left out of the pairing
    var = {1: 2.990, 2: 3.488, 3: 3.989}
    d = ls.paired_delta(var, base)
    assert d["n"] == 3 and d["seeds"] == [1, 2, 3]
    assert d["mean"] == pytest.approx(-0.011) and d["verdict"] == "better"


def test_one_seed_has_no_ci_and_no_seed_is_not_run():
    d = ls.paired_delta({7: 2.9}, {7: 3.0})
    assert d["n"] == 1 and d["lo"] is None and d["half_width"] is None and d["verdict"] == "n=1, no CI"
    assert ls.paired_delta({1: 2.9}, {2: 3.0})["verdict"] == "not run"


def test_interp():
    assert ls.interp([0, 10, 20], [4.0, 3.0, 2.0], 15) == pytest.approx(2.5)
    assert ls.interp([0, 10, 20], [4.0, 3.0, 2.0], 20) == pytest.approx(2.0)
    assert ls.interp([5, 10], [4.0, 3.0], 4) is None and ls.interp([5, 10], [4.0, 3.0], 11) is None


def test_reference_losses_by_hand():
    ref = reference_losses("recall", 8, 24, 0.5)
    # per document: ln26 (key) + ln17 (length) + 16 (ln2 + 0.5 ln26); tokens 3 + 16 * 1.5 = 27
    ideal = (math.log(26) + math.log(17) + 16 * (math.log(2) + 0.5 * math.log(26))) / 27
    assert ref["ideal"] == pytest.approx(ideal)
    assert ref["no_attention_bound"] == pytest.approx(ideal + 16 * 0.5 * math.log(26) / 27)


# ----------------------------------------------------------------------------- verdicts from made-up run folders

def fake_run(root, attn, seed, vals, ms=10.0, ra_R=8, gates=None, status="done", head_gates=None, name=None,
             repeat_of=None):
    """A run folder like train.py's: evals every 10 steps with the given val losses, ms per step constant.
    gates: {metric: value} logged as attn/mean/NAME and attn/l0/NAME at every step, or {metric: [value per
    eval]}; head_gates(step) -> the "gates" record {"l{i}/{gate}": [per head]} of that step."""
    d = root / (name or f"{attn}-s{seed}")
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"attn": attn, "seed": seed, "ra_R": ra_R, "lr": 1e-3,
                                               "ra_w_rec_init": 0.3, "run_name": d.name, "out_dir": str(root)}))
    lines = []
    for i, v in enumerate(vals, 1):
        step = 10 * i
        g = {k: (x[i - 1] if isinstance(x, list) else x) for k, x in (gates or {}).items()}
        rec = {"step": step, "loss": v + 0.1, "ms_per_step": ms, "train_time_s": step * ms / 1000,
               **{f"attn/mean/{k}": x for k, x in g.items()}, **{f"attn/l0/{k}": x for k, x in g.items()}}
        if head_gates:
            rec["gates"] = head_gates(step)
        lines.append(rec)
        lines.append({"step": step, "val_loss": v, "train_time_s": step * ms / 1000})
    (d / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "summary.json").write_text(json.dumps({"status": status, "step": 10 * len(vals),
                                                "train_time_s": 10 * len(vals) * ms / 1000}))
    if repeat_of:
        (d / "ladder_run.json").write_text(json.dumps({"attn": attn, "seed": seed, "status": status,
                                                       "repeat_of": repeat_of}))
    return d


def verdict_map(results):
    return {v["question"]: v["answer"] for v in results["verdicts"]}


def test_decision_tree_from_known_numbers(tmp_path):
    for seed, off in zip((1, 2, 3), (0.0, 0.3, 0.6)):  # big seed-to-seed spread, small paired differences
        fake_run(tmp_path, "sdpa", seed, [4.0 + off, 3.0 + off, 2.50 + off], ms=10)
        fake_run(tmp_path, "ra_same_flop", seed, [4.0 + off, 3.0 + off, 2.50 + off + 0.001 * seed], ms=13)
        fake_run(tmp_path, "ra_headsel", seed, [3.9 + off, 2.9 + off, 2.40 + off + 0.001 * seed], ms=10,
                 gates={"ra_frac": 0.5, "w_rec": 0.2})
    runs = [load_run(d) for d in discover_runs([tmp_path])]
    res = build_results(runs, order=attention.names())
    assert [v["label"] for v in res["variants"]][0] == "sdpa"
    sf = next(v for v in res["variants"] if v["attn"] == "ra_same_flop")
    assert sf["vs_baseline"]["mean"] == pytest.approx(0.002) and sf["vs_baseline"]["verdict"] == "undecided"
    assert sf["vs_baseline"]["half_width"] == pytest.approx(4.302653 * 0.001 / math.sqrt(3))  # t(0.975, 2) sd/sqrt(n)
    assert sf["ms_ratio"] == pytest.approx(1.3)
    v = verdict_map(res)
    assert v["R=8 keeps val loss (within noise)?"] == "YES"  # the CI lies below the margin: keeps, not a win
    assert v["head-selective helps?"] == "YES"  # 0.1 lower than ra_same_flop on every seed, not worse than sdpa
    # equal time: every run of 30 steps at 10 ms ends at 0.3 s: ra_headsel is 0.097-0.099 lower there
    hs = next(v for v in res["variants"] if v["attn"] == "ra_headsel")
    t = hs["vs_baseline_at_time"]
    assert t["time_s"] == pytest.approx(0.3) and t["verdict"] == "better"
    assert v["quality-per-ms better than baseline? [ra_headsel]"] == "YES"
    # ra_same_flop at 13 ms/step is at step 23 at 0.3 s: val interpolated between 3.0 (0.26 s) and 2.5 (0.39 s)
    sf_t = sf["vs_baseline_at_time"]
    assert sf_t["mean"] == pytest.approx(3.0 - 0.5 * 0.04 / 0.13 - 2.5 + 0.002 * 0.04 / 0.13, abs=1e-9)
    assert v["quality-per-ms better than baseline? [ra_same_flop]"] == "NO (worse)"
    md = render_tables(res)
    assert "| ra_headsel | 3/3 |" in md and "undecided (MDE ±0.0025, n=3): ~" in md
    assert "MDE ±0.0025 nats (n=3 seeds)" in md  # what this ladder resolves
    assert "- ra_headsel: " in md and "ra_w_rec_init=0.3" in md  # the settings its class reads
    assert "RA heads on to the end (ra_frac 0.50" in md


def test_keeping_the_loss_needs_a_narrow_ci_and_faster_needs_a_speed_ci(tmp_path):
    # ra_same_flop: d = -0.5, +0.4, 0.0 -> "undecided" in the table, and far too wide to say it keeps the loss
    # ra_headsel: equal to ra_same_flop within 0.001 on every seed, and 20-22% faster on every seed
    for seed, d in zip((1, 2, 3), (-0.5, 0.4, 0.0)):
        fake_run(tmp_path, "sdpa", seed, [4.0, 3.0], ms=10)
        fake_run(tmp_path, "ra_same_flop", seed, [4.0, 3.0 + d], ms=10)
        fake_run(tmp_path, "ra_headsel", seed, [4.0, 3.0 + d + 0.001 * (seed - 2)], ms=8 - 0.1 * seed)
    res = build_results([load_run(d) for d in discover_runs([tmp_path])])
    sf = next(v for v in res["variants"] if v["attn"] == "ra_same_flop")
    assert sf["vs_baseline"]["verdict"] == "undecided"
    v = verdict_map(res)
    assert v["R=8 keeps val loss (within noise)?"] == "UNDECIDED"
    detail = res["verdicts"][0]["detail"]
    assert "too wide to tell" in detail and "MDE ±" in detail and "n=3" in detail
    # within the margin of ra_same_flop and faster (CI), but not shown to keep sdpa's loss: undecided
    assert "faster" in res["verdicts"][1]["detail"] and v["head-selective helps?"] == "UNDECIDED"
    s = ls.speed_ratio([load_run(tmp_path / f"ra_headsel-s{i}") for i in (1, 2, 3)],
                       [load_run(tmp_path / f"ra_same_flop-s{i}") for i in (1, 2, 3)])
    assert s["ratio"] == pytest.approx((7.9 * 7.8 * 7.7 / 1000) ** (1 / 3)) and s["hi"] < 1 and s["verdict"] == "faster"


def test_verdicts_say_not_run_and_n1(tmp_path):
    fake_run(tmp_path, "sdpa", 1, [3.0, 2.5])
    fake_run(tmp_path, "ra_same_flop", 1, [3.0, 2.6], ra_R=12)
    res = build_results([load_run(d) for d in discover_runs([tmp_path])])
    v = verdict_map(res)
    assert v["R=12 keeps val loss (within noise)?"] == "UNDECIDED"
    assert "n=1, no CI" in res["verdicts"][0]["detail"] and "asks about R=8" in res["verdicts"][0]["detail"]
    assert v["head-selective helps?"] == "not run"


def test_r_sweep_gives_one_verdict_per_r(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path, "sdpa", seed, [3.0, 2.5 + 0.01 * seed])
        for R in (4, 12):
            fake_run(tmp_path, "ra_same_flop", seed, [3.0, 2.5 + 0.01 * seed + 0.001 * R], ra_R=R,
                     name=f"ra_same_flop-ra_R{R}-s{seed}")
    res = build_results([load_run(d) for d in discover_runs([tmp_path])], order=attention.names())
    assert [v["label"] for v in res["variants"]] == ["sdpa", "ra_same_flop (ra_R=12)", "ra_same_flop (ra_R=4)"]
    qs = [q for q in verdict_map(res) if "keeps val loss" in q]
    assert qs == ["R=12 keeps val loss (within noise)? [ra_same_flop (ra_R=12)]",
                  "R=4 keeps val loss (within noise)? [ra_same_flop (ra_R=4)]"]


def test_gate_out_of_range_fails_the_sanity_check(tmp_path):
    # the ranges come from the class: HeadSelRA.gate_ranges has ra_frac in [0, 1] and w_rec >= 0
    assert attention.get_class("ra_headsel").gate_ranges["ra_frac"] == (0.0, 1.0)
    run = load_run(fake_run(tmp_path, "ra_headsel", 1, [3.0, 2.5], gates={"ra_frac": 1.5, "w_rec": 0.2}))
    assert run["checks"]["gates in range"]["ok"] is False and not run_passes(run)
    assert "ra_frac" in run["checks"]["gates in range"]["detail"]
    # a per-head gate below its range in the "gates" records, while the layer means look fine
    run = load_run(fake_run(tmp_path / "b", "ra_same_flop", 1, [3.0, 2.5], gates={"w_rec": 0.2},
                            head_gates=lambda s: {"l0/w_rec": [0.3, -0.1 if s == 20 else 0.1]}))
    assert run["checks"]["gates in range"]["ok"] is False
    assert "gates/l0/w_rec[1]=-0.1 at step 20" in run["checks"]["gates in range"]["detail"]
    run = load_run(fake_run(tmp_path / "c", "ra_same_flop", 1, [3.0, 2.5],
                            head_gates=lambda s: {"l0/w_rec": [float("nan"), 0.1]}))
    assert run["checks"]["finite"]["ok"] is False


def headsel_gates(n_layer=2, n_head=3, off_at=20):
    """Per-head gates of a head-selective run whose heads all switch off at step off_at."""
    def at(step):
        on = 1.0 if step < off_at else 0.0
        return {**{f"l{i}/w_rec": [0.3 - 0.01 * step * (h + 1) / 10 for h in range(n_head)] for i in range(n_layer)},
                **{f"l{i}/ra_on": [on] * n_head for i in range(n_layer)}}
    return at


def test_gate_plots_and_heads_off_from_synthetic_logs(tmp_path):
    runs_dir = tmp_path / "runs"
    for seed in (1, 2):
        fake_run(runs_dir, "sdpa", seed, [4.0, 3.0, 2.9, 2.8])
        fake_run(runs_dir, "ra_headsel", seed, [4.0, 3.0, 2.9, 2.8], gates={"ra_frac": [1.0, 0.0, 0.0, 0.0]},
                 head_gates=headsel_gates())
    runs = [load_run(d) for d in discover_runs([runs_dir])]
    hs = next(r for r in runs if r["attn"] == "ra_headsel")
    assert hs["heads_off"] == {"step": 20, "stayed": True, "final": 0.0}
    steps, rows, labels = plots.gate_matrix(hs["gate_history"], "w_rec")
    assert steps == [10, 20, 30, 40] and len(rows) == 2 * 3 and labels == ["l0", "", "", "l1", "", ""]
    assert rows[4][1] == pytest.approx(0.3 - 0.01 * 20 * 2 / 10)  # layer 1, head 1, step 20
    out = tmp_path / "report"
    res, md = write_report(runs, out, order=attention.names())
    assert "gates_ra_headsel.png" in res["meta"]["plots"] and "gates_sdpa.png" not in res["meta"]["plots"]
    assert (out / "gates_ra_headsel.png").stat().st_size > 5000
    assert "ra_headsel seed 1: every RA head switched off: ra_frac reached 0 at step 20 and stayed 0" in md


def test_repeat_is_reported_as_noise_not_as_a_seed(tmp_path):
    for seed in (1, 2):
        fake_run(tmp_path, "sdpa", seed, [3.0, 2.5 + 0.01 * seed])
        fake_run(tmp_path, "ra_same_flop", seed, [3.0, 2.52 + 0.01 * seed])
    fake_run(tmp_path, "sdpa", 1, [3.002, 2.513], name="sdpa-s1-repeat", repeat_of="sdpa-s1")
    res = build_results([load_run(d) for d in discover_runs([tmp_path])])
    base = res["variants"][0]
    assert base["label"] == "sdpa" and base["n_runs"] == 2  # the repeat is not a third sdpa seed
    (rep,) = res["repeats"]
    assert rep["of"] == "sdpa-s1" and rep["diff"] == pytest.approx(0.003)
    assert rep["max_abs_curve_diff"] == pytest.approx(0.003) and rep["at_step"] == 20
    md = render_tables(res)
    assert "same-seed repeat (sdpa seed 1, another process): final val 2.5100 then 2.5130, Δ = +0.0030 nats" in md


def test_same_seed_twice_without_a_ladder_is_a_repeat(tmp_path):
    """compare.py on hand-made run folders: a second run of one config and seed is a repeat of the first
    (by folder name), not a second copy of that seed in the paired statistics."""
    for seed in (1, 2):
        fake_run(tmp_path, "sdpa", seed, [3.0, 2.5 + 0.01 * seed])
        fake_run(tmp_path, "ra_same_flop", seed, [3.0, 2.52 + 0.01 * seed])
    fake_run(tmp_path, "sdpa", 1, [3.0, 2.6], name="sdpa-s1-zagain")
    res = build_results([load_run(d) for d in discover_runs([tmp_path])])
    base = res["variants"][0]
    assert base["n_runs"] == 2 and base["final_val"] == {1: pytest.approx(2.51), 2: pytest.approx(2.52)}
    (rep,) = res["repeats"]
    assert rep["name"] == "sdpa-s1-zagain" and rep["of"] == "sdpa-s1" and rep["diff"] == pytest.approx(0.09)


def test_pooled_paired_spread_over_the_undecided_variants(tmp_path):
    """The paired differences' spread pooled over variants whose CI contains 0 (a clearly worse one left
    out), and the MDE that 3, 5 and 8 seeds would reach at it."""
    base = {1: 2.50, 2: 2.60, 3: 2.55}
    for seed, v in base.items():
        fake_run(tmp_path, "sdpa", seed, [3.0, v])
    for seed, d in zip((1, 2, 3), (0.01, -0.01, 0.0)):  # mean 0, sum of squares 2e-4, 2 dof
        fake_run(tmp_path, "ra_same_flop", seed, [3.0, base[seed] + d])
    for seed, d in zip((1, 2), (0.02, 0.0)):  # mean 0.01, sum of squares 2e-4, 1 dof
        fake_run(tmp_path, "ra_headsel", seed, [3.0, base[seed] + d])
    for seed, d in zip((1, 2, 3), (1.0, 1.01, 0.99)):  # worse: not the rung's noise
        fake_run(tmp_path, "ra_exact", seed, [3.0, base[seed] + d])
    res = build_results([load_run(d) for d in discover_runs([tmp_path])])
    r = res["resolution"]
    assert sorted(r["pooled_over"]) == ["ra_headsel", "ra_same_flop"] and r["pooled_dof"] == 3
    sd = math.sqrt(4e-4 / 3)
    assert r["pooled_sd"] == pytest.approx(sd)
    assert r["pooled_mde"][5] == pytest.approx(stats.t.ppf(0.975, 4) * sd / math.sqrt(5))
    assert "sd 0.0115 nats (3 degrees of freedom)" in render_tables(res)


def test_a_field_added_later_is_its_default_in_older_run_folders(tmp_path):
    """A run folder made before a config field existed (no such key in its config.json) is the same variant
    as a new run that leaves the field at its default: one sdpa with two seeds, not two variants."""
    old = fake_run(tmp_path, "sdpa", 1, [3.0, 2.50])
    new = fake_run(tmp_path, "sdpa", 2, [3.0, 2.52])
    cfg = json.loads((new / "config.json").read_text())
    (new / "config.json").write_text(json.dumps({**cfg, "ra_quant": "none", "grad_accum": 1}))  # both defaults
    assert "ra_quant" not in json.loads((old / "config.json").read_text())
    res = build_results([load_run(d) for d in discover_runs([tmp_path])])
    assert [(v["label"], v["n_runs"]) for v in res["variants"]] == [("sdpa", 2)]


def test_same_run_name_in_two_ladders_is_a_repeat_of_the_other_folder(tmp_path):
    """Two ladders pooled by compare.py both hold sdpa-s1: the repeat is measured against the other folder's
    run, not against itself."""
    for ladder, val in (("a", 2.51), ("b", 2.54)):
        fake_run(tmp_path / ladder, "sdpa", 1, [3.0, val])
    fake_run(tmp_path / "a", "ra_same_flop", 1, [3.0, 2.53])
    res = build_results([load_run(d) for d in discover_runs([tmp_path / "a", tmp_path / "b"])])
    (rep,) = res["repeats"]
    assert rep["name"] == rep["of"] == "sdpa-s1"
    assert rep["final_val"] == pytest.approx(2.54) and rep["original_final_val"] == pytest.approx(2.51)
    assert rep["diff"] == pytest.approx(0.03)
