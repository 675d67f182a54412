"""
The quality ladder behind quick_quality_test.py (the CLI) and compare.py (the report from run folders):
  plan.py        variants, each rung's train.py flags, one run per variant and seed, --gpus
  state.py       the dataset prepared once; a ladder folder's corpus and flags (ladder_state.json); reuse/resume
  init_check.py  whether each variant starts from sdpa's initial weights
  workers.py     running the runs: in this process, `python train.py` per run, or spread over GPUs
  worker.py      one GPU worker process (`python -m ladder.worker JOB.json`)
  runs.py        run folders -> run dicts (curves, clock, ms/step, sanity checks); runs grouped into variants
  results.py     the comparison: per variant and paired by seed against the baseline
  verdicts.py    the roadmap's decision tree
  report.py      results.md, results.json and the plots
  stats.py       paired CIs, MDE, seeds needed, speed ratios
  plots.py       val loss curves and per-head gate heatmaps
  variants.py    what the ladder reads from an attention class
"""
