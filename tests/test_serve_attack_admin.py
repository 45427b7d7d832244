"""The admin routes and the audit under attack (issue 31: "audit gaps", "admin input", "admin integrity"): every refused
admin call is audited with its key id, audit lines stay bounded whatever a request holds, hostile adapter paths and
route names get a 400 in OpenAI's shape (never a 500), and a refused adapter load leaves the served model's answers
bit-identical.

Most run in-process over `ScriptedEngine` (one that accepts adapter loads where a route needs them); the integrity test
runs the hf engine on the tiny model with real PEFT adapters."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
from llmstack.serve.app import build_app
from llmstack.serve.audit import AuditLog
from llmstack.serve.guard import hash_key
from llmstack.testing import ScriptedEngine

ALICE, ADMIN = "sk-test-alice", "sk-test-admin"
KEYS = KeyFile.model_validate({"keys": [
    {"id": "alice", "sha256": hash_key(ALICE)},
    {"id": "admin", "sha256": hash_key(ADMIN), "admin": True},
]})
H, A = {"Authorization": f"Bearer {ALICE}"}, {"Authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}


def policy(**over) -> GuardPolicy:
    raw = {"rate_limits": {"requests_per_minute": 100_000, "tokens_per_minute": 100_000_000}}
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    return GuardPolicy.model_validate(raw)


class AdapterEngine(ScriptedEngine):
    """Says its text and "loads" adapters (by name only): enough for the admin routes' own checks."""

    def __init__(self, tokenizer, *a, **kw):
        super().__init__(tokenizer, *a, **kw)
        self.adapters: dict[str, str] = {}

    async def load_adapter(self, name, path):
        self.adapters[name] = path

    async def unload_adapter(self, name):
        del self.adapters[name]


def make_app(tokenizer, audit, pol=None, engine=None, **spec):
    engine = engine or AdapterEngine(tokenizer, "Hello there, friend.")
    return build_app(engine, ServeSpec(engine="hf", **spec), pol or policy(), KEYS, audit_path=str(audit))


def lines(app, audit) -> list[dict]:
    app.state.ref["server"].audit.flush()
    return [json.loads(x) for x in audit.read_text().splitlines()] if audit.exists() else []


def error_of(r) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# --------------------------------------------------------------------------------------------- audit gaps
REFUSED = [("get", "/admin/routes", None), ("put", "/admin/routes/assistant", {"primary": "tiny"}),
           ("post", "/admin/routes/assistant/rollback", None), ("get", "/admin/adapters", None),
           ("put", "/admin/adapters/a1", {"path": "/tmp"}), ("delete", "/admin/adapters/a1", None)]
ACTIONS = ["routes_get", "route_set", "route_rollback", "adapters_get", "adapter_load", "adapter_unload"]


def test_every_admin_call_refused_to_a_non_admin_key_is_audited_with_its_key(tokenizer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = make_app(tokenizer, audit, routes={"assistant": {"primary": "tiny"}})
    with TestClient(app) as c:
        for _ in range(2):  # 12 refused calls
            for method, path, body in REFUSED:
                r = c.request(method.upper(), path, headers=H, json=body)
                assert r.status_code == 403 and error_of(r)["code"] == "admin_only"
    refused = [e for e in lines(app, audit) if e.get("status") == 403]
    assert len(refused) == 12
    assert all(e["key_id"] == "alice" and e["request_id"].startswith("admin") for e in refused)
    assert [e["admin"] for e in refused] == ACTIONS * 2
    assert [e["name"] for e in refused[:6]] == [None, "assistant", "assistant", None, "a1", "a1"]


def test_an_admin_keys_refused_call_is_audited_once(tokenizer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = make_app(tokenizer, audit, routes={"assistant": {"primary": "tiny"}})
    with TestClient(app) as c:
        r = c.put("/admin/routes/assistant", headers={**A, "Content-Type": "application/json"}, content=b"{nope")
        assert r.status_code == 400 and error_of(r)["code"] == "invalid_route"
        r = c.put("/admin/adapters/a1", headers=A, json={"nope": 1})  # body schema: no path
        assert r.status_code == 400
        r = c.post("/admin/routes/assistant/rollback", headers=A)  # audited by the route itself: once, not twice
        assert r.status_code == 409
        assert c.get("/admin/nothing-here", headers=A).status_code == 404
        r = c.put("/admin/routes/assistant", headers={**A, "Content-Type": "application/json"}, content=b"x" * 2 ** 21)
        assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    got = [(e["admin"], e["status"], e["key_id"]) for e in lines(app, audit)
           if e.get("request_id", "").startswith("admin")]
    assert got == [("route_set", 400, "admin"), ("adapter_load", 400, "admin"), ("route_rollback", 409, "admin"),
                   ("unknown", 404, "admin"), ("unknown", 413, "admin")]


def test_a_flood_of_refused_admin_calls_is_sampled_not_stored(tokenizer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = make_app(tokenizer, audit, pol=policy(audit={"unauthenticated_per_minute": 5}))
    with TestClient(app) as c:
        app.state.ref["server"].audit.clock = lambda: 600.0  # the whole flood in one minute
        assert all(c.get("/admin/routes", headers=H).status_code == 403 for _ in range(30))
        metrics = c.get("/metrics", headers=A).text
    assert len([e for e in lines(app, audit) if e.get("status") == 403]) == 5
    assert 'llmstack_audit_dropped_total{reason="admin_refused_sampled"} 25.0' in metrics


def test_audit_lines_are_bounded_whatever_the_record_holds(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", max_field_chars=4000)
    log.write({"key_id": "k", "status": 200, "guard": [f"pii:email:{i}" for i in range(20_000)]})
    log.write({"key_id": "k", "status": 200, "guard": ["x" * 4000] * 100, "detail": {f"k{i}": i for i in range(500)},
               "prompt": "y" * 1_000_000})
    log.flush()
    written = (tmp_path / "a.jsonl").read_text().splitlines()
    assert len(written) == 2 and all(len(x) <= log.max_line_chars for x in written)
    first, second = (json.loads(x) for x in written)
    assert first["guard"][-1] == "…[19900 more items]" and len(first["guard"]) == 101
    assert second["key_id"] == "k" and second["status"] == 200 and second["audit_cut"] is True  # keys never dropped
    assert "more characters" in second["prompt"]


def test_a_request_with_20000_pii_matches_writes_one_bounded_line(tokenizer, tmp_path):
    audit = tmp_path / "audit.jsonl"
    engine = AdapterEngine(tokenizer, "hi", max_model_len=10_000_000)
    app = make_app(tokenizer, audit, pol=policy(audit={"log_prompts": True}), engine=engine)
    messages = [{"role": "user", "content": f"u{i}@x.io"} for i in range(20_000)]  # one guard decision each
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", headers=H, json={**CHAT, "messages": messages})
        assert r.status_code == 200, r.text
    written = audit.read_text().splitlines() if lines(app, audit) else []
    assert len(written) == 1 and len(written[0]) <= 32_000, len(written[0])  # was 400 KB
    entry = json.loads(written[0])
    assert entry["key_id"] == "alice" and entry["status"] == 200 and "u1@x.io" not in written[0]
    assert entry["guard"][-1] == "…[19900 more items]" and entry["guard"][0] == "pii:redact:EMAIL"


# -------------------------------------------------------------------------------------------- admin input
@pytest.mark.parametrize("path", ["/tmp/" + "a" * 300 + "/x", "~no_such_user_zz9/a", "/tmp/nul\x00byte",
                                  "/tmp/" + "b/" * 3000])
def test_a_hostile_adapter_path_is_a_400_and_audited(tokenizer, tmp_path, path):
    audit = tmp_path / "audit.jsonl"
    app = make_app(tokenizer, audit)
    with TestClient(app) as c:
        r = c.put("/admin/adapters/a1", headers=A, json={"path": path})
        assert r.status_code == 400, r.text
        assert error_of(r)["param"] == "path"
        assert "a1" not in c.get("/v1/models", headers=H).text
        assert c.get("/health").status_code == 200
    got = [e for e in lines(app, audit) if e.get("admin") == "adapter_load"]
    assert [(e["status"], e["key_id"]) for e in got] == [(400, "admin")]


def test_adapters_load_only_from_the_allowed_roots(tokenizer, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    for folder in (allowed / "good", outside / "evil"):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    (allowed / "link").symlink_to(outside / "evil")
    audit = tmp_path / "audit.jsonl"
    app = make_app(tokenizer, audit, adapter_roots=[str(allowed)])
    with TestClient(app) as c:
        for i, path in enumerate([outside / "evil", allowed / ".." / "outside" / "evil", allowed / "link"]):
            r = c.put(f"/admin/adapters/a{i}", headers=A, json={"path": str(path)})
            assert r.status_code == 400 and error_of(r)["code"] == "path_not_allowed", r.text
        assert c.put("/admin/adapters/ok", headers=A, json={"path": str(allowed / "good")}).status_code == 200
        assert set(c.get("/admin/adapters", headers=A).json()["adapters"]) == {"ok"}
    got = [(e["name"], e["status"]) for e in lines(app, audit) if e.get("admin") == "adapter_load"]
    assert got == [("a0", 400), ("a1", 400), ("a2", 400), ("ok", 200)]


@pytest.mark.parametrize("name", ["zz attack", "zz\nx", "x" * 2000, "-lead", "a/b", "ü"])
def test_a_route_name_that_is_not_a_model_name_is_refused_and_never_listed(tokenizer, tmp_path, name):
    from urllib.parse import quote

    audit = tmp_path / "audit.jsonl"
    app = make_app(tokenizer, audit)
    with TestClient(app) as c:
        r = c.put(f"/admin/routes/{quote(name, safe='')}", headers=A, json={"primary": "tiny"})
        assert r.status_code in (400, 404), r.text  # "a/b" matches no route at all
        error_of(r)
        assert [m["id"] for m in c.get("/v1/models", headers=H).json()["data"]] == ["tiny"]
        assert c.get("/admin/routes", headers=A).json() == {}
    got = [e for e in lines(app, audit) if e.get("status") in (400, 404)]
    assert len(got) == 1 and got[0]["key_id"] == "admin"


def test_a_route_store_holding_an_odd_name_never_lists_it(tokenizer, tmp_path):
    store = tmp_path / "routes.json"
    app = make_app(tokenizer, tmp_path / "audit.jsonl", routes_store=str(store))
    with TestClient(app) as c:
        assert c.put("/admin/routes/good", headers=A, json={"primary": "tiny"}).status_code == 200
        router = app.state.ref["server"].router
        router._routes["zz attack"] = router._routes["good"]  # as a store written by hand would hold it
        assert [m["id"] for m in c.get("/v1/models", headers=H).json()["data"]] == ["tiny", "good"]


# ---------------------------------------------------------------------------------------- admin integrity
def _greedy(c, model="tiny") -> list:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a story about"}], "max_tokens": 6,
            "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = c.post("/v1/chat/completions", headers=A, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return [choice["message"]["content"], choice["logprobs"]]


def _broken_adapters(good, root) -> dict:
    """Adapter folders whose config loads but that do not fit: no weights, shapes off, ranks off."""
    import torch
    from safetensors.torch import load_file, save_file

    out = {}
    no_weights = shutil.copytree(good, root / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    out["no_weights"] = no_weights
    weights = load_file(str(good / "adapter_model.safetensors"))
    wide = shutil.copytree(good, root / "wide")
    save_file({k: torch.cat([v, v], dim=1) if ".lora_A." in k else v for k, v in weights.items()},
              str(wide / "adapter_model.safetensors"))
    out["wide"] = wide
    tall = shutil.copytree(good, root / "tall")
    save_file({k: torch.cat([v, v], dim=0) if ".lora_B." in k else v for k, v in weights.items()},
              str(tall / "adapter_model.safetensors"))
    out["tall"] = tall
    rank = shutil.copytree(good, root / "rank")
    config = json.loads((rank / "adapter_config.json").read_text())
    (rank / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    out["rank"] = rank
    elsewhere = shutil.copytree(good, root / "elsewhere")
    save_file({k.replace("self_attn.q_proj", "self_attn.nope_proj"): v for k, v in weights.items()},
              str(elsewhere / "adapter_model.safetensors"))
    out["elsewhere"] = elsewhere
    return out


def test_a_refused_adapter_load_leaves_the_answers_bit_identical(tiny_model, tiny_loras, tmp_path):
    from llmstack.serve.engines import HfEngine

    audit = tmp_path / "audit.jsonl"
    broken = _broken_adapters(tiny_loras[0], tmp_path)
    engine = HfEngine(tiny_model, "tiny", max_model_len=128)
    app = build_app(engine, ServeSpec(engine="hf", max_model_len=128), policy(), KEYS, audit_path=str(audit))
    with TestClient(app) as c:
        before = _greedy(c)
        for stage in ("plain model", "with an adapter loaded"):
            for kind, folder in broken.items():
                r = c.put(f"/admin/adapters/bad-{kind}", headers=A, json={"path": str(folder)})
                assert r.status_code == 400, (stage, kind, r.text)
                assert error_of(r)["code"] == "adapter_load_failed"
                assert _greedy(c) == before, (stage, kind)  # the base model's answers, bit for bit
            if stage == "plain model":
                assert c.put("/admin/adapters/good", headers=A, json={"path": str(tiny_loras[1])}).status_code == 200
                good = _greedy(c, "good")
                assert good != before  # the adapter really changes answers, so the checks above could fail
        assert _greedy(c, "good") == good
        assert set(c.get("/admin/adapters", headers=A).json()["adapters"]) == {"good"}
    refused = [e for e in lines(app, audit) if e.get("admin") == "adapter_load" and e["status"] == 400]
    assert len(refused) == 2 * len(broken) and all(e["key_id"] == "admin" for e in refused)


def test_a_load_that_fails_inside_peft_is_undone(tiny_model, tiny_loras, tmp_path, monkeypatch):
    """Past the checks, PEFT can still fail after wrapping the served model's layers: they are put back."""
    import peft.peft_model

    from llmstack.serve.engines import HfEngine

    def fails(*a, **kw):
        raise RuntimeError("failed while loading the weights")

    engine = HfEngine(tiny_model, "tiny", max_model_len=128)
    app = build_app(engine, ServeSpec(engine="hf", max_model_len=128), policy(), KEYS, audit_path=str(tmp_path / "a"))
    with TestClient(app) as c:
        before = _greedy(c)
        with monkeypatch.context() as m:
            m.setattr(peft.peft_model, "set_peft_model_state_dict", fails)
            r = c.put("/admin/adapters/late", headers=A, json={"path": str(tiny_loras[0])})
            assert r.status_code == 400 and "failed while loading" in error_of(r)["message"]
        assert _greedy(c) == before
        assert c.put("/admin/adapters/late", headers=A, json={"path": str(tiny_loras[0])}).status_code == 200
        assert _greedy(c, "late") != before and _greedy(c) == before
