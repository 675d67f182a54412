"""
Running the ladder's train.py runs: in this process, one `python train.py` per run, or spread over GPUs.

Over GPUs (--launch workers, --gpus N): the runs still to do are grouped into jobs, one per variant
(all its seeds; a --repeat run is a job of its own, so it runs in another process than the run it
repeats). At most N jobs run at once, each in a worker process `python -m ladder.worker JOB.json` with
CUDA_VISIBLE_DEVICES set to one GPU; a worker calls train.main(argv) for its seeds in turn, so
torch.compile builds the variant's step once and later seeds reuse it (the graphs do not depend on
the weights' values). Jobs go longest first to whichever GPU is free. Every run writes its folder as
in the other modes (train.log, ladder_run.json), so an interrupted ladder resumes by re-running the
same command: finished runs are reused, interrupted ones resume from their checkpoint.
"""

import contextlib
import gc
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from ladder.report import fmt
from ladder.runs import OK_STATUSES, load_run

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- one run in this process

class _Tee(io.TextIOBase):
    """train.py's output (in-process) into train.log, echoing its val lines (all lines with verbose)."""

    def __init__(self, log, verbose, prefix=""):
        self.log, self.verbose, self.prefix, self.buf, self.tail = log, verbose, prefix, "", []

    def write(self, text):
        self.log.write(text)
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            echo(line, self.verbose, self.prefix)
            self.tail = (self.tail + [line])[-30:]
        return len(text)

    def flush(self):
        self.log.flush()


def echo(line, verbose, prefix=""):
    if verbose or "val loss" in line or line.startswith(("stopping", "time budget")):
        print(f"    {prefix}{line.rstrip()}", file=sys.__stdout__, flush=True)


def record(run_dir, attn, seed, argv, rc, t0, tail, forced_status, launch, extra=None):
    """Write RUN_DIR/ladder_run.json: how the ladder ran this run and how it ended."""
    summary = run_dir / "summary.json"
    if forced_status:
        status = forced_status
    else:
        status = json.loads(summary.read_text())["status"] if summary.exists() else f"failed (exit {rc})"
    rec = {"attn": attn, "seed": seed, "argv": argv, "launch": launch, "returncode": rc, "status": status,
           "wall_s": round(time.time() - t0, 1), "log": "train.log", **(extra or {})}
    if rc != 0:
        rec["error_tail"] = tail
    (run_dir / "ladder_run.json").write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def start_marker(run_dir, attn, seed, extra=None):
    """A ladder_run.json before the run starts, so a report of an unfinished ladder knows a --repeat run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ladder_run.json").write_text(json.dumps({"attn": attn, "seed": seed, "status": "running",
                                                         **(extra or {})}, indent=2) + "\n")


def run_inprocess(argv, run_dir, attn, seed, verbose=False, extra=None, launch="inprocess", prefix="",
                  reset_compile=True):
    """train.main(ARGV) in this process: the same code path as `python train.py`, without its start-up.
    reset_compile: drop torch.compile's caches afterwards (the next run builds another variant)."""
    import torch

    import train

    start_marker(run_dir, attn, seed, extra)
    t0 = time.time()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ python train.py {shlex.join(argv)}   (in-process: {launch})\n")
        tee = _Tee(log, verbose, prefix)
        try:
            with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(tee):
                rc = train.main(argv)
        except train.RunError as e:  # a run that cannot start, with a message that says why: no traceback
            tee.write(f"error: {e}\n")
            rc = 1
        except Exception:  # noqa: BLE001 - a broken variant is a result to report, not the end of the ladder
            tee.write(traceback.format_exc() + "\n")
            rc = 1
        except SystemExit as e:  # train.py's own clear errors (e.g. a locked run folder)
            tee.write(f"{e}\n")
            rc = e.code if isinstance(e.code, int) else 1
        finally:
            for sig, handler in handlers.items():  # train.main installs its own SIGINT/SIGTERM handlers
                signal.signal(sig, handler)
            tee.flush()
    if reset_compile:
        torch._dynamo.reset()  # a fresh torch.compile cache for the next variant: no cache-limit fallback to eager
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record(run_dir, attn, seed, argv, rc, t0, tee.tail, None, launch, extra)


# ----------------------------------------------------------------------------- one `python train.py` per run

def run_subprocess(argv, run_dir, attn, seed, args, extra=None):
    """One `python train.py ARGV`; its output goes to RUN_DIR/train.log. Writes RUN_DIR/ladder_run.json."""
    start_marker(run_dir, attn, seed, extra)
    cmd = [sys.executable, str(ROOT / "train.py"), *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    timeout = 60 * args.run_timeout_min if args.run_timeout_min > 0 else None
    tail, timed_out = [], threading.Event()
    with open(run_dir / "train.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

        def kill():  # train.py checkpoints on SIGTERM, so a later ladder with the same --out-dir resumes it
            timed_out.set()
            proc.terminate()

        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-30:]
                echo(line, args.verbose)
            rc = proc.wait()
        except KeyboardInterrupt:  # pass it on (a terminal's Ctrl-C reaches both): train.py checkpoints and exits
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
    forced = f"timed out after {args.run_timeout_min:g} min" if timed_out.is_set() else None
    return record(run_dir, attn, seed, argv, rc, t0, tail, forced, "subprocess", extra)


def run_sequential(todo, args):
    """The runs one after another in this process (inprocess) or as `python train.py` (subprocess).
    Returns 130 when interrupted, else 0."""
    for k, run in enumerate(todo):
        run_dir, head = Path(run["run_dir"]), f"[{k + 1}/{len(todo)}] {Path(run['run_dir']).name}"
        extra = {"repeat_of": run["repeat_of"]} if run["repeat_of"] else None
        print(f"{head}: python train.py {shlex.join(run['argv'])}" +
              ("  (in-process)" if args.launch == "inprocess" else ""), flush=True)
        try:
            if args.launch == "inprocess":
                rec = run_inprocess(run["argv"], run_dir, run["attn"], run["seed"], args.verbose, extra)
            else:
                rec = run_subprocess(run["argv"], run_dir, run["attn"], run["seed"], args, extra)
        except KeyboardInterrupt:
            rec = {"status": "stopped by signal 2"}
        if rec["status"].startswith("stopped by signal"):
            return 130
        r = load_run(run_dir)
        print(f"{head}: {rec['status']} in {rec['wall_s']:.1f} s, val {fmt(r['final_val'])}, "
              f"{fmt(r['ms_per_step'], 1)} ms/step", flush=True)
        if rec["returncode"] != 0:
            print("    " + "\n    ".join(rec.get("error_tail", [])[-12:]))
        if args.drop_ckpt and rec["status"] in OK_STATUSES:
            (run_dir / "ckpt.pt").unlink(missing_ok=True)
    return 0




# ----------------------------------------------------------------------------- GPUs and jobs

def visible_gpus():
    """How many GPUs this process sees (1 without CUDA: the CPU counts as one device)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def gpu_ids(n):
    """The CUDA_VISIBLE_DEVICES value of each of n workers: the first n of this process's own
    CUDA_VISIBLE_DEVICES list when it has one, else 0..n-1."""
    own = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return (own or [str(i) for i in range(n)])[:n]


def plan_jobs(runs):
    """Group the runs to do into jobs: [{"key", "runs"}], one per variant and one per --repeat run, in
    the order of their first run; then longest first (more runs, then more attention FLOPs; a stable
    sort), so the last jobs to start are short. A run is a dict with "key" (its variant), "attn" and
    optionally "repeat_of"."""
    from ladder.variants import flop_mult

    jobs = {}
    for r in runs:
        key = r["key"] + (f" (repeat of {r['repeat_of']})" if r.get("repeat_of") else "")
        jobs.setdefault(key, {"key": key, "runs": []})["runs"].append(r)
    return sorted(jobs.values(), key=lambda j: (-len(j["runs"]), -flop_mult(j["runs"][0]["attn"])))


def run_pool(jobs, gpus, job_dir, verbose=False, drop_ckpt=False, launch_worker=None):
    """Run the jobs on len(gpus) workers at once, one per GPU id in gpus. Returns (records, interrupted).
    launch_worker(job_file, gpu) -> Popen is replaceable for tests (default: python -m ladder.worker)."""
    launch_worker = launch_worker or _launch_worker
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    queue = list(jobs)
    lock, stop, procs, records = threading.Lock(), threading.Event(), {}, []

    def serve(gpu):
        while not stop.is_set():
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            name = "job-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in job["key"]) + ".json"
            job_file = job_dir / name
            job_file.write_text(json.dumps({"runs": job["runs"], "verbose": verbose, "drop_ckpt": drop_ckpt,
                                            "gpu": gpu}, indent=2, default=str))
            print(f"[gpu {gpu}] {job['key']}: {len(job['runs'])} run(s) in one worker "
                  f"({', '.join(Path(r['run_dir']).name for r in job['runs'])})", flush=True)
            proc = launch_worker(job_file, gpu)
            with lock:
                procs[gpu] = proc
            if interrupt.is_set():  # launched while the pool was stopping
                proc.send_signal(signal.SIGINT)
            for line in proc.stdout:
                print(f"[gpu {gpu}] {line.rstrip()}", flush=True)
            rc = proc.wait()
            with lock:
                procs.pop(gpu, None)
            for r in job["runs"]:
                rec_path = Path(r["run_dir"]) / "ladder_run.json"
                rec = json.loads(rec_path.read_text()) if rec_path.exists() else {"status": "not started"}
                records.append({**rec, "gpu": gpu, "run_dir": r["run_dir"]})
            if rc == 130:  # the worker was interrupted: its run checkpointed, stop handing out jobs
                stop.set()

    # Ctrl-C (or `timeout -s INT`, which signals the ladder and then its whole process group, so the ladder
    # gets two) only sets a flag: a KeyboardInterrupt raised inside the shutdown would leave the workers
    # running unwatched. The workers get the signal from the terminal too; passed on once in case not.
    interrupt = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, lambda *_: interrupt.set()) if in_main else None
    threads = [threading.Thread(target=serve, args=(g,), daemon=True) for g in gpus]
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and not interrupt.is_set():
            for t in threads:
                t.join(0.2)
        if interrupt.is_set():
            stop.set()
            with lock:
                live = list(procs.values())
            for p in live:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT)
            for t in threads:
                t.join()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, old_handler)
    interrupted = interrupt.is_set()
    return records, interrupted or stop.is_set()


def _launch_worker(job_file, gpu):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ladder.worker", str(job_file)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
