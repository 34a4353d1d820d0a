"""lm-eval, the harness most benchmarks are scored with, against the running server.

    python -m bench.lm_eval_run                        # vLLM CPU and shardserve, about 8 minutes
    python -m bench.lm_eval_run --systems shardserve   # shardserve alone, about 2 minutes

Two small tasks whose data lives in bench/lm_eval_tasks (no hub): a loglikelihood task
(multiple choice, scored from prompt logprobs: completions with `echo` and `logprobs`, lm-eval's
`local-completions`) and a generation task (exact match, through `local-chat-completions` with
the model's chat template). lm-eval runs as its users run it, its own command in its own virtual
environment (made on first use, ~1 GB: it pins its own datasets and scikit-learn), against each
system in turn on the same model. On a random-weight model the scores are near chance: what is
measured is that the harness runs to the end and that shardserve's scores equal vLLM's (greedy,
the same model: the same log-likelihoods pick the same choices). Writes
bench/results/lm_eval.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.serving import RESULTS, log, publish, running_shardserve, running_vllm

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "bench" / "lm_eval_tasks"
LM_EVAL = "lm-eval[api]==0.4.13"
VENV = Path.home() / ".cache" / "shardserve" / "lm-eval-venv"
RUNS = {  # lm-eval model type, route, task, metric
    "loglikelihood": ("local-completions", "/v1/completions", "shardserve_python_mc", "acc,none"),
    "generation": ("local-chat-completions", "/v1/chat/completions", "shardserve_arithmetic_gen", "exact_match,none"),
}


def lm_eval_command() -> Path:
    """The lm_eval command of its own virtual environment, made on first use."""
    command, ready = VENV / "bin" / "lm_eval", VENV / ".shardserve-ready"
    if ready.exists() and ready.read_text().strip() == LM_EVAL:
        return command
    log(f"making {VENV} with {LM_EVAL} (first use only)")
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", LM_EVAL, "transformers>=5.0,<6"], check=True)
    ready.write_text(LM_EVAL)
    return command


def run_lm_eval(kind: str, base: str, served_name: str, model_dir: str, out_dir: Path) -> dict[str, Any]:
    """One lm-eval run; returns its score and how long it took."""
    model_type, route, task, metric = RUNS[kind]
    model_args = ",".join(
        (
            f"model={served_name}",
            f"base_url={base}{route}",
            f"tokenizer={model_dir}",
            "tokenizer_backend=huggingface",
            "num_concurrent=4",
            "max_retries=1",
        )
    )
    cmd = [str(lm_eval_command()), "--model", model_type, "--model_args", model_args, "--tasks", task,
           "--include_path", str(TASKS), "--output_path", str(out_dir), "--seed", "0", "--log_samples"]  # fmt: skip
    if kind == "generation":
        cmd.append("--apply_chat_template")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused"}
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"lm_eval {kind} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    [results] = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)[-1:]
    scores = json.loads(results.read_text())["results"][task]
    [samples] = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"), key=lambda p: p.stat().st_mtime)[-1:]
    answers = [json.loads(line)["resps"] for line in samples.read_text().splitlines()]
    return {
        "task": task,
        "metric": metric.split(",")[0],
        "score": scores[metric],
        "wall_s": time.monotonic() - started,
        # per document and choice: the log-likelihood (loglikelihood) or the generated text
        "answers": [[r[0][0] if kind == "loglikelihood" else r[0] for r in doc] for doc in answers],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shardserve/bench-llama")  # vLLM CPU has no kernel for tiny-llama's head_dim 16
    parser.add_argument("--systems", nargs="+", default=["vllm_cpu", "shardserve"], choices=["vllm_cpu", "shardserve"])
    parser.add_argument("--out", type=Path, default=RESULTS / "lm_eval.json")
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from parallel.checkpoints.loading import resolve_model_dir

    model_dir = str(resolve_model_dir(args.model))
    lm_eval_command()
    report: dict[str, Any] = {"model": args.model, "lm_eval": LM_EVAL, "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        runs = report["systems"]
        if "vllm_cpu" in args.systems:  # before Ray: alone on the machine
            from transformers import AutoConfig

            window = AutoConfig.from_pretrained(model_dir).max_position_embeddings
            with running_vllm(model_dir, max_model_len=min(2048, window)) as url:
                for kind in RUNS:
                    log(f"lm_eval {kind} against vLLM CPU")
                    runs.setdefault("vllm_cpu", {})[kind] = run_lm_eval(kind, url, "bench", model_dir, Path(tmp) / f"vllm-{kind}")
        if "shardserve" in args.systems:
            with running_shardserve(args.model, model_dir) as (url, name):
                for kind in RUNS:
                    log(f"lm_eval {kind} against shardserve")
                    runs.setdefault("shardserve", {})[kind] = run_lm_eval(kind, url, name, model_dir, Path(tmp) / f"ours-{kind}")
    publish(args.out, report, render(report))


def render(report: dict[str, Any]) -> str:
    lines = [
        f"lm-eval ({report['lm_eval']}) on {report['model']}, tasks in bench/lm_eval_tasks",
        "",
        "| system | run | task | metric | score | wall |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for system, runs in report["systems"].items():
        for kind, r in runs.items():
            lines.append(f"| {system} | {kind} | {r['task']} | {r['metric']} | {r['score']:.4f} | {r['wall_s']:.0f} s |")
    ours, peer = report["systems"].get("shardserve"), report["systems"].get("vllm_cpu")
    if ours and peer:
        lines.append("")
        mine = [float(x) for doc in ours["loglikelihood"]["answers"] for x in doc]
        theirs = [float(x) for doc in peer["loglikelihood"]["answers"] for x in doc]
        worst = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
        same = sum(a == b for a, b in zip(ours["generation"]["answers"], peer["generation"]["answers"], strict=True))
        lines.append(
            f"Per choice, shardserve's log-likelihoods differ from vLLM's by at most {worst:.2e} ({len(mine)} choices); "
            f"{same} of {len(ours['generation']['answers'])} generated answers are the same text."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
