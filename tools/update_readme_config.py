"""Rewrite the config reference in README.md from the pydantic models (run after changing them)."""

from __future__ import annotations

import re
from pathlib import Path

from deployments.config import config_reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def main() -> None:
    text = README.read_text()
    block = f"{START}\n{config_reference_markdown()}\n{END}"
    new, count = re.subn(re.escape(START) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    if count != 1:
        raise SystemExit("README.md has no config-reference markers")
    README.write_text(new)


if __name__ == "__main__":
    main()
