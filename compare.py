"""
Rebuild the quality ladder's table, verdicts and plots from local run folders (no wandb needed):

    python compare.py runs/ladder-20250101-120000-short                 # one ladder
    python compare.py runs/ladder-A runs/ladder-B --out runs/compare-AB   # two ladders pooled
    python compare.py runs/sdpa-tiny-s1 runs/sdpa-tiny-s2 runs/ra_headsel-tiny-s1 runs/ra_headsel-tiny-s2

Arguments are run folders (train.py's: config.json + log.jsonl) or folders holding them (searched
recursively). Runs whose configs agree up to the seed (and bookkeeping such as run name, output folder,
wandb, log/eval/checkpoint intervals) are seeds of one variant; a variant is labelled by its attention
name, plus the options that tell apart variants of the same attention (e.g. "ra_same_flop (ra_R=12)").
The baseline is the sdpa variant (--baseline LABEL picks another). Deltas are paired by seed: give
each variant the same seeds. The report is ladder/report.py's, so the table of a ladder folder is
the one quick_quality_test.py wrote.

Writes results.json, results.md and the plots into --out (default runs/compare-<date>-<time>) and
prints the tables.
"""

import argparse
import sys
import time
from pathlib import Path

from ladder.report import render_tables, write_report
from ladder.results import MARGIN
from ladder.runs import discover_runs, load_run

ROOT = Path(__file__).resolve().parent


def _registry_order():
    try:
        import attention

        return attention.names()
    except Exception:  # noqa: BLE001 - the report works without the registry, only the row order changes
        return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="run folders, ladder folders, or folders of runs")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<date>-<time>)")
    p.add_argument("--baseline", default=None, help="variant label to compare against (default: sdpa)")
    p.add_argument("--time-axis", choices=("measured", "steady"), default="measured",
                   help="equal wall-clock on train_time_s, or on step x median ms/step (no stalls)")
    p.add_argument("--margin", type=float, default=MARGIN,
                   help="nats: \"keeps the val loss\" needs the 95%% CI of the difference below +MARGIN")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    try:
        dirs = discover_runs(args.paths)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    runs = [load_run(d) for d in dirs]
    out = Path(args.out) if args.out else ROOT / "runs" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    meta = {"command": "python compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sources": [str(d) for d in dirs]}
    try:
        results, _ = write_report(runs, out, baseline=args.baseline, order=_registry_order(), meta=meta,
                                  title="Comparison of run folders", plots=not args.no_plots,
                                  time_axis=args.time_axis, margin=args.margin)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"{len(runs)} runs in {len(results['variants'])} variants from {', '.join(args.paths)}\n")
    print(render_tables(results))
    print(f"wrote {out / 'results.md'}, results.json" +
          (f" and {', '.join(results['meta']['plots'])}" if results["meta"].get("plots") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
