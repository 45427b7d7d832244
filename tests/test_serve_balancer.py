"""Replicas behind a real load balancer: two `llmstack serve` processes (transformers engine, tiny model, two LoRA
versions) sharing a real redis-server, with Debian's nginx in front running serve/deploy/nginx-llmstack.conf (only its
upstream addresses and listen port rewritten). The official openai client sees one endpoint, streams included; a
`llmstack route rollback` sent to replica A is what replica B serves; a canary's stickiness holds across replicas;
the rate limit is one budget for both. nginx runs as the test user with its pid, logs and temp paths under tmp_path."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from llmstack.serve import readiness
from llmstack.serve.guard import hash_key
from llmstack.testing import free_port, nginx_balancer_conf

REPO = Path(__file__).resolve().parent.parent
USER, LIMITED, ADMIN = "sk-llmstack-user-lb", "sk-llmstack-limited-lb", "sk-llmstack-admin-lb"
A = {"Authorization": f"Bearer {ADMIN}"}
ASK = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
LIMIT = 6  # requests per minute of the limited key, for both replicas together


def wait_ready(proc, url: str, log: Path, timeout=180):
    outcome = readiness.wait_ready(url, headers=A, timeout=timeout, poll_s=0.5, gone=lambda: proc.poll() is not None)
    if outcome == "gone":
        raise RuntimeError(f"{url}: exited {proc.returncode}:\n{log.read_text()[-3000:]}")
    if outcome == "timeout":
        raise TimeoutError(f"{url} not ready in {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tiny_model, tiny_loras, redis_url, tmp_path_factory):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx; `make test` installs it)")
    tmp = tmp_path_factory.mktemp("balancer")
    (tmp / "keys.yaml").write_text(yaml.safe_dump({"keys": [
        {"id": "user", "sha256": hash_key(USER), "models": ["assistant"]},
        {"id": "limited", "sha256": hash_key(LIMITED), "models": ["assistant"], "requests_per_minute": LIMIT},
        {"id": "ops", "sha256": hash_key(ADMIN), "admin": True}]}))
    (tmp / "guard.yaml").write_text(yaml.safe_dump({"rate_limits": {"storage": redis_url,
                                                                    "requests_per_minute": 10_000}}))
    ports = [free_port(), free_port()]
    procs, env = [], {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        for i, port in enumerate(ports):
            d = tmp / f"replica{i}"
            d.mkdir()
            (d / "server.yaml").write_text(yaml.safe_dump({
                "engine": "hf", "model": str(tiny_model), "served_model_name": "v1", "max_model_len": 128,
                "adapters": {"v2": str(tiny_loras[0]), "v3": str(tiny_loras[1])}, "port": port,
                "keys": str(tmp / "keys.yaml"), "guard": str(tmp / "guard.yaml"), "routes_store": redis_url,
                "routes": {"assistant": {"primary": "v1"}}, "drain_timeout_s": 2}))
            with open(d / "server.log", "w") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", "llmstack", "serve", "--config",
                                               str(d / "server.yaml")], stdout=log, stderr=subprocess.STDOUT,
                                              env=env))
        for i, (p, port) in enumerate(zip(procs, ports)):
            wait_ready(p, f"http://127.0.0.1:{port}/ready", tmp / f"replica{i}" / "server.log")
        lb_port = free_port()
        conf = nginx_balancer_conf(tmp / "nginx", lb_port, ports)  # the shipped config, our ports, paths in tmp
        check = subprocess.run([nginx, "-t", "-c", str(conf), "-e", str(tmp / "nginx" / "error.log")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        procs.append(subprocess.Popen([nginx, "-c", str(conf), "-e", str(tmp / "nginx" / "error.log")],
                                      stderr=subprocess.PIPE))
        wait_ready(procs[-1], f"http://127.0.0.1:{lb_port}/ready", tmp / "nginx" / "error.log", timeout=20)
        yield {"lb": f"http://127.0.0.1:{lb_port}", "replicas": [f"http://127.0.0.1:{p}" for p in ports],
               "tmp": tmp}
    finally:
        for p in reversed(procs):
            stop(p)


def completions_200(base: str) -> float:
    text = httpx.get(f"{base}/metrics", headers=A).text
    m = re.search(r'llmstack_requests_total\{route="/v1/chat/completions",status="200"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def served_by(base: str, **extra) -> str:
    r = httpx.post(f"{base}/v1/chat/completions", json={**ASK, **extra}, headers=A, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["model"]


def eventually(check, timeout=5.0) -> bool:
    deadline = time.time() + timeout
    while not check() and time.time() < deadline:
        time.sleep(0.1)
    return check()


def route(*args, base: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMSTACK_ADMIN_KEY": ADMIN}
    return subprocess.run([sys.executable, "-m", "llmstack", "route", *args, "--api-base", base], env=env,
                          capture_output=True, text=True, timeout=120)


def test_openai_client_sees_one_endpoint_streams_included(cluster):
    import openai

    before = [completions_200(r) for r in cluster["replicas"]]
    client = openai.OpenAI(api_key=USER, base_url=cluster["lb"] + "/v1", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["assistant"]  # one endpoint, the key's own public name
    msgs = [{"role": "user", "content": "Tell me a story"}]
    plain = [client.chat.completions.create(model="assistant", messages=msgs, max_tokens=8, temperature=0)
             for _ in range(4)]
    texts = {p.choices[0].message.content for p in plain}
    assert len(texts) == 1 and all(p.model == "v1" for p in plain)  # same weights on both replicas, greedy
    for _ in range(2):  # one stream lands on each replica (round-robin)
        chunks = list(client.chat.completions.create(model="assistant", messages=msgs, max_tokens=8,
                                                     temperature=0, stream=True))
        assert len(chunks) > 2  # delivered as separate server-sent events, not one buffered body
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == next(iter(texts))
    after = [completions_200(r) for r in cluster["replicas"]]
    assert [b - a for a, b in zip(before, after)] == [3, 3]  # round-robin: 6 completions, 3 per replica


def test_a_rollback_sent_to_replica_a_is_what_replica_b_serves(cluster):
    a, b = cluster["replicas"]
    r = route("set", "assistant", "--primary", "v2", base=a)
    assert r.returncode == 0, r.stderr
    assert eventually(lambda: served_by(b) == "v2")
    r = route("set", "assistant", "--primary", "v3", base=b)
    assert r.returncode == 0, r.stderr
    assert eventually(lambda: served_by(a) == "v3")
    r = route("rollback", "assistant", base=a)
    assert r.returncode == 0 and '"primary": "v2"' in r.stdout, r.stdout + r.stderr
    assert eventually(lambda: served_by(b) == "v2")
    assert eventually(lambda: {served_by(cluster["lb"]) for _ in range(4)} == {"v2"})  # and through nginx


def test_canary_stickiness_holds_across_replicas(cluster):
    a, b = cluster["replicas"]
    r = route("set", "assistant", "--primary", "v1", "--canary", "v3", "--percent", "50", base=cluster["lb"])
    assert r.returncode == 0, r.stderr
    time.sleep(1.2)  # every replica re-reads the routes within refresh_s (1 s)
    users = [f"user-{i}" for i in range(16)]
    on_a = [served_by(a, user=u) for u in users]
    assert set(on_a) == {"v1", "v3"}  # the split is live
    assert on_a == [served_by(b, user=u) for u in users]
    # through nginx each user's two requests land on different replicas, and still on one version
    assert [served_by(cluster["lb"], user=u) for u in users for _ in range(2)] == [v for v in on_a for _ in range(2)]


def test_rate_limit_is_one_budget_for_both_replicas(cluster):
    before = [completions_200(r) for r in cluster["replicas"]]
    codes = [httpx.post(cluster["lb"] + "/v1/chat/completions", json=ASK, timeout=60,
                        headers={"Authorization": f"Bearer {LIMITED}"}).status_code for _ in range(LIMIT + 4)]
    assert codes == [200] * LIMIT + [429] * 4  # per-replica budgets would have let all 10 through (5 on each)
    after = [completions_200(r) for r in cluster["replicas"]]
    assert all(b - a >= 2 for a, b in zip(before, after))  # both replicas answered some of the budget


def test_an_adapter_loaded_through_one_replica_is_served_by_every_replica(cluster, tiny_loras):
    """`llmstack adapters load` sent to replica A is kept in the shared store: replica B, which never saw the call,
    serves the name at once (a request for a name it does not know reads the store first), a route set through B may
    point at it, and an unload through B takes it off A too."""
    a, b = cluster["replicas"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "LLMSTACK_ADMIN_KEY": ADMIN}
    load = subprocess.run([sys.executable, "-m", "llmstack", "adapters", "load", "v4", str(tiny_loras[1]),
                           "--api-base", a], env=env, capture_output=True, text=True, timeout=120)
    assert load.returncode == 0, load.stderr

    def answer(base: str, model: str) -> httpx.Response:
        return httpx.post(f"{base}/v1/chat/completions", headers=A, timeout=60,
                          json={**ASK, "model": model, "max_tokens": 6})

    on_b = answer(b, "v4")
    assert on_b.status_code == 200 and on_b.json()["model"] == "v4", on_b.text
    same_folder = answer(b, "v3").json()["choices"][0]["message"]["content"]  # v3 is that folder from server.yaml
    assert on_b.json()["choices"][0]["message"]["content"] == same_folder
    assert answer(a, "v4").json()["choices"][0]["message"]["content"] == same_folder
    assert httpx.get(f"{b}/admin/adapters", headers=A).json()["adapters"]["v4"] == str(tiny_loras[1].resolve())
    assert httpx.put(f"{b}/admin/adapters/v4", headers=A, json={"path": str(tiny_loras[0])}).status_code == 409

    assert route("set", "assistant", "--primary", "v4", base=b).returncode == 0
    assert eventually(lambda: {served_by(cluster["lb"]) for _ in range(4)} == {"v4"})
    refused = httpx.delete(f"{a}/admin/adapters/v4", headers=A)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "adapter_in_use"
    assert route("rollback", "assistant", base=a).returncode == 0

    assert httpx.delete(f"{b}/admin/adapters/v4", headers=A).status_code == 200
    assert eventually(lambda: "v4" not in httpx.get(f"{a}/admin/adapters", headers=A).json()["adapters"])
    gone = answer(a, "v4")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert {"v2", "v3"} <= set(httpx.get(f"{a}/admin/adapters", headers=A).json()["adapters"])  # server.yaml's stay


def start_nginx(folder: Path, upstreams: list[int], per_address: int | None = None):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    conf = nginx_balancer_conf(folder, port, upstreams, per_address=per_address)
    proc = subprocess.Popen([nginx, "-c", str(conf), "-e", str(folder / "error.log")], stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{port}"


def test_the_balancers_own_refusals_are_openai_errors(cluster):
    """What nginx itself refuses reaches the official client as OpenAI-shaped errors, like the replicas' own: a body
    over its 1 MiB, no replica reachable, and more requests in flight from one address than its limit (lowered to 4
    here; 64 shipped) — four requests whose bodies never come hold their places, the fifth gets a 429 at once."""
    import socket

    import openai

    big = httpx.post(cluster["lb"] + "/v1/chat/completions", content=b"x" * 2_000_000, timeout=30,
                     headers={"Authorization": f"Bearer {USER}", "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large", big.text

    proc, dead = start_nginx(cluster["tmp"] / "nginx-dead", [free_port()])  # a port nothing listens on
    try:
        client = openai.OpenAI(api_key=USER, base_url=dead + "/v1", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 502 and err.value.body["code"] == "replicas_unavailable"
        assert err.value.response.headers["retry-after"] == "5"
    finally:
        stop(proc)

    proc, lb = start_nginx(cluster["tmp"] / "nginx-limited", [int(r.rsplit(":", 1)[1]) for r in cluster["replicas"]],
                           per_address=4)
    held = []
    try:
        port = int(lb.rsplit(":", 1)[1])
        for _ in range(4):  # headers sent, the body promised and never sent: each holds its place
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nAuthorization: Bearer {USER}\r\n"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
            held.append(s)
        time.sleep(0.5)
        over = httpx.post(lb + "/v1/chat/completions", json=ASK, timeout=30,
                          headers={"Authorization": f"Bearer {USER}"})
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_connections", over.text
        assert over.headers["retry-after"] == "1"
        for s in held:
            s.close()
        held = []
        assert eventually(lambda: httpx.post(lb + "/v1/chat/completions", json=ASK, timeout=30,
                                             headers={"Authorization": f"Bearer {USER}"}).status_code == 200)
    finally:
        for s in held:
            s.close()
        stop(proc)
