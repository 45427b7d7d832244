"""The shared store (a real redis-server) hanging, gone and back, under the guarded API: requests are neither failed
(no 500) nor stalled by it; route and adapter changes are refused with a 503 while it is away; every failure is
counted in llmstack_store_errors_total; `rate_limits.on_store_error` decides between serving without limits (allow)
and refusing (deny); once redis is back the limits hold again. The hang is redis's own `DEBUG SLEEP`."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import redis
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.engines import load_tokenizer
from llmstack.serve.guard import hash_key
from llmstack.testing import RedisServer, ScriptedEngine

USER, LIMITED, ADMIN = "sk-llmstack-outage-user", "sk-llmstack-outage-limited", "sk-llmstack-outage-admin"
KEYS = KeyFile.model_validate({"keys": [
    {"id": "user", "sha256": hash_key(USER)},
    {"id": "limited", "sha256": hash_key(LIMITED), "requests_per_minute": 3},
    {"id": "ops", "sha256": hash_key(ADMIN), "admin": True}]})
ASK = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; `make test` installs it)")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


RETRY_S = 3.0  # store_retry_s: after a failure the storage is skipped this long


def make_app(tiny_model, url: str, on_store_error: str = "allow"):
    policy = GuardPolicy.model_validate({"rate_limits": {
        "storage": url, "requests_per_minute": 10_000, "on_store_error": on_store_error, "store_timeout_s": 0.5,
        "store_retry_s": RETRY_S}})
    spec = ServeSpec(engine="hf", routes_store=url, routes={"assistant": {"primary": "v1"}})
    engine = ScriptedEngine(load_tokenizer(tiny_model), " hello", names=["v1", "v2"])
    return build_app(engine, spec, policy, KEYS)


def ask(c, key: str = USER):
    t0 = time.perf_counter()
    r = c.post("/v1/chat/completions", json=ASK, headers={"Authorization": f"Bearer {key}"})
    return r, time.perf_counter() - t0


def store_errors(c, store: str) -> float:
    for line in c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text.splitlines():
        if line.startswith(f'llmstack_store_errors_total{{store="{store}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_redis_hanging_or_gone_neither_fails_nor_stalls_requests(tiny_model, redis_server):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(make_app(tiny_model, redis_server.url), raise_server_exceptions=False) as c:
        assert [ask(c, LIMITED)[0].status_code for _ in range(4)] == [200, 200, 200, 429]  # limits live in redis

        sleeper = redis_server.hang(RETRY_S)
        answers = [ask(c) for _ in range(6)]
        sleeper.join()
        assert [r.status_code for r, _ in answers] == [200] * 6, answers[0][0].text
        # only the first waited out store_timeout_s (0.5 s); the rest skipped redis for store_retry_s
        assert store_errors(c, "rate_limits") == 1, [round(t, 2) for _, t in answers]
        assert answers[0][1] < 2.0 and max(t for _, t in answers[1:]) < 1.0, [round(t, 2) for _, t in answers]

        redis_server.stop()
        time.sleep(RETRY_S + 0.2)  # past the hang's skip window; the background sync meets the dead store too
        r, took = ask(c)
        assert r.status_code == 200 and r.json()["model"] == "v1" and took < 2.0  # routed as last read
        assert c.get("/v1/models", headers=admin).status_code == 200
        down = c.put("/admin/routes/assistant", json={"primary": "v2"}, headers=admin)
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
        assert "nothing was changed" in down.json()["error"]["message"] and down.headers["retry-after"] == "5"
        assert c.post("/admin/routes/assistant/rollback", headers=admin).status_code in (409, 503)
        assert store_errors(c, "routes") >= 2 and store_errors(c, "rate_limits") >= 2

        redis_server.start()  # back, empty: limits count from zero, and the replica writes back the routes it serves
        time.sleep(RETRY_S + 0.2)
        state = json.loads(redis.Redis(port=redis_server.port).get("llmstack:routes"))
        assert state["routes"] == {"assistant": {"primary": "v1"}}
        assert [ask(c, LIMITED)[0].status_code for _ in range(4)] == [200, 200, 200, 429]
        assert c.put("/admin/routes/assistant", json={"primary": "v2"}, headers=admin).status_code == 200
        assert ask(c)[0].json()["model"] == "v2"


def test_deny_refuses_with_a_503_while_the_store_is_down(tiny_model, redis_server):
    with TestClient(make_app(tiny_model, redis_server.url, "deny"), raise_server_exceptions=False) as c:
        assert ask(c)[0].status_code == 200
        redis_server.stop()
        r, took = ask(c)
        assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limit_store_unavailable", r.text
        assert r.headers["retry-after"] == "5" and took < 2.0
        assert ask(c)[0].status_code == 503  # refused at once: redis is skipped for store_retry_s
        assert store_errors(c, "rate_limits") == 1
        redis_server.start()
        time.sleep(RETRY_S + 0.2)
        assert ask(c)[0].status_code == 200
