"""What the guarded API costs per request, apart from any model: CPU time of the server process per streamed chat
request, for

  (a) `llmstack serve` as shipped (uvicorn with the guard's protocol settings, a key, every default rail, the chat
      template, token counting, rate limits, the queue, SSE, the stream rail, audit, metrics) over the scripted
      engine with no delay (it hands out one " word" per token at once), and
  (b) a bare OpenAI-shaped streaming server under the same uvicorn: it parses the JSON body and streams the same
      number of chunks of the same shape, with no key, no rails, no template, no audit — what any server streaming
      these bytes spends,

both in their own processes, in one run, sequential requests from one client (this process), in --rounds rounds
that alternate the two systems (a machine whose speed drifts by tens of percent within a minute then weighs on both
alike). The guard's cost is (a) - (b) in CPU ms per request (goal: <= 5 ms for a 64-token streamed answer), with
its range over the rounds; printed beside it: the fixed part (a 1-token answer) and the per-token part, and each
system's p50 wall latency seen by the client.

    .venv/bin/python scripts/bench_guard.py                      # 64 and 1 tokens, 400 requests each (~1 min)
    .venv/bin/python scripts/bench_guard.py --tokens 64,256 --requests 400

CPU time rather than wall time: the client shares the machine's cores with the server, and CPU seconds of the
server process are what the server pays whatever the client does. The record goes to benchmarks/results/
(`serve-guard`, scripts/benchrecord.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchrecord  # noqa: E402
from bench_serve import QUESTIONS, socket_port, start_server  # noqa: E402

from llmstack.serve.readiness import wait_ready  # noqa: E402


def bare_server(port: int, tokens: int) -> None:
    """Internal: (b), the bare streaming server."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request):
        body = json.loads(await request.body())
        n = min(int(body.get("max_tokens") or tokens), tokens)

        async def events():
            for i in range(n):
                chunk = {"id": "chatcmpl-bare", "object": "chat.completion.chunk", "created": int(time.time()),
                         "model": body["model"], "choices": [{"index": 0, "delta": {"content": " word"},
                                                              "finish_reason": "length" if i == n - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request: Request):
        return StreamingResponse(iter(["ok"]))

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_bare(tokens: int) -> tuple[subprocess.Popen, str]:
    with socket_port() as port:
        pass
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port), "--max", str(tokens)])
    base = f"http://127.0.0.1:{port}"
    if wait_ready(base + "/health", timeout=60, poll_s=0.1, gone=lambda: proc.poll() is not None) == "ready":
        return proc, base
    proc.kill()
    sys.exit("bare server not ready")


def measure(pid: int, base: str, key: str | None, tokens: int, n: int) -> dict:
    """`n` sequential streamed requests of `tokens` tokens (after 5 not counted): the server's CPU seconds over them
    and the client's wall seconds of each."""
    import httpx
    import psutil

    proc = psutil.Process(pid)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    walls: list[float] = []
    with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
        for i in range(n + 5):
            if i == 5:
                cpu0 = sum(proc.cpu_times()[:2])
            body = {"model": "bench", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                    "max_tokens": tokens, "stream": True}
            t0 = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                chunks = sum(1 for line in r.iter_lines() if line.startswith("data: {"))
            if i >= 5:
                walls.append(time.perf_counter() - t0)
            assert chunks >= tokens, f"{chunks} chunks for {tokens} tokens"
        cpu = sum(proc.cpu_times()[:2]) - cpu0
    return {"cpu_s": cpu, "n": n, "walls": walls}


def pooled(parts: list[dict]) -> dict:
    """Rounds of one system pooled: server CPU ms per request, the client's p50 wall ms."""
    n = sum(p["n"] for p in parts)
    return {"cpu_ms": 1000 * sum(p["cpu_s"] for p in parts) / n,
            "wall_p50_ms": 1000 * statistics.median(w for p in parts for w in p["walls"])}


def systems(model: Path, work: Path, lengths: list[int], requests: int, rounds: int = 5) -> list[dict]:
    """(a) and (b) started, measured at each answer length (`requests` each, in `rounds` rounds that alternate the
    two systems, so that the machine's speed drifting during the run weighs on both alike) and stopped: a row per
    system and length (scripts/bench_serve.py reports the guard's cost from these rows too)."""
    guarded, gbase, key = start_server(model, work / "guarded", {}, engine="scripted", scripted=(max(lengths), 0.0))
    bare, bbase = start_bare(max(lengths))
    rows, per_round = [], max(1, requests // rounds)
    try:
        for tokens in lengths:
            parts = [(measure(guarded.pid, gbase, key, tokens, per_round), measure(bare.pid, bbase, None, tokens,
                                                                                      per_round))
                     for _ in range(rounds)]
            a, b = pooled([x for x, _ in parts]), pooled([y for _, y in parts])
            costs = [1000 * (x["cpu_s"] - y["cpu_s"]) / per_round for x, y in parts]
            rows += [{"system": "a_guarded_api", "tokens": tokens, **a, "rounds": rounds},
                     {"system": "b_bare_server", "tokens": tokens, **b, "rounds": rounds,
                      "guard_cost_ms_per_round": [round(c, 3) for c in costs]}]
            print(f"{tokens:4d} tokens: guarded {a['cpu_ms']:6.2f} CPU ms (p50 {a['wall_p50_ms']:6.2f} ms)   "
                  f"bare {b['cpu_ms']:6.2f} CPU ms (p50 {b['wall_p50_ms']:6.2f} ms)   "
                  f"guard's cost {a['cpu_ms'] - b['cpu_ms']:6.2f} ms (rounds {min(costs):.2f}-{max(costs):.2f})",
                  flush=True)
    finally:
        for p in (guarded, bare):
            p.terminate()
            p.wait(timeout=30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and chat template (a registry "
                                                                      "name, a path, or `tiny`)")
    ap.add_argument("--tokens", default="64,1", help="answer lengths, comma-separated (the first is the goal's)")
    ap.add_argument("--requests", type=int, default=400, help="requests per system and length")
    ap.add_argument("--rounds", type=int, default=5, help="rounds alternating the two systems (the requests split "
                    "evenly among them)")
    ap.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max", type=int, default=1024, help=argparse.SUPPRESS)
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    if args.bare_server:
        return bare_server(args.bare_server, args.max)
    lengths = [int(x) for x in args.tokens.split(",")]
    with benchrecord.work_folder("bench_guard_") as work:
        model = benchrecord.model(args.model, work)
        rows = systems(model, work, lengths, args.requests, args.rounds)
        by = {(r["system"], r["tokens"]): r for r in rows}
        top = lengths[0]
        a, b = by[("a_guarded_api", top)], by[("b_bare_server", top)]
        ratios = {"guard_cost_ms": a["cpu_ms"] - b["cpu_ms"], "guarded_vs_bare_cpu": a["cpu_ms"] / b["cpu_ms"]}
        if 1 in lengths and top != 1:
            a1, b1 = by[("a_guarded_api", 1)], by[("b_bare_server", 1)]
            ratios["guard_fixed_ms"] = a1["cpu_ms"] - b1["cpu_ms"]
            ratios["guard_per_token_us"] = 1000 * (ratios["guard_cost_ms"] - ratios["guard_fixed_ms"]) / (top - 1)
        print(f"\nthe guard's own cost per streamed {top}-token request: {ratios['guard_cost_ms']:.2f} CPU ms "
              f"(goal <= 5 ms); guarded / bare server CPU: {ratios['guarded_vs_bare_cpu']:.2f}x")
        if "guard_fixed_ms" in ratios:
            print(f"  of which fixed {ratios['guard_fixed_ms']:.2f} ms and {ratios['guard_per_token_us']:.1f} us "
                  "a token")
        path = benchrecord.write("serve-guard", settings={"model": Path(model).name, "tokens": lengths,
                                                          "requests": args.requests, "rounds": args.rounds,
                                                          "engine": "scripted, no delay"},
                                 figures={"systems": rows}, ratios=ratios, goals={"guard_cost_ms": "<= 5"},
                                 results=args.results_dir)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
