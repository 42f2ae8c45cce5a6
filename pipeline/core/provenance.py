"""What a run manifest records about where a run came from: the hash of its resolved config
and the git commit of the code that ran it (when the code is a git checkout)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from pipeline.core.ids import fingerprint

_CODE = Path(__file__).resolve().parents[2]


def git_commit(path: Path = _CODE) -> str | None:
    """The commit checked out at ``path`` (``+dirty`` when tracked files changed), None when
    it is not a git checkout or git is missing."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def run_provenance(cfg) -> dict:
    """``config_hash`` (of the resolved config: includes and --set overrides applied) and ``git_commit``."""
    return {"config_hash": fingerprint(cfg.raw), "git_commit": git_commit()}
