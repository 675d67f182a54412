"""The repository's commit for a run's or a benchmark's record."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_describe(short=True):
    """HEAD's hash (abbreviated unless short=False), with ' (uncommitted changes)' when tracked files differ
    from it; None outside a git checkout or without git."""
    try:
        head = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (uncommitted changes)' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        return None
