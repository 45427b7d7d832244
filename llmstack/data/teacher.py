"""Teacher sources (distillation, s1 / OpenThoughts style): answers with thinking from a teacher model, to the prompts
of another source, kept where a verifier accepts them. The teacher is a model behind an OpenAI-compatible endpoint, or
a local model folder that `llmstack generate`'s offline batch engine runs.

    <curate stage dir>/teacher/<dataset>/<source>/answers.jsonl   every answer the teacher gave, keyed by request
    <curate stage dir>/teacher/<dataset>/<source>/samples.jsonl   this run's samples as `messages` records
    <curate stage dir>/teacher/<dataset>/<source>/generate.*.jsonl  a local teacher's batch in flight (its input and
                                                                    output; removed once the answers are cached)

Each prompt is asked `k` times, sample j with `seed: seed + j` and the recipe's temperature/top_p/max_tokens. The
answer's trace is its `reasoning_content` (vLLM, DeepSeek, llmstack's own server; `reasoning` in newer vLLM) or an
inline `<think>` block; formats/thinking.py turn either into the row's `reasoning_content`. Every sample is written,
with a `metadata` record of the teacher (endpoint host and model, or model folder and engine), the prompt id, the
sampling settings and the verifier's verdict; curation quarantines the rejected ones ("verifier rejected") and keeps
the metadata of the others. Answers are cached by request (endpoint or folder, model, messages, sampling, seed), so a
re-run asks only for what changed.

An endpoint is asked through the official `openai` client: its timeout and bounded retries with backoff; what still
fails is a SourceError naming the endpoint. A local teacher's requests are written as one `llmstack generate` input
(one row per request, its id the cache key, its sampling and seed its own) and handed to `answer_locally`, which the
curate stage passes in: it runs the batch engine, which lives in llmstack.serve, a layer this one does not import.
The batch engine resumes by row id, so a curation killed mid-batch generates only the rest when it runs again.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llmstack.config.data import SourceSpec, TeacherSpec
from llmstack.config.generate import InputRow, Sampling
from llmstack.data.sources import BadRecord, FetchedSource, SourceError, fetch_source, iter_records
from llmstack.data.thinking import CLOSE, FIELD, OPEN, split_inline
from llmstack.data.turns import BadRow
from llmstack.eval.answers import final_number, same_number
from llmstack.runs import sha256_file

log = logging.getLogger("llmstack")

REJECTED = "verifier rejected"

# What the curate stage passes in to run a local teacher: (model folder, engine, generate input JSONL, output JSONL)
# -> the run's summary (llmstack.serve.batch.generate's: counts, and the path of its quarantine file).
LocalAnswerer = Callable[[Path, str, Path, Path], dict]


def fetch_teacher(spec: SourceSpec, folder: Path, max_chars: int,
                  answer_locally: LocalAnswerer | None = None) -> FetchedSource:
    """Ask the teacher for what the cache lacks, verify every sample, write samples.jsonl; the source's one file."""
    t = spec.teacher
    folder.mkdir(parents=True, exist_ok=True)
    prompts, skipped = _prompts(t, max_chars)
    cache_path = folder / "answers.jsonl"
    cache = _load_cache(cache_path)
    asks = [[_request(t, p["messages"], j) for j in range(t.k)] for p in prompts]  # per prompt, per sample
    where = _teacher_id(t)
    todo = {key: req for reqs in asks for req in reqs if (key := _key(where, req)) not in cache}
    log.info("teacher %s: %d prompts x %d samples, %d cached, asking %s for %d", spec.name, len(prompts), t.k,
             len(prompts) * t.k - len(todo), t.model if t.local else t.host, len(todo))
    if todo and t.local:
        _generate_all(t, todo, cache, cache_path, folder, answer_locally)
    elif todo:
        _ask_all(t, todo, cache, cache_path)
    verify = verifier(t)
    out = folder / "samples.jsonl"
    counts = {"prompts": len(prompts), "prompts_skipped": skipped, "samples": len(prompts) * t.k, "accepted": 0,
              "rejected": 0}
    with open(out, "w") as f:
        for p, reqs in zip(prompts, asks):
            answers = [cache[_key(where, req)] for req in reqs]
            verdicts = verify(p, [_answer_text(a) for a in answers])
            for j, (req, answer, verdict) in enumerate(zip(reqs, answers, verdicts)):
                counts["accepted" if verdict["accepted"] else "rejected"] += 1
                f.write(json.dumps(_record(t, p, j, req, answer, verdict), ensure_ascii=False) + "\n")
    log.info("teacher %s: %d accepted, %d rejected by the %s verifier", spec.name, counts["accepted"],
             counts["rejected"], t.verifier)
    teacher = {"model": t.model, "engine": t.engine or "auto"} if t.local else {"host": t.host, "model": t.model}
    details = {**teacher, "prompts_source": t.prompts.name, "k": t.k, "seed": t.seed,
               "sampling": _sampling(t), "verifier": t.function if t.verifier == "python" else t.verifier, **counts}
    return FetchedSource(spec, [("samples.jsonl", out)], {"samples.jsonl": sha256_file(out)}, details=details)


# ---------------------------------------------------------------- prompts and requests


def _prompts(t: TeacherSpec, max_chars: int) -> tuple[list[dict], int]:
    """The prompt records as {id, messages, reference}; records without a usable prompt are skipped (counted)."""
    fetched = fetch_source(t.prompts)
    single = len(fetched.files) == 1
    out, skipped = [], 0
    for label, row, rec in iter_records(fetched, max_chars):
        question = rec.get(t.prompt_field) if isinstance(rec, dict) else None
        if isinstance(rec, BadRecord) or not isinstance(question, str) or not question.strip():
            skipped += 1
            continue
        pid = rec.get(t.id_field) if t.id_field else None
        if pid is None:
            pid = f"{t.prompts.name}#{row}" if single else f"{t.prompts.name}/{label}#{row}"
        messages = ([{"role": "system", "content": t.system}] if t.system else []) + [
            {"role": "user", "content": question}]
        ref = rec.get(t.answer_field) if t.answer_field else None
        out.append({"id": str(pid), "messages": messages, "reference": None if ref is None else str(ref)})
    return out, skipped


def _sampling(t: TeacherSpec) -> dict:
    return {"temperature": t.temperature, "top_p": t.top_p, "max_tokens": t.max_tokens}


def _request(t: TeacherSpec, messages: list[dict], j: int) -> dict:
    return {"model": t.model, "messages": messages, **_sampling(t), "seed": t.seed + j}


def _teacher_id(t: TeacherSpec) -> list:
    """Who answers, as the cache key sees it: the endpoint, or for a model folder the name, size and modification
    time of each of its files, so a folder whose weights were rewritten (a stage trained again) is asked again."""
    if not t.local:
        return [t.base_url]
    folder = Path(t.model).expanduser()
    if not (folder / "config.json").is_file():
        raise SourceError(f"teacher {t.model}: not a model folder any more (no config.json there)")
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
    return [None, hashlib.sha256(json.dumps(files).encode()).hexdigest()]


def _key(where: list, req: dict) -> str:
    return hashlib.sha256(json.dumps([*where, req], sort_keys=True).encode()).hexdigest()


def _load_cache(path: Path) -> dict[str, dict]:
    cache = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                cache[entry["key"]] = entry["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by an interrupted run: asked again
    return cache


def _ask_all(t: TeacherSpec, todo: dict[str, dict], cache: dict, cache_path: Path) -> None:
    """Ask for every request in `todo`, `concurrency` at a time; each answer is appended to the cache as it arrives,
    so a run that fails part-way keeps what it got."""
    import openai

    api_key = None
    if t.api_key_env:
        api_key = os.environ.get(t.api_key_env)
        if not api_key:
            raise SourceError(f"teacher {t.base_url}: the API key variable {t.api_key_env} is not set")
    client = openai.OpenAI(base_url=t.base_url, api_key=api_key or "none", timeout=t.timeout_s,
                           max_retries=t.max_retries)

    def ask(item):
        k, req = item
        return k, _ask(client, t, req)

    with open(cache_path, "a") as f, ThreadPoolExecutor(t.concurrency) as pool:
        for k, answer in pool.map(ask, todo.items()):
            cache[k] = answer
            f.write(json.dumps({"key": k, "answer": answer}, ensure_ascii=False) + "\n")
            f.flush()


def _generate_all(t: TeacherSpec, todo: dict[str, dict], cache: dict, cache_path: Path, folder: Path,
                  answer_locally: LocalAnswerer | None) -> None:
    """Answer every request in `todo` with the local teacher: one batch-engine run over a generate input whose row
    ids are the cache keys; the outputs are appended to the cache in an endpoint answer's shape."""
    if answer_locally is None:
        raise SourceError(f"teacher {t.model}: a local teacher (a model folder, no base_url) is generated by the "
                          "batch engine, which this caller did not pass in; curate through `llmstack run` or "
                          "`llmstack curate`, or give the teacher a base_url")
    rows, out = folder / "generate.in.jsonl", folder / "generate.out.jsonl"
    with open(rows, "w", encoding="utf-8") as f:
        for key, req in todo.items():
            sampling = Sampling(temperature=req["temperature"], top_p=req["top_p"], max_tokens=req["max_tokens"],
                                seed=req["seed"])
            row = InputRow(id=key, messages=req["messages"], sampling=sampling)
            f.write(row.model_dump_json(exclude_none=True) + "\n")
    summary = answer_locally(Path(t.model).expanduser(), t.engine or "auto", rows, out)
    records = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["id"] in todo:
            records[rec["id"]] = rec
    missing = len(todo) - len(records)
    if missing:
        raise SourceError(f"teacher {t.model}: the batch engine answered {len(records)} of {len(todo)} requests; "
                          f"why the others were not: {summary.get('quarantine')}")
    with open(cache_path, "a", encoding="utf-8") as f:
        for key in todo:
            rec = records[key]
            answer = {"content": rec["outputs"][0]["text"], FIELD: None,
                      "finish_reason": rec["outputs"][0]["finish_reason"], "engine": rec["engine"]}
            cache[key] = answer
            f.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")
    for path in (rows, out, Path(summary["quarantine"]) if summary.get("quarantine") else None):
        if path is not None:
            path.unlink(missing_ok=True)  # every answer is in the cache now


def _ask(client, t: TeacherSpec, req: dict) -> dict:
    import openai

    try:
        resp = client.chat.completions.create(**req)
    except openai.APIStatusError as exc:
        raise SourceError(f"teacher {t.base_url}: HTTP {exc.status_code} for model '{t.model}': "
                          f"{str(exc.message)[:300]}") from None
    except openai.APIError as exc:  # connection refused, timeouts: after the client's max_retries
        raise SourceError(f"teacher {t.base_url}: no answer after {t.max_retries + 1} tries "
                          f"({type(exc).__name__}: {exc})") from None
    if not resp.choices:
        raise SourceError(f"teacher {t.base_url}: an answer with no choices for model '{t.model}'")
    choice = resp.choices[0]
    extra = choice.message.model_extra or {}
    trace = extra.get(FIELD) if extra.get(FIELD) is not None else extra.get("reasoning")
    return {"content": choice.message.content or "", FIELD: trace, "finish_reason": choice.finish_reason}


# ---------------------------------------------------------------- samples


def _answer_text(answer: dict) -> str:
    """What the verifier reads: the answer after any inline think block."""
    content = _inline(answer["content"])
    try:
        return split_inline(content, "answer")[1]
    except BadRow:
        return content


def _inline(content: str) -> str:
    # DeepSeek-R1's template opens the think block in the prompt, so its content starts inside it.
    return OPEN + content if CLOSE in content and OPEN not in content else content


def _record(t: TeacherSpec, prompt: dict, j: int, req: dict, answer: dict, verdict: dict) -> dict:
    turn = {"role": "assistant", "content": _inline(answer["content"])}
    if answer.get(FIELD) is not None:
        turn[FIELD] = answer[FIELD]
    teacher = {"model": t.model, "engine": answer.get("engine")} if t.local else {"host": t.host, "model": t.model}
    meta = {"teacher": teacher, "prompt_id": prompt["id"], "sample": j,
            "sampling": {**_sampling(t), "seed": req["seed"]}, "finish_reason": answer.get("finish_reason"),
            "verdict": verdict}
    return {"messages": prompt["messages"] + [turn], "metadata": meta}


def rejected(rec: dict) -> bool:
    """A teacher sample the verifier did not accept (curation quarantines it)."""
    verdict = (rec.get("metadata") or {}).get("verdict") if isinstance(rec, dict) else None
    return isinstance(verdict, dict) and verdict.get("accepted") is False


# ---------------------------------------------------------------- verifiers


def gsm8k(prompt: dict, answers: list[str]) -> list[dict]:
    """The final number of each answer against the reference's (GSM8K '#### N')."""
    want = final_number(prompt["reference"] or "")
    out = []
    for text in answers:
        got = final_number(text)
        out.append({"verifier": "gsm8k", "accepted": same_number(want, got), "expected": want, "got": got})
    return out


def python(t: TeacherSpec):
    module, name = t.function.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SourceError(f"teacher verifier '{t.function}' cannot be imported: {exc}") from None

    def verify(prompt: dict, answers: list[str]) -> list[dict]:
        scores = fn(prompts=[prompt["messages"]] * len(answers),
                    completions=[[{"role": "assistant", "content": a}] for a in answers],
                    answer=[prompt["reference"]] * len(answers))
        return [{"verifier": t.function, "accepted": float(s) >= t.min_score, "score": float(s)} for s in scores]

    return verify


VERIFIERS = {"gsm8k": lambda t: gsm8k, "python": python}


def verifier(t: TeacherSpec):
    return VERIFIERS[t.verifier](t)
