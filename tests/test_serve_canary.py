"""Canary and shadow routing through the real API (transformers engine, tiny model, two LoRA versions):
the split follows the configured share, shadow answers never reach the client, and a rollback restores routing."""

from __future__ import annotations

import json

import httpx
import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.engines import HfEngine
from llmstack.serve.guard import hash_key

USER, ADMIN = "sk-llmstack-user-test", "sk-llmstack-admin-test"
KEYS = KeyFile.model_validate({"keys": [
    {"id": "user", "sha256": hash_key(USER), "models": ["assistant"]},
    {"id": "ops", "sha256": hash_key(ADMIN), "admin": True},
]})
U, A = {"Authorization": f"Bearer {USER}"}, {"Authorization": f"Bearer {ADMIN}"}
ASK = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def client(tiny_model, tiny_loras, tmp_path_factory):
    audit = tmp_path_factory.mktemp("canary") / "audit.jsonl"
    spec = ServeSpec(engine="hf", max_model_len=128, routes={"assistant": {
        "primary": "v1", "canary": {"model": "v2", "percent": 20}, "shadow": "v3"}})
    engine = HfEngine(tiny_model, "v1", adapters={"v2": str(tiny_loras[0]), "v3": str(tiny_loras[1])},
                      max_model_len=128)
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 10_000}})
    with TestClient(build_app(engine, spec, policy, KEYS, audit_path=str(audit))) as c:
        c.audit = audit
        yield c


def audit(c) -> list[dict]:
    c.app.state.ref["server"].audit.flush()  # lines are written by the audit thread
    return [json.loads(x) for x in c.audit.read_text().splitlines()]


def wait_shadows(c, n: int) -> list[dict]:
    import time

    for _ in range(600):
        shadows = [e for e in audit(c) if e.get("shadow")]
        if len(shadows) >= n:
            return shadows
        time.sleep(0.05)
    raise TimeoutError(f"{n} shadow entries expected")


def test_split_follows_the_share_and_shadow_never_answers(client):
    n = 100
    answered_by = []
    for i in range(n):
        r = client.post("/v1/chat/completions", headers=U, json={**ASK, "user": f"user-{i}"})
        assert r.status_code == 200, r.text
        answered_by.append(r.json()["model"])
    assert set(answered_by) <= {"v1", "v2"}  # the shadow version never answers a client
    canary = answered_by.count("v2")
    assert 8 <= canary <= 32, canary  # 20% of 100 = 20; binomial sd = 4
    # the same user always lands on the same version
    again = [client.post("/v1/chat/completions", headers=U, json={**ASK, "user": "user-7"}).json()["model"]
             for _ in range(3)]
    assert again == [answered_by[7]] * 3
    shadows = wait_shadows(client, n + 3)
    assert {s["served_by"] for s in shadows} == {"v3"} and all(s["status"] == 200 for s in shadows)
    live = [e for e in audit(client) if not e.get("shadow") and e.get("arm")]
    assert {e["served_by"] for e in live} == {"v1", "v2"}
    metrics = client.get("/metrics", headers=A).text
    assert 'llmstack_routed_requests_total{arm="shadow",model="v3",name="assistant"}' in metrics


def test_only_admin_keys_change_routes_and_rollback_restores(client):
    assert client.get("/admin/routes", headers=U).status_code == 403
    before = client.get("/admin/routes", headers=A).json()
    assert before["assistant"]["canary"] == {"model": "v2", "percent": 20.0}

    # promote the canary to everyone ...
    r = client.put("/admin/routes/assistant", headers=A, json={"primary": "v2"})
    assert r.status_code == 200 and r.json()["assistant"] == {"primary": "v2"}
    models = {client.post("/v1/chat/completions", headers=U, json={**ASK, "user": f"u{i}"}).json()["model"]
              for i in range(20)}
    assert models == {"v2"}
    # ... then roll back in one call: the earlier split is back
    assert client.post("/admin/routes/assistant/rollback", headers=A).json() == before
    models = [client.post("/v1/chat/completions", headers=U, json={**ASK, "user": f"u{i}"}).json()["model"]
              for i in range(60)]
    assert "v1" in models and "v2" in models
    r = client.post("/admin/routes/assistant/rollback", headers=A)
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_to_roll_back"


def test_bad_routes_are_refused(client, tiny_model):
    r = client.put("/admin/routes/assistant", headers=A, json={"primary": "ghost"})
    assert r.status_code == 400 and "ghost is not served here" in r.json()["error"]["message"]
    r = client.put("/admin/routes/assistant", headers=A, json={"primary": "v1", "canary": {"model": "v2"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_route"
    with pytest.raises(ValueError, match="routes.x: nope is not served here"):
        build_app(HfEngine(tiny_model, "v1"), ServeSpec(engine="hf", routes={"x": {"primary": "nope"}}), None, KEYS)


def test_route_cli_rollback_against_a_live_server(tiny_model, tiny_loras, tmp_path):
    """`llmstack route set` then `llmstack route rollback` against a real `llmstack serve` process."""
    import os
    import subprocess
    import sys

    import yaml

    from llmstack.testing import free_port, wait_http

    port = free_port()
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [k.model_dump() for k in KEYS.keys]}))
    (tmp_path / "server.yaml").write_text(yaml.safe_dump({
        "engine": "hf", "model": str(tiny_model), "served_model_name": "v1", "adapters": {"v2": str(tiny_loras[0])},
        "port": port, "max_model_len": 128, "keys": "keys.yaml",
        "routes": {"assistant": {"primary": "v1", "canary": {"model": "v2", "percent": 5}}}}))
    proc = subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config", str(tmp_path / "server.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "LLMSTACK_ADMIN_KEY": ADMIN}
    base = ["--api-base", f"http://127.0.0.1:{port}"]

    def route(*args):
        return subprocess.run([sys.executable, "-m", "llmstack", "route", *args, *base], capture_output=True,
                              text=True, env=env)

    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        r = route("set", "assistant", "--primary", "v2")
        assert r.returncode == 0 and json.loads(r.stdout) == {"primary": "v2"}, r.stderr
        r = route("rollback", "assistant")
        assert r.returncode == 0 and json.loads(r.stdout)["canary"] == {"model": "v2", "percent": 5.0}, r.stderr
        r = route("rollback", "assistant")
        assert r.returncode == 1 and "409" in r.stderr and "Traceback" not in r.stderr

        def adapters(*args):
            return subprocess.run([sys.executable, "-m", "llmstack", "adapters", *args, *base], capture_output=True,
                                  text=True, env=env)

        # an adapter added at runtime is served under its name at once, and leaves again
        r = adapters("load", "v3", str(tiny_loras[1]))
        assert r.returncode == 0 and json.loads(r.stdout)["adapters"]["v3"] == str(tiny_loras[1].resolve()), r.stderr
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"model": "v3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["model"] == "v3"
        r = adapters("unload", "v2")  # the route's canary still sends traffic to it
        assert r.returncode == 1 and "409" in r.stderr and "assistant" in r.stderr
        r = adapters("load", "v4", str(tmp_path))  # not an adapter folder: refused before any request
        assert r.returncode == 2 and "no adapter_config.json" in r.stderr
        r = adapters("unload", "v3")
        assert r.returncode == 0 and "v3" not in json.loads(r.stdout)["adapters"], r.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=60)
