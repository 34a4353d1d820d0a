"""The baselines shardserve is measured against, each started for real in the same run.

- `naive`: the usual tutorial deployment, a Ray Serve replica that calls Hugging Face
  `generate` for one request at a time.
- `serve_batch`: Ray Serve's `@serve.batch` static batching over `generate` (left-padded batch,
  every request in a batch waits for the longest).
- `transformers serve` with and without `--continuous-batching`, as a subprocess.

Peers load and run their model on one dedicated thread, as shardserve's runner does, so that
none pays for two OpenMP thread teams fighting over the cores.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from fastapi import FastAPI
from ray import serve


class _HFModel:
    def __init__(self, model_dir: str) -> None:
        self.thread = ThreadPoolExecutor(max_workers=1)
        self.thread.submit(self._load, model_dir).result()

    def _load(self, model_dir: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        return self.thread.submit(self._generate, prompts, max_tokens).result()

    def _generate(self, prompts: list[str], max_tokens: int) -> list[list[int]]:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(
                **batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
        return out[:, batch["input_ids"].shape[1] :].tolist()


def _completion(tokens: int, text: str = "") -> dict[str, Any]:
    return {
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
        "usage": {"completion_tokens": tokens},
    }


naive_api = FastAPI()


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 2})
@serve.ingress(naive_api)
class NaiveHF:
    def __init__(self, model_dir: str) -> None:
        self.hf = _HFModel(model_dir)

    @naive_api.post("/v1/completions")
    async def completions(self, body: dict) -> dict[str, Any]:
        (ids,) = await asyncio.to_thread(self.hf.generate, [body["prompt"]], body["max_tokens"])
        return _completion(len(ids))


batch_api = FastAPI()


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 2})
@serve.ingress(batch_api)
class ServeBatchHF:
    def __init__(self, model_dir: str) -> None:
        self.hf = _HFModel(model_dir)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple[str, int]]) -> list[int]:
        longest = max(m for _, m in items)
        outs = await asyncio.to_thread(self.hf.generate, [p for p, _ in items], longest)
        return [min(len(o), m) for o, (_, m) in zip(outs, items, strict=True)]

    @batch_api.post("/v1/completions")
    async def completions(self, body: dict) -> dict[str, Any]:
        return _completion(await self._batched((body["prompt"], body["max_tokens"])))


class TransformersServe:
    """`transformers serve MODEL_DIR` on a free loopback port, stopped on exit."""

    def __init__(self, model_dir: str, port: int, continuous_batching: bool) -> None:
        flag = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/transformers-serve-{port}.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
        cmd = ["transformers", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port), flag, "--device", "cpu"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("transformers serve did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
