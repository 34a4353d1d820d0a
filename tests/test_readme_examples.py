"""Every example in README.md marked `<!-- example: ... -->` runs against the test server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = dict(re.findall(r"<!-- example: (\w+) -->\n```\w+\n(.*?)```", README, flags=re.S))


def localize(code: str, server: str) -> str:
    return code.replace("http://localhost:8000", server).replace("localhost:8000", server)


def test_readme_has_the_examples() -> None:
    assert set(EXAMPLES) == {"curl", "openai", "structured", "tools", "tfserving", "handle"}


@pytest.mark.parametrize("name", ["curl", "tfserving"])
def test_shell_examples(server, name) -> None:
    out = subprocess.run(["bash", "-euc", localize(EXAMPLES[name], server)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "choices" in out.stdout or "predictions" in out.stdout
    if name == "tfserving":
        first, _ = json.JSONDecoder().raw_decode(out.stdout)
        assert len(first["predictions"]) == 2


def test_openai_example(server, capsys) -> None:
    code = localize(EXAMPLES["openai"], server)
    exec(compile(code, "README:openai", "exec"), {"__name__": "__main__"})
    assert "completion_tokens" in capsys.readouterr().out


def test_structured_output_example(server, capsys) -> None:
    code = localize(EXAMPLES["structured"], server)
    exec(compile(code, "README:structured", "exec"), {"__name__": "__main__"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("{'city': ") and "'population': " in lines[0], lines  # json.loads parsed it
    assert len(lines) == 4 and all(line.endswith(" stop") for line in lines[1:]), lines


def test_tool_call_example(server, capsys) -> None:
    exec(compile(localize(EXAMPLES["tools"], server), "README:tools", "exec"), {"__name__": "__main__"})
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("get_weather {'city': ") and first.endswith(" tool_calls"), first


def test_handle_example_runs_as_a_separate_process(server) -> None:
    """As a user runs it: another Python process, joining the running cluster itself."""
    out = subprocess.run([sys.executable, "-c", EXAMPLES["handle"]], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "completion_tokens=16" in out.stdout, out.stdout
