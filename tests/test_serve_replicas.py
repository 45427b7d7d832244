"""Serving replicas that agree: routes kept in redis (`routes_store: redis://…`) with a real redis-server. Two
replicas (two apps, each with its own router, as two `llmstack serve` processes would have): a route set and a
rollback sent to replica A are what replica B serves; a restarted replica serves what the last change left; a canary's
stickiness holds across replicas (same `user` -> same version on both)."""

import time

from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.guard import hash_key
from llmstack.testing import ScriptedEngine

KEYS = KeyFile.model_validate({"keys": [{"id": "ops", "sha256": hash_key("sk-ops"), "admin": True}]})
H = {"Authorization": "Bearer sk-ops"}
ASK = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def replica(tokenizer, redis_url):
    engine = ScriptedEngine(tokenizer, "hi", names=["v1", "v2", "v3"])
    spec = ServeSpec(engine="hf", routes={"assistant": {"primary": "v1"}}, routes_store=redis_url)
    policy = GuardPolicy.model_validate({"rate_limits": {"storage": redis_url, "requests_per_minute": 10_000}})
    app = build_app(engine, spec, policy, KEYS)
    app.state.engine = engine
    return app


def served_by(client, **extra) -> str:
    return client.post("/v1/chat/completions", json={**ASK, **extra}, headers=H).json()["model"]


def eventually(check, timeout=5.0):
    deadline = time.time() + timeout
    while not check() and time.time() < deadline:
        time.sleep(0.1)
    return check()


def test_replicas_share_routes_through_redis(tiny_model, redis_url):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    with TestClient(replica(tok, redis_url)) as a, TestClient(replica(tok, redis_url)) as b:
        assert served_by(a) == served_by(b) == "v1"
        assert a.put("/admin/routes/assistant", json={"primary": "v2"}, headers=H).status_code == 200
        assert eventually(lambda: served_by(b) == "v2")  # sent to A, served by B (within refresh_s)
        assert b.put("/admin/routes/assistant", json={"primary": "v3"}, headers=H).status_code == 200
        assert eventually(lambda: served_by(a) == "v3")
        assert a.post("/admin/routes/assistant/rollback", headers=H).json()["assistant"]["primary"] == "v2"
        assert eventually(lambda: served_by(b) == "v2")  # the rollback, too, is everyone's
        # a canary split: the same end user lands on the same version on either replica
        assert a.put("/admin/routes/assistant", json={"primary": "v1", "canary": {"model": "v3", "percent": 50}},
                     headers=H).status_code == 200
        time.sleep(1.2)
        users = [f"user-{i}" for i in range(20)]
        on_a = [served_by(a, user=u) for u in users]
        assert on_a == [served_by(b, user=u) for u in users] and set(on_a) == {"v1", "v3"}
    # a replica started later (or restarted) serves the store's routes, not its YAML's primary v1-only route
    with TestClient(replica(tok, redis_url)) as c:
        assert c.get("/admin/routes", headers=H).json()["assistant"]["canary"] == {"model": "v3", "percent": 50.0}
        assert c.post("/admin/routes/assistant/rollback", headers=H).json()["assistant"] == {"primary": "v2"}
