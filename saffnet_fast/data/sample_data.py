"""Where the real sample fixtures live: ``$SAFFNET_SHARED_DATA`` or ``../shared/data`` beside
the project checkout (they are never part of the package)."""
from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    env = os.environ.get("SAFFNET_SHARED_DATA")
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    candidate = repo_root.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def sample_dir(name: str) -> Path | None:
    """``coco-sample`` / ``mpii-sample`` directory, or None when absent."""
    root = shared_data_dir()
    if root is None or not (root / name).is_dir():
        return None
    return root / name
