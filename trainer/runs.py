"""
A run's folder, runs/<run-name>/: who may write it (RunLock: one process per folder; a folder that holds
a run is continued with --resume or moved aside with --overwrite, never written over), what a resume
restores (the checkpoint, the saved config, the log cut back to the checkpoint), the data it reads
(checked before the first step), and its log. Files are written atomically, through temp names unique to
the process.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

import torch

import attention
from model import GPTConfig
from trainer.config import ROOT, TrainConfig, check_config, flag

# files that mean a folder holds a run (the quality ladder puts its own train.log there first)
RUN_FILES = ("config.json", "log.jsonl", "ckpt.pt", "summary.json")
# flags whose saved value a resume keeps: they define the model, the data stream or the batches it draws
# (--grad-accum may change with the number of processes, as long as the global batch stays: check_world)
# --fsdp too: its checkpoint is another format (DCP shards) than ckpt.pt's whole state dicts
FIXED_ON_RESUME = ("preset", "dataset", "tokenizer", "seed", "batch_size", "fsdp") + tuple(
    f.name for f in dataclasses.fields(GPTConfig) if f.name not in ("vocab_size", "sdpa_backend"))


class RunError(Exception):
    """A run that cannot start or go on for a reason the message explains (python train.py prints it
    without a traceback; train.main callers such as the quality ladder get it as an exception)."""


def open_run(tc, mc, given, master, log, cleanup, world=1):
    """The run folder, locked by rank 0 until cleanup closes (a new run never writes into an old one), and
    the run's config: with --resume the checkpoint's, overridden only by the flags given now; world processes
    must read the checkpoint's global batch (check_world). Returns (tc, mc, run_dir, ckpt); ckpt is None for
    a new run."""
    run_name = tc.run_name or f"{mc.attn}-{tc.preset}-s{tc.seed}"
    run_dir = ROOT / tc.out_dir / run_name if not os.path.isabs(tc.out_dir) else Path(tc.out_dir) / run_name
    ckpt_path = run_dir / "ckpt.pt"
    if master:
        lock = RunLock(run_dir)
        cleanup.callback(lock.release)
        if lock.took_over:
            log(f"run folder: took over the lock of a run that is no longer running ({lock.took_over})")
    ckpt = None
    if tc.resume:
        if not ckpt_path.exists():
            raise RunError(f"--resume: no checkpoint at {ckpt_path} (check --out-dir and --run-name; a run stopped "
                           f"before its first checkpoint starts over with --overwrite)")
        ckpt = load_checkpoint(ckpt_path)
        tc, mc = resume_config(ckpt, tc, mc, given)
        try:  # the saved values with today's flags: e.g. a --cuda-graph run resumed with --device cpu
            check_config(tc, mc)
        except ValueError as e:
            raise RunError(f"--resume: {e} (the saved config is in {run_dir / 'config.json'}; a flag given now "
                           "overrides it)") from None
        check_world(ckpt, tc, world)
        log(f"resuming {run_name} from step {ckpt['step']}")
    else:
        found = [f for f in RUN_FILES if (run_dir / f).exists()]
        if found and not tc.overwrite:
            raise RunError(f"{run_dir} already holds a run ({', '.join(found)}). Continue it with --resume (and a "
                           f"larger --max-steps), start over with --overwrite (moves the old run to "
                           f"{run_name}.old-N), or pick another --run-name")
        if found and master:
            log(f"--overwrite: moved the old run to {move_aside(run_dir)}")
    return tc, mc, run_dir, ckpt


class RunLock:
    """An exclusive lock on a run folder (<run>/train.lock, flock'ed), so two processes never write the
    same run. The kernel drops a flock when its process dies, so a lock file left by a killed run is
    stale by construction and is taken over. release() is idempotent; the file names the holder."""

    def __init__(self, run_dir):
        self.path = run_dir / "train.lock"
        self.created_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd, self.took_over = None, None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunError(f"{run_dir} is in use by another run ({self.holder()}); wait for it to end or stop "
                               f"it, or pick another --run-name") from None
            try:  # the holder before us may have unlinked the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.read(fd, 4096).decode(errors="replace").strip()
            if old:
                self.took_over = old
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": datetime.datetime.now().isoformat(timespec="seconds")}).encode(), 0)
            self.fd = fd

    def holder(self):
        for _ in range(20):  # the holder writes its name just after it takes the lock
            try:
                h = json.loads(self.path.read_text())
                return f"pid {h['pid']} on {h['host']}, started {h['started']}; lock file {self.path}"
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        return f"lock file {self.path}"

    def release(self):
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            with contextlib.suppress(OSError):  # a run that stopped before writing anything leaves no folder
                self.path.parent.rmdir()


def move_aside(run_dir, keep=("train.lock",)):
    """--overwrite: move the old run's files into a new sibling <run>.old-N; returns that folder."""
    n = 1
    while (aside := run_dir.with_name(f"{run_dir.name}.old-{n}")).exists():
        n += 1
    aside.mkdir()
    for entry in sorted(run_dir.iterdir()):
        if entry.name not in keep:
            os.replace(entry, aside / entry.name)
    return aside


def cut_log(run_dir, ckpt_step, tc):
    """Resume: keep the log an uninterrupted run would have at ckpt_step. Lines written after the checkpoint
    (a kill -9) and off-grid lines at it (a run's last step, an eval at the time budget) move to
    log.discarded.jsonl, since the resumed run writes them again. Returns how many lines moved."""
    path = run_dir / "log.jsonl"
    if not path.exists():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec["step"])
        except (ValueError, KeyError, TypeError):
            drop.append(line)  # a line cut off mid-write by a kill
            continue
        on_grid = (step % tc.log_every == 0) if "loss" in rec else bool(tc.eval_every and step % tc.eval_every == 0)
        (keep if step < ckpt_step or (step == ckpt_step and on_grid) else drop).append(line)
    if drop:
        with open(run_dir / "log.discarded.jsonl", "a") as f:
            f.write("".join(x + "\n" for x in drop))
        write_atomic(path, "".join(x + "\n" for x in keep))
    return len(drop)


def write_atomic(path, text):
    """Write a small text file through a temp name unique to this process, then rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    """ckpt.pt as a dict, or a RunError that names the file and what to do."""
    fix = (f"Restore a good copy of it, or start the run over with --overwrite (moves {path.parent} aside) "
           f"or under another --run-name")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated, empty, or not a torch file: each raises something different
        raise RunError(f"--resume: cannot read the checkpoint {path} ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:200]}; {path.stat().st_size} bytes). {fix}") from None
    need = ("model", "optimizer", "scaler", "loader", "rng", "step", "model_config", "train_config")
    missing = [k for k in need if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise RunError(f"--resume: {path} is not a train.py checkpoint (it lacks {', '.join(missing)}). {fix}")
    return ckpt


def resume_config(ckpt, tc, mc, given):
    """The saved config with the flags given now on top; a flag that cannot change on resume is an error."""
    saved = {**ckpt["train_config"], **ckpt["model_config"]}
    now = {**asdict(tc), **asdict(mc)}
    changed = [k for k in FIXED_ON_RESUME if k in given and k in saved and now[k] != saved[k]]
    if changed:
        raise RunError("--resume continues the saved run, whose " + ", ".join(
            f"{flag(k)} is {saved[k]!r} (given: {now[k]!r})" for k in changed) + "; these cannot change on resume. "
            "Drop them to continue the run, or start a new one (another --run-name, or --overwrite)")
    tnames = {f.name for f in dataclasses.fields(TrainConfig)}
    train_saved = {k: v for k, v in ckpt["train_config"].items() if k in tnames}
    tc = TrainConfig(**{**train_saved, **{k: v for k, v in given.items() if k in tnames}})
    mnames = {f.name for f in dataclasses.fields(GPTConfig)}
    mc = GPTConfig(**{**{k: v for k, v in ckpt["model_config"].items() if k in mnames},
                      **{k: v for k, v in given.items() if k == "sdpa_backend"}})
    return tc, mc


def saved_world(ckpt):
    """(world size, --grad-accum) of the run that wrote ckpt; a checkpoint from before the global loader
    state has one loader state per rank."""
    world = ckpt.get("world_size") or (len(ckpt["loader"]) if isinstance(ckpt["loader"], list) else 1)
    return int(world), int(ckpt["train_config"]["grad_accum"])


def check_world(ckpt, tc, world):
    """A resume on `world` processes must read the same global batch as the run that wrote ckpt: world *
    --grad-accum micro-batches per step, as saved. Else a RunError that says which --grad-accum to pass."""
    w0, a0 = saved_world(ckpt)
    per_step = w0 * a0
    if world * tc.grad_accum == per_step:
        return
    fix = (f"pass --grad-accum {per_step // world}" if per_step % world == 0 else
           f"{world} processes cannot split {per_step} micro-batches evenly; use a number of processes that "
           f"divides {per_step}")
    raise RunError(f"--resume: the checkpoint's optimizer step reads {per_step} micro-batches of --batch-size "
                   f"{tc.batch_size} ({w0} process{'es' if w0 > 1 else ''} x --grad-accum {a0}); {world} "
                   f"process{'es' if world > 1 else ''} x --grad-accum {tc.grad_accum} would read "
                   f"{world * tc.grad_accum} and change the batches and the data order: {fix}")


def global_loader_state(ckpt):
    """(the train loader's global state, a note or None). A checkpoint from before the global stream holds a
    list of per-rank states: one process's is the global one; several ranks drew rank-seeded windows that
    the global stream cannot reproduce, so the resume continues the global stream after as many micro-batches
    as they read together (another data order from there on than the old code's)."""
    state = ckpt["loader"]
    if isinstance(state, dict):
        return state, None
    if len(state) == 1:
        return state[0], None
    w0, a0 = saved_world(ckpt)
    steps = int(state[0]["step"]) // a0
    note = (f"note: this checkpoint comes from {w0} ranks that drew rank-seeded batches (before the batches were "
            f"the same at any world size); the resume reads the global stream from micro-batch {steps * w0 * a0}, "
            f"so its data order differs from what the old code would have drawn")
    return {"step": steps * w0 * a0, "seed": state[0]["seed"]}, note


def save_checkpoint(path, obj):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact. The temp name is unique to
    the process, so no two writers ever share one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- data

def ensure_data(tc, log, master=True, ddp=False):
    """The prepared dataset's folder, prepared or generated first if needed (data/prepare.py). Under
    torchrun rank 0 prepares it; the others wait for it, then find it prepared."""
    from data.prepare import PrepareError, ensure_dataset

    def ensure():
        try:
            return ensure_dataset(tc.dataset, tc.tokenizer, tc.data_root, log)
        except PrepareError as e:
            raise RunError(f"data: {e}") from None

    if master:
        data_dir = ensure()
    if ddp:
        import torch.distributed as dist

        dist.barrier()
    if not master:
        data_dir = ensure()
    return data_dir


def open_splits(data_dir, tc, mc, rank, world, pin_memory):
    """Both splits' loaders, checked before the first step: every shard's header and size, and at least one
    window of block_size + 1 tokens in each split (else a run would stop at its first eval, minutes in)."""
    from data.loader import TokenLoader
    from data.shards import ShardError

    try:
        train = TokenLoader(data_dir, "train", tc.batch_size, mc.block_size, rank=rank, world_size=world,
                            seed=tc.seed, pin_memory=pin_memory, accum=tc.grad_accum)
        val = TokenLoader(data_dir, "val", tc.batch_size, mc.block_size, rank=rank, world_size=world, seed=0)
        val.val_windows(tc.eval_batches, global_batches=True)
    except (ShardError, ValueError, FileNotFoundError) as e:
        raise RunError(f"data: {e}") from None
    return train, val



# ----------------------------------------------------------------------------- log

class RunLog:
    """log.jsonl, one JSON object per line, flushed at once, and wandb when --wandb. Only rank 0 writes."""

    def __init__(self, tc, mc, run_dir, master, cleanup):
        self.wandb = setup_wandb(tc, mc, run_dir, run_dir.name) if (tc.wandb and master) else None
        self.file = cleanup.enter_context(open(run_dir / "log.jsonl", "a")) if master else None

    def write(self, rec):
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            if self.wandb is not None:
                # per-head gate lists stay in log.jsonl; wandb gets their per-layer means from metrics()
                self.wandb.log({k: v for k, v in rec.items() if k not in ("step", "gates")}, step=rec["step"])

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


def setup_wandb(tc, mc, run_dir, run_name):
    import wandb  # only when asked for: the GPU machines have no wandb

    if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        try:
            logged_in = bool(wandb.api.api_key)
        except Exception:
            logged_in = False
        if not logged_in:
            os.environ["WANDB_MODE"] = "offline"
            print("wandb: no API key found, logging offline (sync later with `wandb sync`)")
    ra_opts = {k: getattr(mc, k) for k in attention.get_class(mc.attn).options}  # the chosen attention's own
    tags = [mc.attn, tc.dataset, tc.preset] + [t for t in tc.wandb_tags.split(",") if t]
    return wandb.init(project=tc.wandb_project, group=tc.wandb_group or None, name=run_name, dir=str(run_dir),
                      config={**asdict(tc), **asdict(mc), "ra_options": ra_opts}, tags=tags)

