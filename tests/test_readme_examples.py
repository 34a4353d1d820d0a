"""Every example in README.md marked `<!-- example: ... -->` runs against the test server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
EXAMPLES = dict(re.findall(r"<!-- example: (\w+) -->\n```\w+\n(.*?)```", README, flags=re.S))


def localize(code: str, server: str) -> str:
    return code.replace("http://localhost:8000", server).replace("localhost:8000", server)


def test_readme_has_the_examples() -> None:
    assert set(EXAMPLES) == {"curl", "openai", "tfserving", "handle"}


@pytest.mark.parametrize("name", ["curl", "tfserving"])
def test_shell_examples(server, name) -> None:
    out = subprocess.run(["bash", "-euc", localize(EXAMPLES[name], server)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "choices" in out.stdout or "predictions" in out.stdout
    if name == "tfserving":
        first, _ = json.JSONDecoder().raw_decode(out.stdout)
        assert len(first["predictions"]) == 2


@pytest.mark.parametrize("name", ["openai", "handle"])
def test_python_examples(server, name, capsys) -> None:
    code = localize(EXAMPLES[name], server)
    exec(compile(code, f"README:{name}", "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert "completion_tokens" in printed or "prompt_tokens" in printed
