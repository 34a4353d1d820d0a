"""English text that ships with every CPython: the pydoc topics and the standard library's
docstrings, the training corpus of the built-in `shardserve/doc-llama`.

Read from the interpreter's own files without importing a single module of the standard library
(some print, open browsers or start threads on import): the docstrings come from each source
file's syntax tree. The order is fixed (topics by name, files by path, definitions as they
appear), so the corpus and its hash depend only on the Python version.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Packages of tests, demos and tool internals: code samples and fixtures more than prose.
SKIPPED_PARTS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages", "__pycache__", "pydoc_data"}
MIN_CHARS = 40  # one-line docstrings ("Return self.") teach little and crowd the corpus


@dataclass(frozen=True)
class Corpus:
    documents: list[str]
    """Topics, then docstrings, each one document."""

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(doc.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def split(self, every: int) -> tuple[list[str], list[str]]:
        """(training, held-out): every `every`-th document is held out."""
        held = [d for i, d in enumerate(self.documents) if i % every == every - 1]
        train = [d for i, d in enumerate(self.documents) if i % every != every - 1]
        return train, held


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def stdlib_docstrings(root: Path | None = None) -> list[str]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    out: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are templates or Python 2
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False)
                if doc:
                    text = inspect.cleandoc(doc)
                    if len(text) >= MIN_CHARS:
                        out.append(text)
    return out


def python_docs() -> Corpus:
    return Corpus(pydoc_topics() + stdlib_docstrings())
