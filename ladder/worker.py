"""
One ladder worker: `python -m ladder.worker JOB.json` (quick_quality_test.py starts it, with
CUDA_VISIBLE_DEVICES set to one GPU). Runs the job's train.py runs in turn in this process, so the
seeds of one variant share one torch.compile build. Exit status 130 when a run was interrupted (it
checkpointed; the ladder resumes it next time), else 0, or 1 when a run failed.
"""

import json
import sys
from pathlib import Path

from ladder.workers import OK_STATUSES, run_inprocess  # workers.py starts it in the repo root


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m ladder.worker JOB.json (quick_quality_test.py writes and starts it)")
    job = json.loads(Path(argv[0]).read_text())
    failed = False
    for k, r in enumerate(job["runs"]):
        run_dir = Path(r["run_dir"])
        head = f"{Path(run_dir).name} ({k + 1}/{len(job['runs'])})"
        print(f"{head}: {'resuming' if '--resume' in r['argv'] else 'starting'}", flush=True)
        extra = {"gpu": job.get("gpu"), **({"repeat_of": r["repeat_of"]} if r.get("repeat_of") else {})}
        try:
            rec = run_inprocess(r["argv"], run_dir, r["attn"], r["seed"], job.get("verbose", False), extra,
                                launch="worker", reset_compile=False)  # later seeds reuse the compiled step
        except KeyboardInterrupt:
            print(f"{head}: interrupted before train.py's handler was in place", flush=True)
            return 130
        print(f"{head}: {rec['status']} in {rec['wall_s']:.1f} s", flush=True)
        if rec["status"].startswith("stopped by signal"):
            return 130
        if rec["returncode"] != 0:
            failed = True
            print("    " + "\n    ".join(rec.get("error_tail", [])[-12:]), flush=True)
        if job.get("drop_ckpt") and rec["status"] in OK_STATUSES:
            (run_dir / "ckpt.pt").unlink(missing_ok=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
