"""This machine narrowed to what the GPU machine has, for a test that runs `bench.gpu` there.

The GPU machine holds its image's distributions (`bench.gpu_wheels.GPU_IMAGE`) and the wheels
carried to it, nothing else. `refuse_imports_off_the_image` makes every other installed
distribution unimportable in this process (not found, as it would be there: optional imports
such as transformers' DeepSpeed integration see it missing and go on), so a run that passes
here needs nothing more there. A distribution an image package requires (as installed here) is
let through: the image brings its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from importlib.metadata import Distribution, DistributionFinder, PackageNotFoundError, packages_distributions, requires
from types import ModuleType

from packaging.requirements import Requirement

from bench.gpu_wheels import CARRIED, GPU_IMAGE, normalise

PROJECT = frozenset({"bench", "deployments", "parallel", "tests"})


def image_requirements() -> frozenset[str]:
    """What the image's distributions require, transitively, as installed here."""
    seen: set[str] = set()
    todo = list(GPU_IMAGE)
    while todo:
        try:
            lines = requires(todo.pop()) or []
        except PackageNotFoundError:
            continue
        for line in lines:
            req = Requirement(line)
            name = normalise(req.name)
            if (req.marker is None or "extra" not in str(req.marker)) and name not in seen and name not in GPU_IMAGE:
                seen.add(name)
                todo.append(name)
    return frozenset(seen)


def allowed_distributions() -> frozenset[str]:
    return GPU_IMAGE | {normalise(d) for d in CARRIED} | image_requirements()


def off_the_image(allowed: frozenset[str]) -> frozenset[str]:
    """Top-level modules of the distributions installed here that the GPU machine lacks."""
    return frozenset(
        module
        for module, dists in packages_distributions().items()
        if module not in PROJECT and not any(normalise(d) in allowed for d in dists)
    )


class _OffTheImage(MetaPathFinder):
    """The path finder, blind to what the image lacks: its modules and its metadata."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self.allowed = allowed
        self.refused = off_the_image(allowed)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] in self.refused:
            return None
        return PathFinder.find_spec(fullname, path, target)

    def find_distributions(self, context: DistributionFinder.Context | None = None) -> Iterator[Distribution]:
        context = context or DistributionFinder.Context()
        return (d for d in PathFinder.find_distributions(context) if normalise(d.metadata["Name"]) in self.allowed)


def refuse_imports_off_the_image() -> frozenset[str]:
    """Put the filter in place of the path finder; returns the refused modules."""
    finder = _OffTheImage(allowed_distributions())
    sys.meta_path[:] = [finder if f is PathFinder else f for f in sys.meta_path]
    return finder.refused
