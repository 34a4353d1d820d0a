"""Where shardserve keeps what it makes on disk: generated built-in models
(parallel/checkpoints) and built CPU kernels (parallel/model). Both rooms ask here, so neither
imports the other for it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """What shardserve keeps on disk (generated models, built kernels): `SHARDSERVE_CACHE`, or
    `~/.cache/shardserve`."""
    return Path(os.environ.get("SHARDSERVE_CACHE") or Path.home() / ".cache" / "shardserve")
