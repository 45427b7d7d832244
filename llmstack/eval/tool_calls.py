"""The `tool_calls` eval task: given a conversation and the tools it offers, does the model call the right function
with the right arguments?

Items are held-out glaive function-calling rows (`data/glaive_toolcall_en_demo.json` in the `llamafactory==0.9.5`
sdist, from glaiveai/glaive-function-calling-v2): the conversation up to the first assistant turn that calls a tool,
the row's tools, and that call as the reference (items too short for 13-gram decontamination to hold them out of a
training set are skipped). Per item:

    name_acc       the first call names the reference function (the primary score)
    args_exact     ... and its arguments equal the reference's (as JSON objects)
    schema_valid   the answer makes at least one call and every call names a declared function with arguments its
                   JSON Schema accepts (llmstack.tools.check_call)
    called         the answer makes a call at all

Scoring is not lm-eval's: its chat-template path cannot pass `tools` to the template. `score(items, answer)` takes a
callable that answers one item:
- `hf_answerer` generates in-process with the model's tool template (llmstack.tools.template_for, the rendering
  training used) and reads calls back with llmstack.tools.parse_calls;
- `server_answerer` asks a live `llmstack serve` (or any OpenAI-compatible server) with the official `openai` client,
  `tools` and `tool_choice` in the request, and reads `message.tool_calls`.
`tool_choice` (Target.tool_choice, `eval.tool_choice`, `llmstack eval --tool-choice`): `auto` lets the model decide
whether to call; `required` forces a call decoded under the tools' JSON Schema (the server's structured outputs, or
xgrammar in-process), which measures whether the model picks the right function and arguments when it must call one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmstack import tools as T
from llmstack.config.eval_suites import EvalDataError
from llmstack.paths import cache_root

log = logging.getLogger("llmstack")

TASK = "tool_calls"
PRIMARY = "name_acc"
METRICS = ("name_acc", "args_exact", "schema_valid", "called")
SDIST = "llamafactory==0.9.5"
SDIST_FILE = "llamafactory-0.9.5.tar.gz"
SDIST_SHA256 = "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f"
MEMBER = "llamafactory-0.9.5/data/glaive_toolcall_en_demo.json"
SEED = 1234
ITEMS = 60  # items kept (a seeded shuffle of the rows that call a tool); suites take a prefix
MAX_NEW_TOKENS = 96
MIN_WORDS = 16  # items need this many words (13-gram decontamination, with a margin for its normalisation)

Answer = dict  # {"content": str | None, "calls": [{"name": str, "arguments": dict | str}]}
Answerer = Callable[[list[dict], list[dict]], Answer]


# ---------------------------------------------------------------- data
def data_path() -> Path:
    return cache_root() / "eval" / f"{TASK}.jsonl"


def _sdist() -> Path:
    """The llamafactory sdist, checked against its pinned sha256: the copy the curate stage fetched when there is one
    (same cache), else `pip download` into the eval downloads folder (this layer does not import llmstack.data)."""
    for cand in (cache_root() / "data" / "pypi" / "llamafactory_0.9.5-sdist" / "archive" / SDIST_FILE,
                 cache_root() / "downloads" / "llamafactory" / SDIST_FILE):
        if cand.is_file():
            return _verified(cand)
    dest = cache_root() / "downloads" / "llamafactory"
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--no-binary", ":all:", "-d", tmp, SDIST]
        log.info("downloading %s (sdist)", SDIST)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise EvalDataError(f"pip download {SDIST} failed:\n{proc.stderr.strip()[-2000:]}")
        shutil.move(str(Path(tmp) / SDIST_FILE), dest / SDIST_FILE)
    return _verified(dest / SDIST_FILE)


def _verified(path: Path) -> Path:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise EvalDataError(f"{path} has sha256 {digest}, not the pinned {SDIST_SHA256}; delete it to fetch again")
    return path


def items_from_glaive(rows: list[dict]) -> list[dict]:
    """One item per row that calls a tool: the turns before its first call, its tools (OpenAI shape), that call.
    Written here rather than with llmstack.data.formats (a higher layer): the prefix before a first call holds only
    human/gpt turns, so this is a role rename; rows whose reference call fails its own schema are left out."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    items = []
    for i, row in enumerate(rows):
        turns = row.get("conversations") or []
        first = next((k for k, t in enumerate(turns) if t.get("from") == "function_call"), None)
        if first is None:
            continue
        try:
            tools = [{"type": "function", "function": fn} for fn in json.loads(row.get("tools") or "[]")]
            call = json.loads(turns[first]["value"])
            call = call[0] if isinstance(call, list) else call
            call = {"name": call["name"], "arguments": T.arguments_object(call.get("arguments") or {})}
            T.check_call(call, tools)
            messages = [{"role": roles[t["from"]], "content": t["value"]} for t in turns[:first]]
        except (ValueError, KeyError, TypeError):
            continue
        item = {"id": f"glaive-{i}", "messages": messages, "tools": tools, "call": call}
        # Too short for the 13-word decontamination to find it in training data: it could not be held out.
        if len(item_text(item).split()) >= MIN_WORDS:
            items.append(item)
    random.Random(SEED).shuffle(items)
    return items[:ITEMS]


def prepare_data(force: bool = False) -> Path:
    out = data_path()
    if out.exists() and not force:
        return out
    with tarfile.open(_sdist()) as tf:
        rows = json.load(tf.extractfile(MEMBER))
    items = items_from_glaive(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    tmp.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    tmp.replace(out)
    log.info("eval data %-14s %4d items", TASK, len(items))
    return out


def item_text(doc: dict) -> str:
    """What could leak into training data, in the order curation flattens a tool row (llmstack.data.formats
    flat_text: every turn's content, then the call's name and its string argument values), so the 13-gram
    decontamination of a recipe that trains on glaive rows drops exactly these held-out conversations."""
    parts = [m["content"] for m in doc["messages"]] + [doc["call"]["name"]]
    parts += _strings(doc["call"]["arguments"])
    return "\n\n".join(parts)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


# ---------------------------------------------------------------- scoring
def score_answer(item: dict, answer: Answer) -> dict[str, float]:
    """The per-item metrics (see the module doc) for one answer."""
    calls, valid = [], True
    for c in answer.get("calls") or []:
        try:
            call = {"name": c.get("name"), "arguments": T.arguments_object(c.get("arguments"))}
            T.check_call(call, item["tools"])
        except T.ToolCallError:
            valid = False
            call = {"name": c.get("name"), "arguments": None}
        calls.append(call)
    ref = item["call"]
    first = calls[0] if calls else None
    named = bool(first) and first["name"] == ref["name"]
    return {"name_acc": float(named), "args_exact": float(named and first["arguments"] == ref["arguments"]),
            "schema_valid": float(bool(calls) and valid), "called": float(bool(calls))}


def score(items: list[dict], answer: Answerer, samples: Path | None = None) -> dict[str, Any]:
    """Score `answer` on the items: {"score", "metric", "n", "all", "ci95", "items"} as llmstack.eval.run reports
    every task (per-item primary scores in item order, for paired comparisons between stages)."""
    from llmstack.eval.stats import wilson

    per_item, logs = [], []
    for item in items:
        got = answer(item["messages"], item["tools"])
        s = score_answer(item, got)
        per_item.append(s)
        logs.append({"doc": {"id": item["id"], "messages": item["messages"], "call": item["call"]},
                     "answer": got, "scores": s})
    if samples is not None:
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_text("".join(json.dumps(x, ensure_ascii=False, default=str) + "\n" for x in logs))
    n = len(per_item)
    means = {m: (sum(s[m] for s in per_item) / n if n else None) for m in METRICS}
    called = sum(s["called"] for s in per_item)
    means["schema_valid_of_called"] = sum(s["schema_valid"] for s in per_item) / called if called else None
    primary = [s[PRIMARY] for s in per_item]
    return {"score": means[PRIMARY], "metric": PRIMARY, "n": n, "chat": True, "all": means,
            "ci95": [round(x, 4) for x in wilson(sum(primary), n)] if n else None, "items": primary}


def hf_answerer(model_dir: Path, adapter: Path | None = None, batch_size: int = 8,
                max_new_tokens: int = MAX_NEW_TOKENS, tool_choice: str = "auto",
                ) -> tuple[Answerer, Callable[[list[dict]], None]]:
    """Greedy answers from a model folder (+ LoRA adapter) with transformers, rendered with the model's tool
    template. Returns (answer one item, warm a batch): `warm(items)` generates a whole batch at once (left padding)
    and `answer` then reads from that cache, so scoring stays one call per item without losing batching.
    `tool_choice="required"`: each answer is decoded under its item's call schema (one grammar per row: xgrammar's
    transformers logits processor, the backend the API's hf engine and vLLM use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmstack.device import policy

    p = policy()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=p.torch_dtype()).to(p.device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    template = T.template_for(tok)
    cache: dict[str, str] = {}

    def key(messages, tools):
        return json.dumps([messages, tools], sort_keys=True)

    def generate(batch: list[tuple[list[dict], list[dict]]]) -> None:
        prompts = [tok.apply_chat_template(m, tools=t or None, chat_template=template, tokenize=False,
                                           add_generation_prompt=True) for m, t in batch]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        extra = {}
        if tool_choice == "required":
            extra["logits_processor"] = [_grammars(tok, model.config.vocab_size, [t for _, t in batch])]
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 **extra)
        for (m, t), ids in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            cache[key(m, t)] = tok.decode(ids, skip_special_tokens=True)

    def warm(items: list[dict]) -> None:
        todo = [(it["messages"], it["tools"]) for it in items if key(it["messages"], it["tools"]) not in cache]
        for i in range(0, len(todo), batch_size):
            generate(todo[i:i + batch_size])

    def answer(messages: list[dict], tools: list[dict]) -> Answer:
        if key(messages, tools) not in cache:
            generate([(messages, tools)])
        text = cache[key(messages, tools)]
        if tool_choice == "required":
            calls = T.parse_forced(text, many=False) or []
            return {"content": None if calls else text, "calls": calls, "text": text}
        content, calls = T.parse_calls(text)
        return {"content": content, "calls": calls, "text": text}

    return answer, warm


def _grammars(tok, vocab_size: int, tool_lists: list[list[dict]]):
    """One compiled call grammar per row of a batch (rows offer different tools)."""
    import xgrammar as xgr
    from xgrammar.contrib.hf import LogitsProcessor

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab_size))
    return LogitsProcessor([compiler.compile_json_schema(json.dumps(T.call_schema(tools)), any_whitespace=False)
                            for tools in tool_lists])


def server_answerer(target, max_new_tokens: int = MAX_NEW_TOKENS) -> Answerer:
    """Answers from a live OpenAI-compatible server (`llmstack serve`) with the official client: the item's messages
    and tools, `tool_choice` as the target asks, greedy. A request the server refuses (e.g. a tool spec it rejects) is
    an item without a call, its error kept in the sample."""
    import openai

    client = openai.OpenAI(base_url=target.base_url.rstrip("/") + "/v1", api_key=target.api_key or "none",
                           max_retries=2, timeout=600)

    def answer(messages: list[dict], tools: list[dict]) -> Answer:
        try:
            r = client.chat.completions.create(model=target.served_name, messages=messages, tools=tools,
                                               tool_choice=target.tool_choice, temperature=0,
                                               max_tokens=max_new_tokens,
                                               parallel_tool_calls=False)  # the reference is one call
        except openai.BadRequestError as exc:
            log.warning("tool_calls: the server refused an item: %s", exc.message)
            return {"content": None, "calls": [], "error": exc.message}
        m = r.choices[0].message
        return {"content": m.content, "calls": [{"name": c.function.name, "arguments": c.function.arguments}
                                                for c in m.tool_calls or []]}

    return answer


def evaluate_target(target, n: int | None, samples_dir: Path | None = None) -> dict[str, Any]:
    """Score a llmstack.eval.run.Target (in-process backends) on the first `n` items."""
    if target.tool_choice not in ("auto", "required"):
        raise ValueError(f"tool_choice must be auto or required, not '{target.tool_choice}'")
    items = read_items()[:n] if n else read_items()
    if target.backend == "server":
        answer = server_answerer(target)
    else:  # vllm backend: transformers generates here too (vLLM's offline LLM.chat would need the same template)
        answer, warm = hf_answerer(target.model, target.adapter, batch_size=target.batch_size,
                                   tool_choice=target.tool_choice)
        warm(items)
    return score(items, answer, samples_dir / f"{TASK}.jsonl" if samples_dir else None)


def read_items() -> list[dict]:
    path = prepare_data()
    with open(path) as f:
        return [json.loads(line) for line in f]
