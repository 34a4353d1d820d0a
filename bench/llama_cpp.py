"""llama.cpp's `llama-server`, the CPU engine most users would pick, as a peer in bench.serving.

Built from the llama.cpp that llama-cpp-python's source distribution vendors (`LLAMA_CPP_PYTHON`,
pinned), with the machine's compiler for this CPU (`GGML_NATIVE`), once: about 13 minutes on two
cores, cached under `$SHARDSERVE_CACHE/llama.cpp/`. The model is converted to GGUF F32 (the
bench compares float32 everywhere) with the vendored `convert_hf_to_gguf.py`, cached beside the
build per model directory. The converter names a BPE pre-tokenizer by a hash of how the
tokenizer splits a test text and refuses hashes it does not list; shardserve's built-in
tokenizers are byte-level BPE with GPT-2's pre-tokenizer, so an unknown hash is given `gpt-2`
(their tokens then equal transformers' on every bench prompt: DESIGN.md's facts). The Llama
converter tries a sentencepiece vocabulary first and needs the `sentencepiece` package even to
find there is none; without it installed, the wrapper says "no tokenizer.model" as the package
would, and the converter goes on to the BPE vocabulary.

The server runs as its users run it on a CPU: `-t 2` (the cores), `-np 32` slots (the bench's
highest concurrency), a 32k context shared by the slots, continuous batching. It ends a stream
by closing the connection, so a client must not reuse a connection to it (`fresh_connections`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.peers import stop_process_group, wait_healthy
from parallel.cache_dir import cache_root

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
SERVER_FLAGS = ("-t", "2", "-np", "32", "-c", "32768", "--cont-batching")
CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF")

_CONVERT = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
from conversion import base
listed = base.TextModel.get_vocab_base_pre
def pre_tokenizer(self, tokenizer):
    try:
        return listed(self, tokenizer)
    except NotImplementedError:  # a hash the converter does not list: shardserve's byte-level BPE
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre_tokenizer
sentencepiece = base.TextModel._set_vocab_sentencepiece
def no_sentencepiece_file(self, *args, **kwargs):  # as with sentencepiece installed: on to the BPE vocab
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
base.TextModel._set_vocab_sentencepiece = no_sentencepiece_file
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def home() -> Path:
    return cache_root() / "llama.cpp" / LLAMA_CPP_PYTHON.split("==")[1]


def sources(log: Callable[[str], None] = print) -> Path:
    """The vendored llama.cpp tree of the pinned llama-cpp-python sdist (downloaded once)."""
    root = home() / "src"
    if (root / "CMakeLists.txt").exists():
        return root
    log(f"downloading {LLAMA_CPP_PYTHON}'s sources (first use only)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON, "-d", tmp]
        subprocess.run(cmd, check=True)
        (archive,) = Path(tmp).glob("*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (vendored,) = Path(tmp).glob("*/vendor/llama.cpp")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(vendored), str(root))
    return root


def llama_server(log: Callable[[str], None] = print) -> Path:
    """The llama-server binary, built on first use (about 13 minutes on two cores)."""
    binary = home() / "build" / "bin" / "llama-server"
    if binary.exists():
        return binary
    root = sources(log)
    build = home() / "build"
    log(f"building llama-server in {build} (first use only; about 13 minutes on two cores)")
    subprocess.run(["cmake", "-S", str(root), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", *CMAKE_FLAGS],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return binary


def gguf_of(model_dir: str, log: Callable[[str], None] = print) -> Path:
    """The model as GGUF F32, converted once per model directory's files."""
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file())
    key = hashlib.sha256("\0".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode()).hexdigest()
    target = home() / "models" / f"{Path(model_dir).name}-{key[:12]}-f32.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {model_dir} to {target}")
    partial = target.with_suffix(".partial")
    cmd = [sys.executable, "-c", _CONVERT, str(sources(log)), model_dir, "--outtype", "f32", "--outfile", str(partial)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    os.replace(partial, target)
    return target


class LlamaCppServer:
    """llama-server on a free loopback port serving the model as `served_name`; stop() ends it."""

    fresh_connections = True
    """It closes a stream's connection without saying so: a client reusing it gets a reset."""

    def __init__(self, model_dir: str, port: int, served_name: str, log: Callable[[str], None] = print) -> None:
        binary, model = llama_server(log), gguf_of(model_dir, log)
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/llama-server-{port}.log", "w")
        cmd = [str(binary), "-m", str(model), "--alias", served_name, "--host", "127.0.0.1", "--port", str(port), *SERVER_FLAGS]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float = 120) -> None:
        wait_healthy(self.proc, self.url, "llama-server", self.log.name, timeout_s)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        stop_process_group(self.proc)
        self.log.close()
