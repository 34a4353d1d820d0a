"""A model repository on disk, laid out as TF Serving's: `<base_path>/<name>/<version>/`.

A version is a directory named by a positive integer holding a loadable model directory. A
version is written under a temporary name and renamed into place, so a server scanning the
repository never sees half a version.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def versions(base_path: Path, name: str) -> list[int]:
    """Published versions of a model, ascending."""
    root = base_path / name
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) > 0)


def latest(base_path: Path, name: str) -> int | None:
    found = versions(base_path, name)
    return found[-1] if found else None


def version_dir(base_path: Path, name: str, version: int) -> Path:
    return base_path / name / str(version)


def staging_dir(base_path: Path, name: str) -> Path:
    """Where the next version is written before it is validated and published."""
    path = base_path / name / f".staging-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(base_path: Path, name: str, staged: Path) -> int:
    """Move a staged version into place as the next version number; returns it."""
    version = (latest(base_path, name) or 0) + 1
    target = version_dir(base_path, name, version)
    staged.rename(target)  # atomic on one filesystem: readers see all of it or none
    return version


def select_versions(available: list[int], policy: str, latest_n: int = 1, specific: list[int] | None = None) -> list[int]:
    """The versions a TF-Serving-style version policy serves, ascending; ValueError names what
    is missing (a policy that serves nothing is a configuration error, not an empty server)."""
    if not available:
        raise ValueError("the model repository has no versions")
    if policy == "latest":
        return sorted(available)[-latest_n:]
    if policy == "all":
        return sorted(available)
    missing = [v for v in specific or [] if v not in available]
    if missing or not specific:
        raise ValueError(f"versions {missing or specific} are not in the repository (it has {sorted(available)})")
    return sorted(set(specific))
