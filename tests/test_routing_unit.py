"""The prefix-affinity routing policy as pure functions."""

from __future__ import annotations

from deployments.routing import PrefixIndex, block_hashes, choose, prompt_text
from deployments.types import ChatMessage, GenerateRequest


def test_block_hashes_are_chained_prefix_hashes() -> None:
    a = block_hashes("x" * 64 + "y" * 64 + "tail", 64)
    b = block_hashes("x" * 64 + "z" * 64, 64)
    c = block_hashes("q" * 64 + "y" * 64, 64)
    assert len(a) == 2  # the partial tail block is not hashed
    assert a[0] == b[0] and a[1] != b[1]
    assert a[1] != c[1]  # same block text after a different prefix: a different hash


def test_next_chat_turn_extends_the_previous_prompt() -> None:
    system = ChatMessage(role="system", content="You are terse. " * 20)
    turn1 = [system, ChatMessage(role="user", content="What is Ray? " * 5)]
    turn2 = [*turn1, ChatMessage(role="assistant", content="A framework."), ChatMessage(role="user", content="And Serve?")]
    t1, t2 = (prompt_text(GenerateRequest(messages=m)) for m in (turn1, turn2))
    assert t2.startswith(t1)
    index = PrefixIndex(max_blocks_per_replica=1000)
    index.add("r1", block_hashes(t1, 64))
    assert index.matched("r1", block_hashes(t2, 64)) == len(block_hashes(t1, 64))
    assert index.matched("r2", block_hashes(t2, 64)) == 0


def test_index_is_lru_bounded_and_forgets_removed_replicas() -> None:
    index = PrefixIndex(max_blocks_per_replica=3)
    hashes = block_hashes("a" * 64 * 5, 64)
    index.add("r", hashes)
    assert index.matched("r", hashes) == 0  # the leading blocks were evicted first
    index.add("r", hashes[:2])
    assert index.matched("r", hashes) == 2
    index.keep_only(["other"])
    assert index.matched("r", hashes) == 0


def test_choose_prefers_the_longest_match_unless_it_is_overloaded() -> None:
    assert choose({"a": 5, "b": 1}, {"a": 3, "b": 0}, min_match_blocks=2, imbalanced_threshold=8) == "a"
    assert choose({"a": 5, "b": 1}, {"a": 12, "b": 0}, min_match_blocks=2, imbalanced_threshold=8) is None
    assert choose({"a": 1, "b": 0}, {"a": 0, "b": 0}, min_match_blocks=2, imbalanced_threshold=8) is None  # too short
    assert choose({"a": 4, "b": 4}, {"a": 5, "b": 2}, min_match_blocks=2, imbalanced_threshold=8) == "b"  # tie: shorter queue
    assert choose({"a": 4}, {"a": None}, min_match_blocks=2, imbalanced_threshold=8) == "a"  # unknown load: trust the match
