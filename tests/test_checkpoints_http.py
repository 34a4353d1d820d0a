"""Checkpoints shaped like the ones users deploy, served for real: generation_config.json (EOS
lists, sampling defaults), chat templates and special tokens, context sized by the KV pool, and
a model that cannot load saying so at once.

The shaped models have random weights, so a few have one row of their LM head rigged (`steer`)
to make the model emit a given special token at a known step, as the trained checkpoint would at
the end of its turn. The expected tokens always come from transformers' own greedy forward on the
rigged weights, never from our engine.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from ray import serve
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.app import bind_app, build_app
from deployments.config import ShardserveArgs
from deployments.types import GenerateRequest
from parallel.checkpoints.shaped_models import write_shaped_checkpoint

from .conftest import TEST_ARGS, wait_until

LIMITS = TEST_ARGS["limits"]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a river."}]


def hf_greedy(model: Path | torch.nn.Module, prompt_ids: list[int], steps: int) -> list[int]:
    """transformers' greedy tokens, one whole forward per step (no cache class relied on)."""
    if isinstance(model, Path):
        model = AutoModelForCausalLM.from_pretrained(model, attn_implementation="eager", dtype=torch.float32).eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


def chat_ids(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def steer(model_dir: Path, prompt_ids: list[int], token: str, step: int) -> list[int]:
    """Make greedy decoding of the prompt emit `token` first at `step` or a little later, as a
    trained checkpoint ends its turn: its LM-head row becomes a scaled copy of the row of the
    token that wins there. Writes the rigged weights; returns transformers' greedy tokens of
    them, unchanged before that step."""
    token_id = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(token)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    head = model.get_output_embeddings().weight  # the embedding matrix itself when tied
    original = head.detach().clone()
    before = hf_greedy(model, prompt_ids, step + 8)
    for at in (i for i in range(step, step + 6) if before[i] not in before[:i]):  # a winner new at that step
        for scale in (1.02, 1.05, 1.1, 1.25, 1.5, 2.0):
            with torch.no_grad():
                head.copy_(original)
                head[token_id] = original[before[at]] * scale
            tokens = hf_greedy(model, prompt_ids, at + 3)
            if token_id in tokens and tokens.index(token_id) == at and tokens[:at] == before[:at]:
                weights = model_dir / "model.safetensors"
                state = load_file(str(weights))
                state["lm_head.weight" if "lm_head.weight" in state else "model.embed_tokens.weight"] = head.detach().clone()
                save_file(state, str(weights), metadata={"format": "pt"})
                return tokens
    raise AssertionError(f"could not steer {token} into step {step}")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], int]:
    """Meta-Llama-3-8B-Instruct's layout: config.json names only <|end_of_text|>, the turn end
    <|eot_id|> is in generation_config.json (and the tokenizer). Rigged: the chat's answer has
    <|start_header_id|> (special, not an EOS) at step 1 and ends with <|eot_id|> a few later."""
    path = write_shaped_checkpoint("llama-3-8b-instruct", tmp_path_factory.mktemp("llama3"))
    prompt = chat_ids(path, CHAT)
    steer(path, prompt, "<|start_header_id|>", 1)
    tokens = steer(path, prompt, "<|eot_id|>", 3)
    return path, tokens, AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<|eot_id|>")


@pytest.fixture(scope="module")
def llama32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Llama-3.2's 131072-token window, at two layers and one KV head: the default pool
    (max_num_seqs whole windows, 256 B a token) is 1 GiB. Its embeddings are tied: rigged to end
    the chat's answer with an EOS the prompt does not contain (<|eot_id|> ends each turn of it).
    Returns the path and the completion's length where transformers ends the turn."""
    path = write_shaped_checkpoint("llama-3.2-1b-instruct", tmp_path_factory.mktemp("llama32"), num_hidden_layers=2,
                                   num_key_value_heads=1)  # fmt: skip
    tokens = steer(path, chat_ids(path, CHAT), "<|end_of_text|>", 0)
    return path, tokens.index(AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<|end_of_text|>")) + 1


@pytest.fixture(scope="module")
def shaped_apps(server: str, llama3, llama32, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The apps of the tests below, started together (their replicas load at once: each start
    costs seconds), deleted after the module."""
    qwen = write_shaped_checkpoint("qwen2.5-7b-instruct", tmp_path_factory.mktemp("qwen"))
    apps = {
        "llama3": {"model": str(llama3[0]), "served_model_name": "llama3"},
        "long": {"model": str(llama32[0])},
        "smallpool": {"model": str(llama32[0]), "engine": {"kv_cache_memory_mb": 1}},
        "qwen": {"model": str(qwen), "cache": {"enabled": False}},
        "qwenplain": {"model": str(qwen), "generation_config": "ignore", "cache": {"enabled": False}},
    }
    deploy_many(apps)
    yield
    for name in apps:
        serve.delete(name)


def deploy(name: str, args: dict[str, Any], overrides: dict[str, Any] | None = None, wait: bool = True) -> None:
    """An app under the session server at /{name}; `wait=False` returns before it is running."""
    deploy_many({name: args}, overrides, wait)


def deploy_many(apps: dict[str, dict[str, Any]], overrides: dict[str, Any] | None = None, wait: bool = True) -> None:
    """Several apps started together."""
    bound = {name: bind_app(ShardserveArgs.model_validate({"limits": LIMITS, **args}), overrides) for name, args in apps.items()}
    targets = [serve.RunTarget(app, name=name, route_prefix=f"/{name}") for name, app in bound.items()]
    serve.run_many(targets, wait_for_applications_running=wait)


def ingress_up(base: str) -> None:
    """The app's ingress answers (its routes are registered and its replica runs)."""
    wait_until(lambda: _status(f"{base}/health") == 200, timeout_s=120, interval_s=0.2)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_generation_config_eos_ends_the_turn_and_special_tokens_stay_out_of_text(server: str, llama3, shaped_apps) -> None:
    path, tokens, eot = llama3
    card = serve.get_app_handle("llama3").model_card.remote().result(timeout_s=30)
    assert eot in card.eos_token_ids and card.sampling_defaults.temperature == 0.6
    body = {"messages": CHAT, "temperature": 0, "logprobs": True}
    answer = httpx.post(f"{server}/llama3/v1/chat/completions", json=body, timeout=60).json()
    choice = answer["choices"][0]
    end = tokens.index(eot)
    assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == end + 1, (answer, tokens)
    assert [t["token"] for t in choice["logprobs"]["content"]][1] == "<|start_header_id|>"
    assert "<|" not in choice["message"]["content"]  # neither the special token nor the EOS
    tok = AutoTokenizer.from_pretrained(path)
    assert choice["message"]["content"] == tok.decode(tokens[:end], skip_special_tokens=True)
    # ignore_eos goes past the turn end, as vLLM's does
    past = httpx.post(
        f"{server}/llama3/v1/chat/completions", json={**body, "max_tokens": 7, "ignore_eos": True}, timeout=60
    ).json()
    assert past["choices"][0]["finish_reason"] == "length" and past["usage"]["completion_tokens"] == 7


def test_a_128k_window_model_answers_chat_without_max_tokens_with_default_settings(server: str, llama32, shaped_apps) -> None:
    """Llama-3.2's 131072-token window with the default pool: the context served is the whole
    window and a chat request that sets no max_tokens runs until the model ends its turn. With
    a pool too small for one window, the context served is what the pool holds."""
    _, turn_length = llama32
    for name, context in {"long": 131072, "smallpool": 4096}.items():  # smallpool: 1 MiB at 256 B a token
        (model,) = httpx.get(f"{server}/{name}/v1/models", timeout=30).json()["data"]
        assert model["max_model_len"] == context, model
        answer = httpx.post(f"{server}/{name}/v1/chat/completions", json={"messages": CHAT, "temperature": 0}, timeout=60).json()
        assert answer["choices"][0]["finish_reason"] == "stop", answer
        assert answer["usage"]["completion_tokens"] == turn_length  # where transformers ends the turn


def test_sampling_defaults_come_from_generation_config_unless_ignored(shaped_apps) -> None:
    """Qwen2.5-Instruct ships temperature 0.7, top_p 0.8, top_k 20 and repetition_penalty 1.05 in
    generation_config.json: a seeded request that leaves them out is sampled with them (the same
    tokens as naming them), and with `generation_config: ignore` with OpenAI's defaults."""

    def tokens(app: str, **fields: Any) -> list[int]:
        request = GenerateRequest(prompt="Once upon a time", max_tokens=24, seed=5, ignore_eos=True, **fields)
        return serve.get_app_handle(app).generate.remote(request).result(timeout_s=60).outputs[0].token_ids

    qwen = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    openai = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    defaulted = tokens("qwen")
    assert defaulted == tokens("qwen", **qwen)
    assert defaulted != tokens("qwen", **openai)
    assert tokens("qwenplain") == tokens("qwen", **openai)
    card = serve.get_app_handle("qwen").model_card.remote().result(timeout_s=30)
    assert card.sampling_defaults.model_dump(exclude_defaults=True) == qwen


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize(
    ("app", "written", "offered"),
    [
        ("qwen", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "<tools>"),
        ("long", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "Environment: ipython"),
    ],
)
def test_auto_tool_calls_in_each_checkpoints_own_format(server: str, shaped_apps, app: str, written: str, offered: str) -> None:
    """Served Qwen2.5 and Llama 3.2 checkpoints offer the tools through their own templates, and
    a call written in the format that template teaches (a grammar makes the random model write
    it) comes back as tool_calls, whole and streamed (how finely the arguments are split depends
    on how many tokens each chunk carries: test_calls_stream_argument_by_argument)."""
    auto_tool_call(server, app, written, offered)


def test_auto_tool_calls_in_mistrals_format(server: str, tmp_path: Path) -> None:
    """Mistral v0.3: tools in [AVAILABLE_TOOLS]; decoding drops the [TOOL_CALLS] control token, so
    the call is the array the answer opens with. Its own app, started and deleted here: the
    shaped apps above already hold all but one of the session's CPUs, which the later tests need."""
    mistral = write_shaped_checkpoint("mistral-7b-instruct-v0.3", tmp_path / "mistral")
    deploy("mistral", {"model": str(mistral), "cache": {"enabled": False}})
    try:
        auto_tool_call(server, "mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "[AVAILABLE_TOOLS]")
    finally:
        serve.delete("mistral")


def auto_tool_call(server: str, app: str, written: str, offered: str) -> None:
    tokenized = httpx.post(f"{server}/{app}/tokenize", json={"messages": ASK, "tools": [WEATHER]}, timeout=30).json()
    prompt = httpx.post(f"{server}/{app}/detokenize", json={"tokens": tokenized["tokens"]}, timeout=30).json()["prompt"]
    assert offered in prompt and "The weather in a city" in prompt
    body = {"messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 150,
            "structured_outputs": {"grammar": "root ::= " + json.dumps(written)}}  # fmt: skip
    answer = httpx.post(f"{server}/{app}/v1/chat/completions", json=body, timeout=60).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, answer
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    with httpx.stream("POST", f"{server}/{app}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as res:
        events = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls", [])]
    assert deltas[0]["function"]["name"] == "get_weather" and all("name" not in d["function"] for d in deltas[1:])
    assert "".join(d["function"]["arguments"] for d in deltas) == call["function"]["arguments"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tools_offered_to_a_template_without_them_are_a_400(server: str, shaped_apps) -> None:
    res = httpx.post(f"{server}/llama3/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER]}, timeout=30)
    assert res.status_code == 400 and res.json()["error"]["code"] == "tools_not_supported", res.text


def test_chat_templates_as_checkpoints_ship_them(tmp_path: Path) -> None:
    """The model's own template renders system prompts and opens the assistant's turn (Qwen2.5
    adds its default system prompt, Gemma folds the system turn into the first user turn); a base
    checkpoint without a template, and turns a template refuses, are 400s that say why (the
    HTTP answer of the former: `test_a_changed_checkpoint_...`, whose checkpoint is a base one)."""
    from deployments.errors import InvalidRequest
    from deployments.replica.checkpoint import ServedCheckpoint
    from deployments.types import ChatMessage

    def opened(shape: str) -> ServedCheckpoint:
        path = write_shaped_checkpoint(shape, tmp_path / shape)
        return ServedCheckpoint.open(path, ShardserveArgs(model=str(path)))

    hi = [ChatMessage(role="user", content="Hi")]
    assert opened("qwen2.5-7b-instruct").render_chat(hi) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    gemma = opened("gemma-3-1b-it")
    turns = [ChatMessage.model_validate(m) for m in CHAT]
    folded = "<bos><start_of_turn>user\nYou answer briefly.\n\nName a river.<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.render_chat(turns) == folded
    with pytest.raises(InvalidRequest, match="must alternate"):
        gemma.render_chat([ChatMessage(role="assistant", content="Hello"), *hi])
    llama = opened("llama-3.2-1b-instruct").render_chat(turns)
    assert llama.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nYou answer briefly.<|eot_id|>"
    )
    assert llama.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(InvalidRequest) as refused:
        opened("mistral-7b-v0.1").render_chat(hi)
    assert refused.value.code == "no_chat_template" and refused.value.status_code == 400


def test_a_model_that_cannot_load_says_so_at_once(server: str, tmp_path: Path) -> None:
    """Corrupt weights: while Serve tries to start the replica and after it gave up, every model
    route answers within a second or two with 503 and the load's error, /ready too, and
    `serve status` shows the failure as Ray Serve shows deploy errors."""
    path = write_shaped_checkpoint("llama-3.2-1b-instruct", tmp_path / "broken")
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    deploy("broken", {"model": str(path)}, {"max_constructor_retry_count": 2}, wait=False)
    base = f"{server}/broken"
    try:
        ingress_up(base)
        seen: list[tuple[str, int, float, str]] = []

        def probe() -> bool:
            for method, route, body in [("GET", "/ready", None), ("GET", "/v1/models", None),
                                        ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})]:  # fmt: skip
                start = time.monotonic()
                try:
                    r = httpx.request(method, f"{base}{route}", json=body, timeout=10)
                except httpx.TimeoutException:
                    seen.append((route, 0, time.monotonic() - start, "timeout"))
                    continue
                seen.append((route, r.status_code, time.monotonic() - start, r.text))
            return "model_load_failed" in seen[-1][3]

        wait_until(probe, timeout_s=180, interval_s=0.5)
        answered = seen
        assert all(code == 503 and took < 3 for _, code, took, _ in answered), answered
        assert any("SafetensorError" in text for *_, text in answered[-3:]), answered[-3:]
        ready = httpx.get(f"{base}/ready", timeout=10).json()
        assert ready["status"] == "not ready" and ready["reason"].startswith("the model failed to load: ModelLoadError"), ready
        failed = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi"}, timeout=10)
        assert failed.status_code == 503 and failed.headers["retry-after"] == "30"
        status = serve.status().applications["broken"].deployments["LLMServer"]
        assert status.status == "DEPLOY_FAILED" and "ModelLoadError" in status.message
    finally:
        serve.delete("broken")


def test_routes_answer_503_while_the_model_loads_then_serve(server: str, tmp_path: Path) -> None:
    """A replica still loading (here: generating the bench model into an empty cache) gets 503
    `model_loading` on every model route at once, then serves."""
    env = {"env_vars": {"SHARDSERVE_CACHE": str(tmp_path / "cache")}}
    deploy("loading", {"model": "shardserve/bench-llama"}, {"ray_actor_options": {"num_cpus": 1, "runtime_env": env}}, wait=False)
    base = f"{server}/loading"
    try:
        ingress_up(base)
        statuses: list[tuple[int, float, str]] = []

        def served() -> bool:
            start = time.monotonic()
            r = httpx.get(f"{base}/v1/models", timeout=10)
            statuses.append((r.status_code, time.monotonic() - start, r.text))
            return r.status_code == 200

        wait_until(served, timeout_s=240, interval_s=0.3)
        loading = [s for s in statuses if s[0] == 503]
        assert loading, "never saw the model loading"
        assert all(took < 3 and json.loads(text)["error"]["code"] == "model_loading" for _, took, text in loading), loading
        assert {code for code, *_ in statuses} == {503, 200}
    finally:
        serve.delete("loading")


def test_a_changed_checkpoint_never_gets_the_old_ones_cached_answers(server: str, tmp_path: Path, redis_url: str) -> None:
    """Redis outlives a redeploy. The same name and version served from other weights keys on
    their fingerprint: the first answer is generated, not the old checkpoint's from the cache."""
    first = write_shaped_checkpoint("mistral-7b-v0.1", tmp_path / "first", seed=1)
    second = tmp_path / "second"
    shutil.copytree(first, second)
    write_shaped_checkpoint("mistral-7b-v0.1", tmp_path / "other", seed=2)
    shutil.copy(tmp_path / "other" / "model.safetensors", second / "model.safetensors")
    args = {"served_model_name": "same", "cache": {"url": redis_url}}
    request = GenerateRequest(prompt="Tell me about rivers", max_tokens=8, temperature=0)

    def ask() -> tuple[list[int], bool]:
        out = serve.get_app_handle("ident").generate.remote(request).result(timeout_s=60)
        return out.outputs[0].token_ids, out.cached

    try:
        deploy("ident", {"model": str(first), **args})
        old, cached = ask()
        assert not cached and ask() == (old, True)
        # A base checkpoint: no chat template, a 400 that says so.
        chat = httpx.post(f"{server}/ident/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2}, timeout=30)
        assert chat.status_code == 400 and chat.json()["error"]["code"] == "no_chat_template", chat.text
        deploy("ident", {"model": str(second), **args})
        new, cached = ask()
        assert not cached and new != old
        assert ask() == (new, True)
    finally:
        serve.delete("ident")


def test_build_takes_dotted_arguments_as_serve_run_passes_them() -> None:
    app = build_app({"model": "shardserve/tiny-llama", "engine.max_num_seqs": "4", "cache.enabled": "false"})
    assert app is not None
    with pytest.raises(ValueError, match="max_num_sequences"):
        build_app({"engine.max_num_sequences": "4"})
