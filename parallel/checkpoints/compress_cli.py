"""`shardserve compress`: a checkpoint in, a validated new version of it in a model repository out.

    shardserve compress shardserve/tiny-llama --repo models --name tiny-llama --int8
    shardserve compress models/tiny-llama/1 --repo models --name tiny-llama --prune 0.3 --prune-structure mlp \\
        --min-agreement 0.8

Steps (each logged): load the source, apply the compression (settings recorded in the new
version's compression.json, so it can be rebuilt), load the result back through the server's
own loading code, compare it with the source on a prompt set (top-1 next-token agreement, mean
log-likelihood and perplexity, size on disk and in memory, decode tokens/s), write the report
(report.json and report.md), and publish it as the next version only if it is within the
tolerances. Exit status 0: published; 2: refused (the report says why).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from parallel.checkpoints import model_repository
from parallel.checkpoints.compression import CompressionSpec, compress, save_compressed
from parallel.checkpoints.loading import load_hf_model, resolve_model_dir
from parallel.checkpoints.validation import DEFAULT_PROMPTS, compare, measure
from parallel.runner import ModelSpec


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shardserve", description="shardserve model tools")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "compress", help=__doc__.splitlines()[0], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    c.add_argument("source", help="built-in model name, model directory, or a repository version directory")
    c.add_argument("--repo", type=Path, required=True, help="model repository base path (<repo>/<name>/<version>/)")
    c.add_argument("--name", required=True, help="model name in the repository")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights")
    c.add_argument("--int8", action="store_true", help="int8 per-channel weights for the decoder's linear layers")
    c.add_argument("--prune", type=float, default=0.0, help="fraction pruned by magnitude (0 to <1)")
    c.add_argument("--prune-structure", choices=["unstructured", "mlp"], default="unstructured")
    c.add_argument("--settings", type=Path, help="a version's compression.json: rebuild it with the same settings")
    c.add_argument("--prompts", type=Path, help="validation prompts, one per line (default: a built-in set)")
    c.add_argument("--min-agreement", type=float, default=0.9, help="least top-1 agreement with the source to publish")
    c.add_argument("--max-perplexity-ratio", type=float, default=1.25, help="most perplexity (new / source) to publish")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[bool, dict[str, Any]]:
    from transformers import AutoTokenizer

    if args.settings:
        spec = CompressionSpec(**json.loads(args.settings.read_text()))
    else:
        quantize = "int8" if args.int8 else None
        spec = CompressionSpec(dtype=args.dtype, quantize=quantize, prune=args.prune, prune_structure=args.prune_structure)
    source_dir = resolve_model_dir(str(args.source))
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    texts = args.prompts.read_text().splitlines() if args.prompts else DEFAULT_PROMPTS
    prompts = [tokenizer.encode(t) for t in texts if t.strip()]
    log(f"loading {source_dir}")
    original, _, _ = load_hf_model(cpu_spec(source_dir, "float32"))
    log(f"compressing: {spec.describe()}")
    candidate = copy.deepcopy(original)
    changes = compress(candidate, spec)
    staged = model_repository.staging_dir(args.repo, args.name)
    save_compressed(candidate, source_dir, staged, changes, spec)
    log("loading the result back through the server's loader")
    loaded, _, _ = load_hf_model(cpu_spec(staged, spec.dtype or "float32"))
    log(f"validating on {len(prompts)} prompts")
    agreement, ll_source, ll_new = compare(original, loaded, prompts)
    source, new = measure(original, source_dir, prompts, ll_source), measure(loaded, staged, prompts, ll_new)
    report: dict[str, Any] = {
        "source": str(source_dir),
        "settings": asdict(spec),
        "prompts": len(prompts),
        "top1_agreement": agreement,
        "source_measures": asdict(source),
        "new_measures": asdict(new),
        "perplexity_ratio": new.perplexity / source.perplexity,
        "tolerance": {"min_agreement": args.min_agreement, "max_perplexity_ratio": args.max_perplexity_ratio},
        "sparsity": sparsity(loaded) if spec.prune and spec.prune_structure == "unstructured" else None,
    }
    reasons = []
    if agreement < args.min_agreement:
        reasons.append(f"top-1 agreement {agreement:.3f} < {args.min_agreement}")
    if report["perplexity_ratio"] > args.max_perplexity_ratio:
        reasons.append(f"perplexity ratio {report['perplexity_ratio']:.3f} > {args.max_perplexity_ratio}")
    report["refused"] = reasons
    if reasons:
        shutil.rmtree(staged)
        report["version"] = None
    else:
        report["version"] = model_repository.publish(args.repo, args.name, staged)
    return not reasons, report


def cpu_spec(model_dir: Path, dtype: str) -> ModelSpec:
    """Compression and validation run on the CPU, in the source's float32 unless cast."""
    return ModelSpec(model=str(model_dir), revision=None, dtype=dtype, trust_remote_code=False, max_model_len=None, device="cpu")


def sparsity(model: Any) -> float:
    from parallel.checkpoints.compression import target_linears

    weights = [m.weight for m in target_linears(model).values()]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def render(report: dict[str, Any]) -> str:
    s, n = report["source_measures"], report["new_measures"]
    rows = [
        ("size on disk (MB)", s["disk_bytes"] / 1e6, n["disk_bytes"] / 1e6, "{:.2f}"),
        ("weights in memory (MB)", s["weight_bytes"] / 1e6, n["weight_bytes"] / 1e6, "{:.2f}"),
        ("perplexity", s["perplexity"], n["perplexity"], "{:.3f}"),
        ("decode tokens/s (batch 1)", s["decode_tokens_per_s"], n["decode_tokens_per_s"], "{:.1f}"),
    ]
    lines = [
        f"Settings: {CompressionSpec(**report['settings']).describe()}; source `{report['source']}`; "
        f"{report['prompts']} prompts.",
        "",
        "| measure | source | new | new / source |",
        "| --- | --- | --- | --- |",
        *(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f}x |" for label, a, b, fmt in rows),
        f"| top-1 next-token agreement | | {report['top1_agreement']:.1%} | |",
    ]
    if report["sparsity"] is not None:
        lines.append(f"| sparsity of the linear layers | | {report['sparsity']:.1%} | |")
    verdict = f"published as version {report['version']}" if report["version"] else "refused: " + "; ".join(report["refused"])
    return "\n".join([*lines, "", verdict, ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    published, report = run(args)
    markdown = render(report)
    target = model_repository.version_dir(args.repo, args.name, report["version"]) if published else args.repo / args.name
    target.mkdir(parents=True, exist_ok=True)
    (target / "report.json").write_text(json.dumps(report, indent=2))
    (target / "report.md").write_text(markdown)
    print(markdown)
    log(f"report written to {target / 'report.json'}")
    return 0 if published else 2


if __name__ == "__main__":
    sys.exit(main())
