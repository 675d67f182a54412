"""
A ladder folder's state, checked before any run: the dataset prepared once (prepare_data), the corpus
identity and training flags the folder was started with (ladder_state.json: check_state refuses another
corpus version or other flags), and per run folder whether it is reused, resumed or started fresh
(existing_state).
"""

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from ladder.runs import IGNORED_FIELDS, OK_STATUSES, config_defaults

STATE_FILE = "ladder_state.json"
# meta.json fields that change when the same corpus is prepared again: not part of its identity
VOLATILE_META = {"created", "seconds", "date", "elapsed_s", "wall_s"}


def prepare_data(tc):
    """Make the dataset once before the runs (data.prepare.ensure_dataset), so no run prepares or waits
    for it. Returns (meta, data_dir)."""
    from data.loader import load_meta
    from data.prepare import PrepareError, ensure_dataset

    try:
        out = ensure_dataset(tc.dataset, tc.tokenizer, tc.data_root, print)
    except PrepareError as e:
        sys.exit(f"error: {e}")
    return load_meta(out), out


def prepared_meta(tc):
    """meta.json of the dataset if it is prepared (a dry run prepares nothing), else None."""
    from data.loader import load_meta
    from data.prepare import dataset_dir
    from data.synthetic import task_of

    if task_of(tc.dataset) is not None:  # generated in a moment, and its parameters are in its meta.json
        return prepare_data(tc)[0]
    try:
        return load_meta(dataset_dir(tc.dataset, tc.tokenizer, tc.data_root))
    except FileNotFoundError:
        return None


def corpus_identity(meta):
    """What makes a prepared corpus this corpus: a sha256 over meta.json without the fields that change on
    every preparation (VOLATILE_META), with the token counts and per-part sha256s readable beside it."""
    stable = {k: v for k, v in meta.items() if k not in VOLATILE_META}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()
    return {"name": meta.get("name") or meta.get("dataset"), "tokenizer": meta.get("tokenizer"),
            "tokens": meta.get("tokens"), "sha256": digest}


def ladder_flags(tc, mc):
    """The baseline's resolved training config without what differs between runs of one ladder (seed, run
    name, attention, bookkeeping): a ladder folder holds runs of one set of flags only."""
    skip = IGNORED_FIELDS | {"attn", "seed", "run_name", "resume", "overwrite", "vocab_size"}
    return {k: v for k, v in {**dataclasses.asdict(tc), **dataclasses.asdict(mc)}.items() if k not in skip}


def check_state(out_dir, state, write=True):
    """Refuse a ladder folder started with another corpus or other training flags; else record this one.
    Raises SystemExit with what differs and what to do, before any run starts."""
    path = Path(out_dir) / STATE_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("corpus", {}).get("sha256") != state["corpus"]["sha256"]:
            o, n = old.get("corpus", {}), state["corpus"]
            raise SystemExit(f"error: {out_dir} holds a ladder on another version of the corpus ({o.get('name')}: "
                             f"tokens {o.get('tokens')}, sha256 {str(o.get('sha256'))[:12]}; now {n['name']}: tokens "
                             f"{n['tokens']}, sha256 {n['sha256'][:12]}). Its runs do not compare with new ones: use "
                             f"another --out-dir, or restore that corpus")
        # a flag added to the code after this folder was started is missing from its state: it had the
        # flag's default then (a new field defaults to the old behaviour), as load_run assumes for configs
        old_flags = {k: v for k, v in config_defaults().items() if k in state["flags"]} | old.get("flags", {})
        differ = sorted(k for k in set(old_flags) | set(state["flags"])
                        if old_flags.get(k) != state["flags"].get(k))
        if differ:
            diffs = ", ".join(f"{k}: {old_flags.get(k)!r} then, {state['flags'].get(k)!r} now" for k in differ[:5])
            raise SystemExit(f"error: {out_dir} holds a ladder with other training flags ({diffs}). Use another "
                             f"--out-dir for these flags, or give the same flags to continue that ladder")
        return
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=2) + "\n")


def existing_state(run_dir, planned):
    """'fresh', 'reuse' (finished, same config), 'resume' (interrupted, has ckpt.pt) or raise on another config."""
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        return "fresh"
    old = json.loads(cfg_path.read_text())
    skip = IGNORED_FIELDS | {"vocab_size", "run_name", "world_size", "data_dir", "wandb_tags",
                                           "overwrite"}
    differ = sorted(k for k in planned if k not in skip and k in old and old[k] != planned[k])
    if differ:
        diffs = ", ".join(f"{k}: {old[k]!r} != {planned[k]!r}" for k in differ[:4])
        raise SystemExit(f"error: {run_dir} holds a run with another config ({diffs}); use another --out-dir "
                         f"(or delete that folder)")
    summary = run_dir / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    if status in OK_STATUSES or status == "non-finite loss":
        return "reuse"
    return "resume" if (run_dir / "ckpt.pt").exists() else "fresh"
