"""The first hour, run as a new user runs it: `serve run` in one terminal, everything else in
another process (`serve status`, every README example, which must print what the README shows),
and one's own checkpoint started in one line with Ray Serve's builder arguments.

These start their own Ray (through `serve run`, as a user does), so they run before the
session's shared cluster exists; every server started here is stopped by its process id.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from deployments.app import RAY_HIGH_THROUGHPUT_ENV
from parallel.checkpoints.shaped_models import write_shaped_checkpoint
from tools.doc_corpus import python_docs

from .conftest import free_port, wait_until
from .test_readme_examples import EXAMPLES, PRINTS, localize, prints_as_shown

pytestmark = pytest.mark.own_cluster

ROOT = Path(__file__).resolve().parent.parent


class ServeRun:
    """`serve run ...` in a process group of its own, its console captured to a file."""

    def __init__(self, args: list[str], log: Path, port: int, exported: dict[str, str] | None = None) -> None:
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
        self.log = log
        self.base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}  # a fresh terminal
        env |= {"RAY_USAGE_STATS_ENABLED": "0", **(exported or {})}
        self.env = env
        with log.open("w") as out:
            self.proc = subprocess.Popen(["serve", "run", *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT, preexec_fn=_as_in_a_terminal)  # fmt: skip
        wait_until(self._ready, timeout_s=300, interval_s=1)

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve run exited with {self.proc.returncode}:\n{self.console()[-3000:]}")
        try:
            return httpx.get(f"{self.base}/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> bool:
        """Ctrl-C, as a user stops it (Serve shuts down, then the Ray it started). Returns whether
        it exited on its own within 30 s (else it is killed)."""
        exited = True
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                exited = False
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
        return exited


def _as_in_a_terminal() -> None:
    """The child's own process group (Ctrl-C goes to all of it), with Ctrl-C's default action:
    a test run started in the background (nohup, `&`) has SIGINT ignored, which the child would
    inherit, and `serve run` would then never see the Ctrl-C."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# README "High-throughput mode". The drain Serve gives an ingress replica for outside load
# balancers (30 s) is cut here, where nothing but the local HAProxy routes to it.
HIGH_THROUGHPUT = {**RAY_HIGH_THROUGHPUT_ENV, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def listening_process(port: int) -> str:
    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return psutil.Process(pid).name()


def settled_generation_tokens(base: str) -> float:
    """Tokens generated so far, once nothing runs and two pushes to the metrics hub agree."""

    def counters() -> tuple[float, float]:
        text = httpx.get(f"{base}/metrics", timeout=10).text
        return tuple(  # type: ignore[return-value]
            sum(float(v) for v in re.findall(rf"^shardserve:{name}\{{[^}}]*\}} (\S+)", text, flags=re.M))
            for name in ("generation_tokens_total", "num_requests_running")
        )

    seen: list[tuple[float, float]] = []

    def settled() -> bool:
        seen.append(counters())
        return len(seen) >= 2 and seen[-1] == seen[-2] and seen[-1][1] == 0

    wait_until(settled, timeout_s=60, interval_s=2.5)  # the replicas push every 2 s
    return seen[-1][0]


class TestTheEmbeddedDefault:
    @pytest.fixture(scope="class", params=["as-shipped", "high-throughput"])
    def default(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeRun]:
        """serve_config.yaml as it ships, on a free port; started plainly, then again with Ray
        Serve's high-throughput mode exported in the terminal."""
        config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        port = free_port()
        config["http_options"]["port"] = port
        tmp = tmp_path_factory.mktemp("first-hour")
        (tmp / "serve_config.yaml").write_text(yaml.safe_dump(config))
        exported = HIGH_THROUGHPUT if request.param == "high-throughput" else None
        run = ServeRun([str(tmp / "serve_config.yaml")], tmp / "console.log", port, exported)
        if exported:
            assert "Throughput optimized Ray Serve enabled" in run.console()
            assert listening_process(port) == "haproxy"  # not Serve's Python proxy
        yield run
        assert run.stop(), "serve run did not exit within 30 s of Ctrl-C"
        assert not [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "haproxy"], "Ctrl-C left HAProxy running"

    def test_serve_status_in_a_second_terminal(self, default: ServeRun) -> None:
        """As the README says: token mode on for Ray's CLI, since Ray turned token auth on."""
        out = subprocess.run(["serve", "status"], capture_output=True, text=True, timeout=120,
                             env={**default.env, "RAY_AUTH_MODE": "token"})  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        status = yaml.safe_load(out.stdout)
        assert status["applications"]["shardserve"]["status"] == "RUNNING"
        assert status["applications"]["shardserve"]["deployments"]["LLMServer"]["replica_states"] == {"RUNNING": 1}

    @pytest.mark.parametrize("name", sorted(EXAMPLES))
    def test_readme_example_in_a_second_process_prints_what_the_readme_shows(self, default: ServeRun, name: str) -> None:
        """Verbatim but for the port, each in a process of its own as a user runs it; greedy, so
        the text is the model's and must be the README's, token for token."""
        code = localize(EXAMPLES[name], default.base)
        command = ["bash", "-euc", code] if name in ("curl", "tfserving") else [sys.executable, "-c", code]
        out = subprocess.run(command, capture_output=True, text=True, timeout=120, env=default.env, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-3000:]
        assert prints_as_shown(name, out.stdout), f"README shows:\n{PRINTS[name]}\n\nit printed:\n{out.stdout}"
        assert "ServeReplica" not in out.stdout + out.stderr  # the replicas' logs stay in serve run's console

    def test_its_greedy_answers_are_words_of_the_python_docs(self, default: ServeRun) -> None:
        """64 greedy tokens each, over HTTP: nearly every word is one the training corpus uses
        (a random-weight model writes byte soup: none would be)."""
        vocabulary = {w for doc in python_docs().documents for w in re.findall(r"[A-Za-z]+", doc)}
        words: list[str] = []
        for route, body in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "What does the len() function return?"}]}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "How do I sort a list?"}]}),
            ("/v1/completions", {"prompt": "The with statement"}),
        ]:
            body |= {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
            res = httpx.post(f"{default.base}{route}", json=body, timeout=60)
            assert res.status_code == 200, res.text
            (choice,) = res.json()["choices"]
            assert res.json()["usage"]["completion_tokens"] == 64
            words += re.findall(r"[A-Za-z]+", choice.get("text") or choice["message"]["content"])
        assert len(words) > 50
        assert sum(w in vocabulary for w in words) / len(words) > 0.9, words

    def test_a_client_that_leaves_mid_stream_stops_its_generation(self, default: ServeRun) -> None:
        """The disconnect has to travel back through whatever is in front of the ingress (Serve's
        proxy, or HAProxy to the ingress replica's own server) to the engine."""
        asked = 1500  # seconds of decoding: far longer than the metrics take to show it stopped
        before = settled_generation_tokens(default.base)
        body = {"prompt": "The list type", "max_tokens": asked, "ignore_eos": True, "stream": True, "temperature": 0}
        with httpx.Client(base_url=default.base, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as res:
                assert res.status_code == 200
                events = (line for line in res.iter_lines() if line.startswith("data: "))
                for _ in range(3):
                    next(events)
        assert 3 <= settled_generation_tokens(default.base) - before < asked / 2

    def test_internal_calls_do_not_flood_the_console(self, default: ServeRun) -> None:
        """Replicas push their metrics to the hub every couple of seconds; none of it is logged."""
        r = httpx.post(f"{default.base}/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "temperature": 0}, timeout=60)
        assert r.status_code == 200

        def pushed() -> bool:  # the hub shows the replica's counters only once it has pushed them
            text = httpx.get(f"{default.base}/metrics", timeout=10).text
            return bool(re.search(r'^shardserve:generation_tokens_total\{[^}]*\} [1-9]', text, flags=re.M))

        wait_until(pushed, timeout_s=60, interval_s=0.5)
        console = default.console()
        assert "CALL push" not in console, [line for line in console.splitlines() if "CALL push" in line][:3]


def test_own_checkpoint_in_one_line(tmp_path: Path) -> None:
    """`serve run deployments.app:build_app model=...` with dotted nested fields; Serve listens
    on its default port, 8000."""
    if free_port(8000) != 8000:
        pytest.fail("port 8000 is taken: the one-line start listens there (Serve's default)")
    model = write_shaped_checkpoint("qwen2.5-7b-instruct", tmp_path / "Qwen2.5-7B-Instruct")
    run = ServeRun(["deployments.app:build_app", f"model={model}", "served_model_name=byo", "engine.max_num_seqs=4"],
                   tmp_path / "console.log", 8000)  # fmt: skip
    try:
        (card,) = httpx.get(f"{run.base}/v1/models", timeout=30).json()["data"]
        assert card["id"] == "byo" and card["max_model_len"] == 32768
        chat = {"model": "byo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{run.base}/v1/chat/completions", json=chat, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4, answer
        assert "max_num_seqs=4 sequences of 32768 tokens" in run.console()  # the nested field reached the engine
        assert run.stop(), "serve run did not exit within 30 s of Ctrl-C"
    finally:
        run.stop()
