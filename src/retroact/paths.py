"""Where RetroAct finds benchmark data and its built-in model."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """``$RETROACT_DATA`` if set, else ``shared/data`` beside the repository."""
    env = os.environ.get("RETROACT_DATA")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def data_path(relpath: str) -> Path:
    """A file or folder under :func:`data_root`, with a clear error when it is missing."""
    path = data_root() / relpath
    if not path.exists():
        raise FileNotFoundError(
            f"benchmark data not found: {path}. Set RETROACT_DATA to the folder holding "
            f"{relpath.split('/')[0]}/ (see `retroact data`)."
        )
    return path
