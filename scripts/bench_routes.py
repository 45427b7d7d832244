"""The agent APIs' own cost: the same prompt through /v1/responses (OpenAI's Responses API) and /v1/messages
(Anthropic's Messages API) vs /v1/chat/completions, on one guarded server (real uvicorn in its own process, over the
scripted engine of `bench_serve.py --hostile`: 16 tokens in pieces of 5 at 10 ms each, so the model's cost is fixed
and only the route's translation, events and storage move). JSON and streamed, at each --levels concurrency; the
routes alternate within each round so drift of the machine falls on all of them alike. Prints each route's p50 and
its ratio to chat's (goal: <= 1.03x), and writes the record `serve-routes` (scripts/benchrecord.py).

    .venv/bin/python scripts/bench_routes.py                       # ~2 min on 2 cores
    .venv/bin/python scripts/bench_routes.py --rounds 5 --levels 1,8,32

A Responses request stores its response (`store` defaults to true, as OpenAI's does), so its p50 includes the write
to the response store (in memory here: the server has no `routes_store`; a JSON file or redis where it has).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time

import benchrecord
from bench_serve import start_scripted

PROMPT = "Who are you?"
MAX_TOKENS = 16
ROUTES = {
    "chat": ("/v1/chat/completions",
             {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}),
    "responses": ("/v1/responses", {"model": "tiny", "input": PROMPT, "max_output_tokens": MAX_TOKENS}),
    "messages": ("/v1/messages",
                 {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}),
}
HEADERS = {"Authorization": "Bearer sk-bench", "anthropic-version": "2023-06-01"}


async def run_route(base: str, route: str, n: int, conc: int, stream: bool) -> list[float]:
    """`n` requests to `route` at concurrency `conc`; each one's seconds until its whole answer (or stream) is read."""
    import httpx

    path, body = ROUTES[route]
    body = {**body, "stream": stream}
    lat: list[float] = []
    queue = list(range(n))
    async with httpx.AsyncClient(base_url=base, timeout=120, headers=HEADERS,
                                 limits=httpx.Limits(max_connections=conc + 2)) as client:
        async def worker():
            while queue:
                queue.pop()
                t0 = time.perf_counter()
                if stream:
                    async with client.stream("POST", path, json=body) as r:
                        assert r.status_code == 200, await r.aread()
                        text = b"".join([chunk async for chunk in r.aiter_bytes()])
                    assert text.rstrip().endswith((b"[DONE]", b"}")), text[-200:]
                else:
                    r = await client.post(path, json=body)
                    assert r.status_code == 200, r.text
                lat.append(time.perf_counter() - t0)

        await asyncio.gather(*[worker() for _ in range(conc)])
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1,8", help="concurrency levels")
    ap.add_argument("--requests", type=int, default=48, help="requests per route, mode, level and round")
    ap.add_argument("--rounds", type=int, default=3)
    benchrecord.add_argument(ap)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    server, base = start_scripted()
    lat: dict = {}
    try:
        for route in ROUTES:  # warm-up, not counted
            for stream in (False, True):
                asyncio.run(run_route(base, route, 8, 4, stream))
        for _ in range(args.rounds):
            for conc in levels:
                for stream in (False, True):
                    for route in ROUTES:
                        lat.setdefault((route, conc, stream), []).extend(
                            asyncio.run(run_route(base, route, args.requests, conc, stream)))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    rows, ratios = [], {}
    print(f"routes vs chat completions (scripted engine, {MAX_TOKENS} tokens x 10 ms; {args.requests} requests per "
          f"route, mode and level, {args.rounds} rounds):")
    for conc in levels:
        for stream in (False, True):
            chat = statistics.median(lat["chat", conc, stream])
            for route in ROUTES:
                p50 = statistics.median(lat[route, conc, stream])
                row = {"route": route, "concurrency": conc, "stream": stream, "p50_s": p50,
                       "p95_s": sorted(lat[route, conc, stream])[int(0.95 * len(lat[route, conc, stream])) - 1],
                       "requests": len(lat[route, conc, stream]), "vs_chat": p50 / chat}
                rows.append(row)
                mode = "stream" if stream else "json"
                if route != "chat":
                    ratios[f"{route}_vs_chat_{mode}_c{conc}"] = row["vs_chat"]
                print(f"  c={conc:<3} {mode:<6} {route:<9} p50 {p50 * 1000:7.1f} ms"
                      + ("" if route == "chat" else f" = {row['vs_chat']:.3f}x chat (goal <= 1.03x)"))
    benchrecord.write("serve-routes", settings={"requests": args.requests, "levels": levels, "rounds": args.rounds,
                                                "engine": f"scripted, {MAX_TOKENS} tokens x 10 ms"},
                      figures={"p50": rows}, ratios=ratios, goals={k: "<= 1.03x" for k in ratios},
                      results=args.results_dir)


if __name__ == "__main__":
    main()
