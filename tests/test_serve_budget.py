"""Spend budgets per key (llmstack/serve/budget.py) and the usage report, over the scripted engine (the answer's
length is chosen, so what a request costs is known) with the tiny model's real tokenizer: the budget's edge under
concurrent requests on two replicas sharing a real redis-server, the ways a client could try to spend past its budget
(streams cut early, engine failures, shadows, n > 1, the Responses and Messages routes), the 429's shape and reset
time, the usage route and `llmstack usage`."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import httpx
import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.budget import Window
from llmstack.serve.guard import hash_key
from llmstack.testing import ScriptedEngine
from test_serve_attack import live

ALICE, OPS = "sk-llmstack-alice-budget", "sk-llmstack-ops-budget"
H, ADMIN = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {OPS}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8}


def keys(budget: dict | None) -> KeyFile:
    return KeyFile.model_validate({"keys": [{"id": "alice", "sha256": hash_key(ALICE), "budget": budget},
                                            {"id": "ops", "sha256": hash_key(OPS), "admin": True}]})


def make_app(tokenizer, budget: dict | None = None, engine=None, storage: str = "memory://", prices=None,
             on_store_error: str = "allow", **spec):
    engine = engine or ScriptedEngine(tokenizer, "abcdefghijkl", chunk=4)  # 3 tokens, then stop
    policy = GuardPolicy.model_validate({"rate_limits": {"storage": storage, "requests_per_minute": 100_000,
                                                         "tokens_per_minute": 10_000_000, "max_concurrent": 64,
                                                         "on_store_error": on_store_error},
                                         "caps": {"max_n": 4}})
    app = build_app(engine, ServeSpec(engine="hf", prices=prices or {}, **spec), policy, keys(budget))
    app.engine = engine
    return app


def spent(client_or_app, key: str = "alice") -> list[int]:
    """[tokens, nano-USD] charged to the key today: reservations and settlements (memory store)."""
    app = getattr(client_or_app, "app", client_or_app)
    counters = app.state.ref["server"].budgets.backend.counters
    return counters.get(f"llmstack:budget:{key}:{Window.at(time.time()).day}", [0, 0])


def report(client, **query) -> dict:
    r = client.get("/admin/usage", params=query, headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


def in_out(usage: dict) -> tuple[int, int]:
    """(input, output) tokens of a response's usage, in either API's names."""
    return (usage.get("prompt_tokens", usage.get("input_tokens")),
            usage.get("completion_tokens", usage.get("output_tokens")))


# ------------------------------------------------------------------------------------------- the budget's edge
def test_two_replicas_on_one_redis_never_spend_past_the_budget(tokenizer, redis_url):
    """36 requests at once, half to each replica, against a key allowed 400 tokens a day. Each reserves prompt + 8 and
    uses prompt + 3: settling lets more in than worst cases alone would, yet the day's spend never passes 400 and no
    reservation is left behind once every request ended."""
    import redis

    engine = ScriptedEngine(tokenizer, "abcdefghijkl", chunk=4, delay=0.01)
    budget = {"tokens_per_day": 400}
    a_app, b_app = (make_app(tokenizer, budget, engine=engine, storage=redis_url) for _ in range(2))
    with TestClient(a_app) as a, TestClient(b_app) as b:
        def ask(i):
            return (a if i % 2 else b).post("/v1/chat/completions", json=CHAT, headers=H)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(36)))
        ok = [r.json()["usage"] for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        used = sum(u["total_tokens"] for u in ok)
        prompt = ok[0]["prompt_tokens"]
        assert used <= 400
        assert refused and all(r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded"
                               for r in refused)
        assert len(ok) > 400 // (prompt + 8)  # settled reservations made room for more than worst cases would
        # never kept: what redis holds for the day is exactly what the answers used
        day = Window.at(time.time()).day
        counter = redis.Redis.from_url(redis_url).hgetall(f"llmstack:budget:alice:{day}")
        assert int(counter[b"tokens"]) == used
        rows = report(b, key="alice")["rows"]  # asked of the other replica than half of the requests
        assert [(r["requests"], r["input_tokens"] + r["output_tokens"]) for r in rows] == [(len(ok), used)]


def test_redis_scripts_count_each_charge_once(redis_url):
    """A command resent after a lost reply counts once (reserve, settle); a reservation whose reply timed out but which
    ran is settled against what it reserved, not kept."""
    import asyncio

    import redis

    from llmstack.config.serve import KeyEntry
    from llmstack.serve.budget import BudgetStore

    policy = GuardPolicy.model_validate({"rate_limits": {"storage": redis_url}})
    key = KeyEntry(id="once", sha256="0" * 64, budget={"tokens_per_day": 1000})
    counter = f"llmstack:budget:once:{Window.at(time.time()).day}"

    async def scenario():
        budgets = BudgetStore(policy, ServeSpec().prices)
        charge = await budgets.reserve(key, "tiny", "tiny", 10, 90)
        await budgets.backend.reserve(charge.id, [counter, "m"], 100, 0, [-1] * 4, [60, 60])  # resent
        reserved = int(redis.Redis.from_url(redis_url).hget(counter, "tokens"))
        await budgets.settle(charge, 10, 5)
        charge.settled = False
        await budgets.settle(charge, 10, 5)  # resent
        settled = int(redis.Redis.from_url(redis_url).hget(counter, "tokens"))
        lost = await budgets.reserve(key, "tiny", "tiny", 10, 90)
        lost.reserved = False  # as if the reply timed out after the script ran
        await budgets.settle(lost, 10, 1)
        await budgets.close()
        return reserved, settled, int(redis.Redis.from_url(redis_url).hget(counter, "tokens"))

    assert asyncio.run(scenario()) == (100, 15, 26)


def test_the_429_is_openai_shaped_and_says_when_the_day_resets(tokenizer):
    prices = {"models": {"tiny": {"input_per_million": 1000, "output_per_million": 2000}}}
    with TestClient(make_app(tokenizer, {"usd_per_day": 0.1}, prices=prices)) as c:
        codes = [c.post("/v1/chat/completions", json=CHAT, headers=H) for _ in range(6)]
        ok = [r for r in codes if r.status_code == 200]
        r = codes[-1]
        assert r.status_code == 429 and ok
        body = r.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "budget_exceeded"
        midnight = Window.at(time.time()).day_reset
        assert abs(int(r.headers["Retry-After"]) - (midnight - time.time())) <= 2
        assert datetime.fromtimestamp(midnight, UTC).strftime("%Y-%m-%dT00:00:00Z") in body["error"]["message"]
        assert "usd_per_day" in body["error"]["message"]
        # the cost charged is the prices' (1000 / 2000 USD per million)
        u = ok[0].json()["usage"]
        cost = sum(row["cost_usd"] for row in report(c)["rows"])
        assert cost == pytest.approx(len(ok) * (u["prompt_tokens"] * 1e-3 + u["completion_tokens"] * 2e-3))
        # the Messages API says the same in Anthropic's shape
        m = c.post("/v1/messages", json={"model": "tiny", "max_tokens": 8,
                                         "messages": [{"role": "user", "content": "hi"}]}, headers=H)
        assert m.status_code == 429 and m.json()["type"] == "error"
        assert m.json()["error"]["type"] == "rate_limit_error" and "Retry-After" in m.headers
        # a worst case past the whole budget can never be admitted: a 400, not a 429 to retry forever
        big = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 60}, headers=H)
        assert big.status_code == 400 and big.json()["error"]["code"] == "budget_exceeds_limit"
        # the next UTC day starts from zero
        c.app.state.ref["server"].budgets.clock = lambda: midnight + 1
        assert c.post("/v1/chat/completions", json=CHAT, headers=H).status_code == 200


def test_windows_reset_at_utc_midnight_and_month_start():
    w = Window.at(datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC).timestamp())
    assert (w.day, w.month) == ("2026-12-31", "2026-12")
    assert w.day_reset == w.month_reset == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    w = Window.at(datetime(2026, 2, 10, 5, tzinfo=UTC).timestamp())
    assert w.month_reset == datetime(2026, 3, 1, tzinfo=UTC).timestamp()


# ------------------------------------------------------------------------------------------- bypass attempts
def test_a_stream_cut_short_by_the_client_pays_what_it_generated(tokenizer):
    engine = ScriptedEngine(tokenizer, "word " * 400, chunk=5, delay=0.02)
    with TestClient(make_app(tokenizer, {"tokens_per_day": 10_000}, engine=engine)) as c:
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 300, "stream": True},
                      headers=H) as s:
            lines = s.iter_lines()
            for _ in range(3):
                next(lines)
        deadline = time.time() + 5
        while not report(c)["rows"] and time.time() < deadline:
            time.sleep(0.05)
        row = report(c)["rows"][0]
        prompt = len(engine.prompts[0])
        assert row["requests"] == 1 and row["input_tokens"] == prompt
        assert 1 <= row["output_tokens"] < 300  # what was generated before the hang-up, not the worst case
        assert spent(c)[0] == prompt + row["output_tokens"]  # the reservation of prompt + 300 was given back


def test_a_request_that_fails_mid_way_is_settled_not_kept(tokenizer):
    engine = ScriptedEngine(tokenizer, "abcdefghijklmnop", chunk=4, fail_after=2)
    with TestClient(make_app(tokenizer, {"tokens_per_day": 10_000}, engine=engine)) as c:
        assert c.post("/v1/chat/completions", json=CHAT, headers=H).status_code == 500
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}, headers=H) as s:
            assert "event: error" in list(s.iter_lines())
        row = report(c)["rows"][0]
        prompt = len(engine.prompts[0])
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (2, 2 * prompt, 2 * 2)
        assert spent(c)[0] == 2 * prompt + 4


def test_n_reserves_every_choice_and_each_route_is_charged(tokenizer):
    """n x max_tokens is reserved (a budget a single choice fits but three do not refuses n=3); chat, completions,
    the Responses API and the Messages API all charge the key, and the report adds up to their usage."""
    engine = ScriptedEngine(tokenizer, None)  # one token per max_tokens: the answer is the worst case
    with TestClient(make_app(tokenizer, {"tokens_per_day": 100}, engine=engine)) as c:
        r = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30, "n": 3}, headers=H)
        assert r.status_code == 400 and r.json()["error"]["code"] == "budget_exceeds_limit"
        one = c.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30}, headers=H)
        assert one.status_code == 200 and one.json()["usage"]["prompt_tokens"] + 3 * 30 > 100
    with TestClient(make_app(tokenizer, {"tokens_per_day": 10_000}, engine=ScriptedEngine(tokenizer, None))) as c:
        answers = [
            c.post("/v1/chat/completions", json={**CHAT, "n": 2}, headers=H),
            c.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 5}, headers=H),
            c.post("/v1/responses", json={"model": "tiny", "input": "hi", "max_output_tokens": 6}, headers=H),
            c.post("/v1/messages", json={"model": "tiny", "max_tokens": 7,
                                         "messages": [{"role": "user", "content": "hi"}]}, headers=H),
        ]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        usages = [in_out(a.json()["usage"]) for a in answers]
        # streamed, the Responses and Messages APIs report usage in their last event: charged alike
        for route, body, last in (
                ("/v1/responses", {"model": "tiny", "input": "hi", "max_output_tokens": 4}, "response.completed"),
                ("/v1/messages", {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
                 "message_delta")):
            with c.stream("POST", route, json={**body, "stream": True}, headers=H) as s:
                events = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
            done = next(e for e in reversed(events) if e.get("type") in (last, "response.incomplete"))  # cut: length
            u = done.get("response", done)["usage"]
            usages.append((u.get("input_tokens", 0), u["output_tokens"]))
        if usages[-1][0] == 0:  # message_delta carries output tokens only: the input is message_start's
            start = next(e for e in events if e.get("type") == "message_start")
            usages[-1] = (start["message"]["usage"]["input_tokens"], usages[-1][1])
        assert [u[1] for u in usages] == [8, 5, 6, 7, 4, 3]  # n=2 with this engine generates choice 0 only
        row = report(c)["rows"][0]
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (
            6, sum(u[0] for u in usages), sum(u[1] for u in usages))
        assert spent(c)[0] == sum(map(sum, usages))


def test_shadows_are_the_operators_not_the_keys(tokenizer):
    engine = ScriptedEngine(tokenizer, None, names=["v1", "v2"])
    app = make_app(tokenizer, {"tokens_per_day": 10_000}, engine=engine,
                   routes={"assistant": {"primary": "v1", "shadow": "v2"}})
    with TestClient(app) as c:
        u = c.post("/v1/chat/completions", json={**CHAT, "model": "assistant"}, headers=H).json()["usage"]
        deadline = time.time() + 5
        while len(report(c)["rows"]) < 2 and time.time() < deadline:
            time.sleep(0.05)
        rows = {(r["key"], r["model"]): r for r in report(c)["rows"]}
        assert rows["alice", "v1"]["input_tokens"] + rows["alice", "v1"]["output_tokens"] == u["total_tokens"]
        assert rows["shadow-budget", "v2"]["output_tokens"] == 8  # recorded as the operator's usage
        assert spent(c)[0] == u["total_tokens"]  # the key paid for its own request only


def test_a_request_refused_at_the_queue_gets_its_reservation_back(tokenizer):
    """The engine's queue is full (503): streamed or not, the reservation is returned and no usage is recorded."""
    engine = ScriptedEngine(tokenizer, "word " * 400, chunk=5, delay=0.02)
    app = make_app(tokenizer, {"tokens_per_day": 10_000}, engine=engine, max_concurrency=1, max_queue=0)
    with live(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=H, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json={**CHAT, "max_tokens": 300, "stream": True}) as s:
            lines = s.iter_lines()  # kept: a line iterator that is dropped closes the response
            assert '"content": "word' in "".join(next(lines) for _ in range(3))
            assert app.state.ref["server"].slots.locked()  # the stream holds the only engine slot
            held = list(spent(app))
            for stream in (True, False):
                r = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
                assert r.status_code == 503 and r.json()["error"]["code"] == "server_overloaded", stream
            assert spent(app) == held
        deadline = time.time() + 5
        while not report(c)["rows"] and time.time() < deadline:
            time.sleep(0.05)
        assert report(c)["totals"]["requests"] == 1  # the stream only


# ------------------------------------------------------------------------------------------- the usage route
def test_usage_route_is_admin_only_audited_and_filtered(tokenizer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    with TestClient(make_app(tokenizer, None, audit_log=str(audit))) as c:
        usages = [c.post("/v1/chat/completions", json=CHAT, headers=H).json()["usage"] for _ in range(3)]
        before = report(c)
        r = c.get("/admin/usage", headers=H)
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_only"
        assert report(c) == before  # nothing changed
        assert before["totals"]["requests"] == 3
        assert before["totals"]["input_tokens"] == sum(u["prompt_tokens"] for u in usages)
        assert before["totals"]["output_tokens"] == sum(u["completion_tokens"] for u in usages)
        assert report(c, key="bob")["rows"] == [] and report(c, model="other")["rows"] == []
        assert c.get("/admin/usage", params={"since": "yesterday"}, headers=ADMIN).status_code == 400
        assert c.get("/admin/usage", params={"since": "2020-01-01"}, headers=ADMIN).status_code == 400  # > 400 days
        c.app.state.ref["server"].audit.flush()
    refused = [json.loads(x) for x in audit.read_text().splitlines() if json.loads(x).get("admin") == "usage_get"]
    assert [(e["key_id"], e["status"]) for e in refused] == [("alice", 403), ("ops", 400), ("ops", 400)]


def test_a_store_outage_under_allow_serves_and_under_deny_refuses(tokenizer):
    from llmstack.testing import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(make_app(tokenizer, {"tokens_per_day": 10_000}, storage=dead)) as c:
        assert c.post("/v1/chat/completions", json=CHAT, headers=H).status_code == 200
        assert c.get("/admin/usage", headers=ADMIN).status_code == 503
        assert 'llmstack_store_errors_total{store="budgets"}' in c.get("/metrics", headers=H).text
    with TestClient(make_app(tokenizer, {"tokens_per_day": 10_000}, storage=dead, on_store_error="deny")) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers=H)
        assert r.status_code == 503 and r.json()["error"]["code"] == "rate_limit_store_unavailable"


def test_the_usage_verb_prints_a_table_and_json(tokenizer):
    """`llmstack usage` reads a live server's admin route, as `llmstack route` does."""
    from typer.testing import CliRunner

    from llmstack.cli import app as cli

    runner = CliRunner()
    with live(make_app(tokenizer, None)) as port:
        u = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=CHAT, headers=H).json()["usage"]
        base = ["usage", "--api-base", f"http://127.0.0.1:{port}"]
        table = runner.invoke(cli, base, env={"LLMSTACK_ADMIN_KEY": OPS})
        data = runner.invoke(cli, [*base, "--json", "--key", "alice"], env={"LLMSTACK_ADMIN_KEY": OPS})
        refused = runner.invoke(cli, base, env={"LLMSTACK_ADMIN_KEY": ALICE})
    assert table.exit_code == 0, table.output
    row = next(x for x in table.stdout.splitlines() if " alice " in x)
    assert row.split()[4:6] == [str(u["prompt_tokens"]), str(u["completion_tokens"])], row
    assert json.loads(data.stdout)["totals"]["requests"] == 1
    assert refused.exit_code == 1 and "403" in refused.output
