"""Pairwise LLM-as-judge: two stages answer the same prompts; any OpenAI-compatible judge model says which answer is
better, once with each answer in first position, so a judge that favours a position cancels out.

Per prompt the two verdicts are mapped back to the stages and scored for stage `a`: a win 1, a tie 0.5 (an unparsable
verdict counts as a tie and is counted apart), a loss 0; the prompt's score is the mean of its two orders. The win rate
is the mean over prompts with a 95% percentile-bootstrap interval over prompts (llmstack.eval.stats.bootstrap_mean).
Also reported: how often the two orders agree on the winner (position consistency) and how often the judge picked
whichever answer came first (position bias: 0.5 is none). Every judge call is saved, raw, to a JSONL file.

Hand-written: the protocol is a prompt and two HTTP calls per item; lm-eval has no pairwise judge, and the libraries
that do (e.g. FastChat's llm_judge, alpaca_eval) bring their own prompt sets, clients and dependencies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.eval.stats import bootstrap_mean

SYSTEM = ("You are an impartial judge. Compare two assistant answers to the same user request for helpfulness, "
          "correctness and harmlessness. Ignore which answer comes first and how long it is.")
TEMPLATE = ("[User request]\n{prompt}\n\n[Answer A]\n{first}\n\n[Answer B]\n{second}\n\n"
            "Which answer is better? Reply with exactly one word: A, B, or tie.")
_VERDICT = re.compile(r"\b((?i:tie)|A|B)\b")

Judge = Callable[[list[dict[str, str]]], str]  # chat messages -> the judge's reply text


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' — the first one the reply states ("Answer A", "A.", "Tie", "[[B]]"), None when it states
    none. "tie" is matched case-insensitively, the letters only as capitals (so the article "a" is not a vote)."""
    m = _VERDICT.search(text.replace("[[", " ").replace("]]", " "))
    if m is None:
        return None
    return "tie" if m[1].lower() == "tie" else m[1]


def openai_judge(base_url: str, model: str, api_key: str | None = None, max_tokens: int = 8,
                 timeout: float = 120) -> Judge:
    """A judge behind any OpenAI-compatible /v1/chat/completions (greedy, short reply)."""
    import httpx

    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # one client for every judgement: `httpx.post` would build a client, an SSL context (~30 ms of CPU) and a new
    # connection per call
    client = httpx.Client(headers=headers, timeout=timeout)

    def call(messages: list[dict[str, str]]) -> str:
        r = client.post(url, json={"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
        if r.status_code != 200:
            raise ValueError(f"judge at {url} answered {r.status_code}: {r.text[:300]}")
        return r.json()["choices"][0]["message"]["content"] or ""

    return call


def messages(prompt: str, first: str, second: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": TEMPLATE.format(prompt=prompt, first=first, second=second)}]


@dataclass
class Verdicts:
    summary: dict[str, Any]
    rows: list[dict[str, Any]]


def compare(prompts: list[str], answers_a: list[str], answers_b: list[str], judge: Judge,
            names: tuple[str, str] = ("a", "b"), raw_path: Path | None = None) -> Verdicts:
    """Judge every prompt twice (a first, then b first); see the module doc for the scores."""
    if not (len(prompts) == len(answers_a) == len(answers_b)) or not prompts:
        raise ValueError(f"need one answer per prompt from each side (prompts {len(prompts)}, "
                         f"{names[0]} {len(answers_a)}, {names[1]} {len(answers_b)})")
    rows, per_prompt, agree, first_picked, decided, unparsed = [], [], 0, 0, 0, 0
    for i, (p, a, b) in enumerate(zip(prompts, answers_a, answers_b)):
        winners = []
        for order, (first, second) in (("ab", (a, b)), ("ba", (b, a))):
            reply = judge(messages(p, first, second))
            verdict = parse_verdict(reply)
            if verdict in ("A", "B"):
                first_label = names[0] if order == "ab" else names[1]
                second_label = names[1] if order == "ab" else names[0]
                winner = first_label if verdict == "A" else second_label
                decided += 1
                first_picked += verdict == "A"
            else:
                winner = "tie"
                unparsed += verdict is None
            winners.append(winner)
            rows.append({"id": i, "order": f"{names[0]} first" if order == "ab" else f"{names[1]} first",
                         "prompt": p, "answer_A": first, "answer_B": second, "reply": reply, "verdict": verdict,
                         "winner": winner})
        per_prompt.append(sum(1.0 if w == names[0] else 0.5 if w == "tie" else 0.0 for w in winners) / 2)
        agree += winners[0] == winners[1]
    mean, lo, hi = bootstrap_mean(per_prompt)
    judged = [r["winner"] for r in rows]
    summary = {"a": names[0], "b": names[1], "n_prompts": len(prompts), "judgements": len(rows),
               "win_rate": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)],
               "wins": judged.count(names[0]), "ties": judged.count("tie"), "losses": judged.count(names[1]),
               "unparsed": unparsed, "position_consistency": round(agree / len(prompts), 4),
               "first_position_rate": round(first_picked / decided, 4) if decided else None}
    if raw_path:
        raw_path.parent.mkdir(parents=True, exist_ok=True)
        with open(raw_path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Verdicts(summary, rows)


def read_prompts(path: Path, limit: int | None = None) -> list[str]:
    """A JSONL prompt set: each line {"prompt": ...} or {"messages": [...]} (the last user turn is the prompt)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return prompts_from_rows(rows, limit, str(path))


def held_out_prompts(folder: Path, limit: int | None = None) -> list[str]:
    """The prompts of a curated dataset's held-out rows (its `validation` split, never trained on)."""
    from datasets import load_from_disk

    ds = load_from_disk(str(folder))
    if "validation" not in ds or "messages" not in ds["validation"].column_names or not len(ds["validation"]):
        raise ValueError(f"{folder}: the judge needs a `messages` dataset with held-out rows (a validation split; "
                         "set validation_fraction > 0 in its data block)")
    return prompts_from_rows(list(ds["validation"]), limit, str(folder))


def prompts_from_rows(rows: list[dict], limit: int | None = None, where: str = "prompts") -> list[str]:
    out = []
    for row in rows:
        if "prompt" in row:
            out.append(str(row["prompt"]))
        elif "messages" in row:
            out.append(next(m["content"] for m in reversed(row["messages"]) if m.get("role") == "user"))
        else:
            raise ValueError(f"{where}: each line needs 'prompt' or 'messages' (got keys {sorted(row)})")
        if limit and len(out) >= limit:
            break
    return out


def generate_answers(target, prompts: list[str], max_tokens: int = 128) -> list[str]:
    """Greedy chat answers from a target through lm-eval's model class for its backend (hf, vllm or a server), the
    same path the chat tasks take."""
    from lm_eval.api.instance import Instance

    from llmstack.eval.run import _close, _lm

    lm = _lm(target, chat=True, scoring=False)
    try:
        reqs = [Instance("generate_until", doc={}, idx=0,
                         arguments=(lm.apply_chat_template([{"role": "user", "content": p}]),
                                    {"until": [], "max_gen_toks": max_tokens, "do_sample": False}))
                for p in prompts]
        return [str(r).strip() for r in lm.generate_until(reqs)]
    finally:
        _close(lm)


def markdown(summary: dict[str, Any]) -> list[str]:
    s = summary
    fp = "n/a" if s["first_position_rate"] is None else f"{s['first_position_rate']:.2f}"
    return [f"Judge: `{s['a']}` vs `{s['b']}` on {s['n_prompts']} prompts, each judged in both orders: win rate of "
            f"`{s['a']}` **{s['win_rate']:.3f}** [95% CI {s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] (ties count half; "
            f"0.5 = no difference); {s['wins']} wins / {s['ties']} ties / {s['losses']} losses over "
            f"{s['judgements']} judgements, {s['unparsed']} unparsable; position consistency "
            f"{s['position_consistency']:.2f}, first answer picked {fp} of decided judgements.", ""]
