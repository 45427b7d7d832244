"""What splitting a reasoning model's thinking from its answer costs the guarded API (the goal: <= 2% of p50).

    .venv/bin/python scripts/bench_reasoning.py            # ~1 min, no model weights (a zero-cost scripted engine)

The same streamed and non-streamed chat requests go through two apps (in-process, over Starlette's test transport)
that differ only in the reasoning split: the served tokenizer carries llmstack's reasoning chat template
(llmstack/train/thinking.py) in both, the engine answers with the same thinking + answer text, and the server's
`reasoning.parser` is `qwen3` (split: `reasoning_content` apart, usage counts reasoning tokens, the output rails run
over both parts) or `none` (the whole text is the answer, railed once). Requests alternate between the two apps so
drift on a shared machine hits both alike; the figure is each app's median wall time per request, and the ratio
split / no split — with an engine that costs nothing (the split's own cost, against an API-only p50) and with 10 ms
between deltas (a CPU's decode pace).

Writes its record under benchmarks/results/ (`reasoning-<timestamp>.json`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchrecord  # noqa: E402 - the scripts folder's shared record writer

THINKING = " ".join(f"step{i} checks the sum again" for i in range(12))  # ~60 words of thinking
ANSWER = "The answer is 4, because two and two make four."


def app_for(parser: str, tokenizer, delay: float):
    from fastapi.testclient import TestClient

    from llmstack.config.serve import GuardPolicy, KeyFile, ServeSpec
    from llmstack.serve.app import build_app
    from llmstack.serve.guard import hash_key
    from llmstack.testing import ScriptedEngine

    keys = KeyFile.model_validate({"keys": [{"id": "bench", "sha256": hash_key("sk-bench")}]})
    policy = GuardPolicy.model_validate({"rate_limits": {"requests_per_minute": 1_000_000,
                                                         "tokens_per_minute": 100_000_000}})
    engine = ScriptedEngine(tokenizer, f"{THINKING}\n</think>\n\n{ANSWER}", chunk=6, delay=delay, names=["bench"],
                            max_model_len=4096)
    spec = ServeSpec(engine="hf", reasoning={"parser": parser})
    return TestClient(build_app(engine, spec, policy, keys))


def one(client, stream: bool, i: int) -> float:
    body = {"model": "bench", "messages": [{"role": "user", "content": f"What is 2+2? (#{i})"}], "max_tokens": 512,
            "stream": stream}
    headers = {"Authorization": "Bearer sk-bench"}
    t0 = time.perf_counter()
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200 and sum(1 for _ in r.iter_lines()) > 4
    else:
        r = client.post("/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 200, r.text
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60, help="requests per app and mode (a quarter with a delay)")
    ap.add_argument("--delays", type=float, nargs="+", default=[0.0, 0.01],
                    help="seconds between the engine's deltas: 0 shows the split's own cost, 0.01 a CPU decode pace")
    benchrecord.add_argument(ap)
    args = ap.parse_args()

    from llmstack.models import resolve
    from llmstack.serve.engines import load_tokenizer
    from llmstack.train.thinking import chat_template

    model = resolve("smollm2-135m-instruct")
    tokenizer = load_tokenizer(model)
    tokenizer.chat_template = chat_template(tokenizer)
    figures, ratios = {}, {}
    for delay in args.delays:
        with app_for("qwen3", tokenizer, delay) as split, app_for("none", tokenizer, delay) as plain:
            # the split really happens in one app and not in the other
            msg = split.post("/v1/chat/completions", json={"model": "bench", "max_tokens": 512, "messages": [
                {"role": "user", "content": "x"}]}, headers={"Authorization": "Bearer sk-bench"}).json()
            assert msg["choices"][0]["message"].get("reasoning_content"), msg
            for stream in (True, False):
                times = {"split": [], "no_split": []}
                n = args.requests if delay == 0 else max(6, args.requests // 4)
                for i in range(n + 3):
                    for name, client in (("split", split), ("no_split", plain)) if i % 2 else (
                            ("no_split", plain), ("split", split)):
                        t = one(client, stream, i)
                        if i >= 3:  # warm-up
                            times[name].append(t)
                mode = f"{'stream' if stream else 'json'}_delay{delay * 1000:g}ms"
                p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
                figures[mode] = {**{f"{k}_p50_ms": v for k, v in p50.items()},
                                 "added_ms": p50["split"] - p50["no_split"]}
                ratios[f"{mode}_p50_split_vs_no_split"] = p50["split"] / p50["no_split"]
                print(f"{mode:18}: p50 split {p50['split']:.2f} ms, no split {p50['no_split']:.2f} ms = "
                      f"{ratios[f'{mode}_p50_split_vs_no_split']:.3f}x (goal <= 1.02x)", flush=True)
    path = benchrecord.write("reasoning", settings={"requests": args.requests, "thinking_words": len(THINKING.split()),
                                                    "answer_words": len(ANSWER.split()), "engine": "scripted, 6 chars "
                                                    "per delta", "delays_s": args.delays,
                                                    "thinking_policy": "rail (default)"},
                             figures=figures, ratios=ratios,
                             goals={k: "<= 1.02x" for k in ratios}, results=args.results_dir)
    del path  # benchrecord.write prints where the record went


if __name__ == "__main__":
    main()
