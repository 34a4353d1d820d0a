"""README.md's examples as data: each `<!-- example: name -->` block, and what it prints as shown
in the `<!-- prints: name -->` block after it. test_first_hour runs every example, verbatim but
for the port, against the embedded default started as the README starts it, and checks that it
prints what the README shows."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = dict(re.findall(r"<!-- example: (\w+) -->\n```\w+\n(.*?)```", README, flags=re.S))
PRINTS = dict(re.findall(r"<!-- prints: (\w+) -->\n```text\n(.*?)\n```", README, flags=re.S))
ANYTHING = "…"
"""In a prints block: what changes from run to run (ids, timestamps, usage details)."""


def localize(code: str, server: str) -> str:
    return code.replace("http://localhost:8000", server).replace("localhost:8000", server)


def prints_as_shown(name: str, out: str) -> bool:
    pattern = ".*?".join(re.escape(part) for part in PRINTS[name].split(ANYTHING))
    return re.fullmatch(pattern, out.rstrip("\n"), flags=re.S) is not None


def test_readme_has_the_examples_and_what_they_print() -> None:
    assert set(EXAMPLES) == {"curl", "openai", "structured", "tools", "tfserving", "handle"}
    assert set(PRINTS) == set(EXAMPLES)


def test_a_prints_block_is_matched_exactly_but_for_its_wildcards() -> None:
    PRINTS["_probe"] = '{"id":"cmpl-…","text":" used."}'
    try:
        assert prints_as_shown("_probe", '{"id":"cmpl-0a1b","text":" used."}\n')
        assert not prints_as_shown("_probe", '{"id":"cmpl-0a1b","text":" used!"}')
        assert not prints_as_shown("_probe", '{"id":"cmpl-0a1b","text":" used."} and more')
    finally:
        del PRINTS["_probe"]
