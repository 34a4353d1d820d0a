"""Incremental detokenization and stop strings (no Ray)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deployments.replica.output import OutputText
from parallel.checkpoints.builtin_models import ensure_builtin_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_builtin_model("shardserve/tiny-llama"))


def stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], OutputText]:
    out = OutputText(tokenizer, stop)
    pieces = []
    for tid in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(out.feed(tid, final=False))
        if out.stopped:
            break
    if not out.stopped:
        pieces.append(out.finish())
    return pieces, out


def test_pieces_join_to_text_including_multibyte(tokenizer) -> None:
    text = "héllo wörld, the model 😀 says hi"
    pieces, out = stream(tokenizer, text, [])
    assert "".join(pieces) == text == out.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_cuts_text_and_is_never_released(tokenizer) -> None:
    pieces, out = stream(tokenizer, "the quick brown fox jumps over", ["fox"])
    assert out.stopped
    assert "".join(pieces) == "the quick brown "
    assert all("f" not in p for p in pieces[-2:]) or "".join(pieces).endswith("brown ")


def test_earliest_of_several_stops_wins(tokenizer) -> None:
    _, out = stream(tokenizer, "alpha beta gamma delta", ["delta", "beta"])
    assert out.text == "alpha "


def test_text_without_stop_is_held_back_only_by_stop_length(tokenizer) -> None:
    out = OutputText(tokenizer, ["xyz"])
    released = "".join(out.feed(t, final=False) for t in tokenizer.encode("hello world", add_special_tokens=False))
    assert "hello world".startswith(released) and len(released) >= len("hello world") - 2
    assert released + out.finish() == "hello world"


def test_stop_strings_wait_for_min_tokens(tokenizer) -> None:
    """Before min_tokens no stop string ends the output (vLLM skips every stop check); after,
    the next one does."""
    ids = tokenizer.encode("one stop two stop three", add_special_tokens=False)
    out = OutputText(tokenizer, ["stop"])
    released = ""
    first_stop_end = len(tokenizer.encode("one stop", add_special_tokens=False))
    for n, token_id in enumerate(ids, start=1):
        released += out.feed(token_id, final=False, stops=n > first_stop_end)
        if out.stopped:
            break
    assert out.stopped and out.text.startswith("one stop two") and not out.text.endswith("stop")
    assert "stop" in out.text
