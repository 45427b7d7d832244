"""The data card: what went in, what came out, what was dropped and why — as JSON (for tools) and Markdown (for
people), with a token-length histogram. Nothing time- or path-dependent goes on it, so the same inputs give the same
card and the committed cards in data_cards/ can be checked against a fresh run."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from llmstack.config.data import DatasetSpec

STEP_ORDER = ["read", "verifier", "max_chars", "thinking_length", "clean", "non_empty", "token_length",
              "gopher_repetition", "gopher_quality", "language", "blocklist", "decontaminate", "exact_dedup",
              "near_dedup", "mixing"]
# Steps only some datasets have: listed on a card only where the dataset uses them (a teacher source, a thinking cap),
# so the cards of datasets without them read as before.
OPTIONAL_STEPS = {"verifier": lambda spec: any(s.teacher for s in spec.sources),
                  "thinking_length": lambda spec: spec.filters.max_thinking_chars is not None}


def _short(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[:n] + f"… [{len(s) - n} more chars]"


def _sample(row: dict) -> dict:
    def cut(x):
        if isinstance(x, str):
            return _short(x)
        if isinstance(x, list):
            return [cut(v) for v in x]
        if isinstance(x, dict):
            return {k: cut(v) for k, v in x.items()}
        return x

    return cut(row)


def _quarantined(quarantine: Path, step: str) -> list[dict]:
    out = []
    for p in sorted((quarantine / step).glob("*.jsonl")):
        with open(p) as f:
            out += [json.loads(line) for line in f]
    return out


def build_card(*, name: str, spec: DatasetSpec, sources: list[dict], per_source_in: Counter, kept_by_source: Counter,
               rows_in: int, dropped: Counter, sizes: dict[str, int], lengths, cleaning: Counter, content_hash: str,
               dataset_dir: Path, quarantine_dir: Path, index, eval_suites: list[str], tokenizer: Path | None,
               seed: int, card_dir: Path, tools: dict | None = None, thinking: dict | None = None,
               thinking_lengths=()) -> dict:
    by_step: dict[str, dict[str, int]] = {}
    for (step, reason), n in sorted(dropped.items()):
        by_step.setdefault(step, {})[reason] = n
    after, left = [], rows_in
    for step in STEP_ORDER:
        if step in OPTIONAL_STEPS and step not in by_step and not OPTIONAL_STEPS[step](spec):
            continue
        left -= sum(by_step.get(step, {}).values())
        after.append({"step": step, "rows": left, "dropped": sum(by_step.get(step, {}).values())})
    for s in sources:
        s["rows_in"] = per_source_in.get(s["name"], 0)
        s["rows_kept"] = kept_by_source.get(s["name"], 0)
    lengths = sorted(lengths)
    import datasets

    train = datasets.load_from_disk(str(dataset_dir / "train")) if sizes["train"] else []
    samples = [_sample(train[i]) for i in range(min(3, sizes["train"]))]

    dup_examples = []
    for step in ("exact_dedup", "near_dedup"):
        for d in _quarantined(quarantine_dir, step)[:3]:
            dup_examples.append({"step": step, "row": d["id"], "duplicate_of": d["metadata"].get("duplicate_of"),
                                 "similarity": d["metadata"].get("similarity", 1.0)})
    matches = [{"row": d["id"], "task": d["metadata"].get("eval_task"), "item": d["metadata"].get("eval_item")}
               for d in _quarantined(quarantine_dir, "decontaminate")]

    card = {
        "name": name,
        "schema": spec.schema_,
        "content_sha256": content_hash,
        "seed": seed,
        "tokenizer": tokenizer.name if tokenizer else None,
        "sources": sources,
        "counts": {"rows_in": rows_in, "train": sizes["train"], "validation": sizes["validation"],
                   "kept": sum(sizes.values()), "dropped": sum(dropped.values())},
        "rows_after_step": after,
        "dropped": by_step,
        "token_lengths": ({"min": lengths[0], "median": statistics.median(lengths), "mean": round(
            statistics.fmean(lengths), 1), "max": lengths[-1], "total": sum(lengths)} if lengths else {}),
        "cleaning": dict(sorted(cleaning.items())),
        "dedup": {"exact": spec.dedup.exact, "near": spec.dedup.near, "near_threshold": spec.dedup.near_threshold,
                  "num_perm": spec.dedup.num_perm, "shingle_words": spec.dedup.shingle_words,
                  "exact_dropped": sum(by_step.get("exact_dedup", {}).values()),
                  "near_dropped": sum(by_step.get("near_dedup", {}).values()), "examples": dup_examples},
        "decontamination": ({"suites": eval_suites, "n": index.n, "eval_items": index.items,
                             "eval_tasks": dict(sorted(index.tasks.items())),
                             "items_shorter_than_n": dict(sorted(index.too_short.items())),
                             "rows_dropped": len(matches), "matches": matches} if index is not None else
                            {"suites": eval_suites, "checked": False,
                             "why": "no eval suite (the recipe has no eval block)" if not eval_suites else "disabled"}),
        # a thinking cap that is not set stays off the card, as the field was before it existed
        "filters": spec.filters.model_dump(mode="json", exclude={"max_thinking_chars"} if
                                           spec.filters.max_thinking_chars is None else None),
        "samples": samples,
    }
    if tools is not None:
        card["tools"] = tools
    thinks = thinking is not None and (thinking["rows_with_thinking"] or any(thinking["rows_quarantined"].values())
                                       or spec.filters.max_thinking_chars is not None)
    if thinks:
        card["thinking"] = thinking
    card_dir.mkdir(parents=True, exist_ok=True)
    (card_dir / f"{name}.json").write_text(json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    if lengths:
        histogram(lengths, card_dir / f"{name}.png", name)
    if thinks and len(thinking_lengths):
        histogram(list(thinking_lengths), card_dir / f"{name}.thinking.png", name,
                  xlabel=f"thinking {thinking['unit']} per row (assistant traces together)",
                  title=f"{name}: thinking lengths of kept rows")
    (card_dir / f"{name}.md").write_text(markdown(card, has_png=bool(lengths)))
    return card


def publish_card(src: Path, dest: Path, name: str) -> None:
    """Copy a dataset's card files (data.cards_dir: the committed data_cards/<recipe>/)."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".md", ".json", ".png", ".thinking.png"):
        if (src / f"{name}{suffix}").exists():
            shutil.copyfile(src / f"{name}{suffix}", dest / f"{name}{suffix}")


def histogram(lengths: list[int], path: Path, name: str,
              xlabel: str = "tokens per row (recipe tokenizer, chat template applied)", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.6), dpi=80)
    ax.hist(lengths, bins=40, color="#4c72b0")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rows")
    ax.set_title(title or f"{name}: token lengths of kept rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same data gives the same bytes
    plt.close(fig)


def markdown(card: dict, has_png: bool) -> str:
    c = card["counts"]
    out = [f"# Data card: {card['name']}", "",
           f"Schema `{card['schema']}` · {c['rows_in']} rows in → **{c['train']} train + {c['validation']} validation**"
           f" · {c['dropped']} quarantined · seed {card['seed']} · tokenizer `{card['tokenizer']}`", "",
           f"Content sha256 of the saved dataset: `{card['content_sha256']}`", "", "## Sources", "",
           "| source | origin | licence | rows in | rows kept | sha256 |", "|---|---|---|---:|---:|---|"]
    for s in card["sources"]:
        ref = f"{s['origin']}: `{s['ref']}`" + (f" `{s['member']}`" if s.get("member") else "")
        out.append(f"| {s['name']} | {ref} | {s['license']} | {s['rows_in']} | {s['rows_kept']} "
                   f"| `{s['sha256'][:16]}…` |")
    out += ["", "## Rows after each step", "", "| step | rows | dropped |", "|---|---:|---:|"]
    out += [f"| {a['step']} | {a['rows']} | {a['dropped']} |" for a in card["rows_after_step"]]
    if card["dropped"]:
        out += ["", "## Why rows were dropped (all kept in quarantine/)", "",
                "| step | reason | rows |", "|---|---|---:|"]
        for step, reasons in card["dropped"].items():
            out += [f"| {step} | {r} | {n} |" for r, n in reasons.items()]
    t = card["token_lengths"]
    if t:
        out += ["", "## Token lengths", "", f"min {t['min']} · median {t['median']} · mean {t['mean']} · max {t['max']}"
                f" · total {t['total']} tokens", ""]
        if has_png:
            out.append(f"![token lengths]({card['name']}.png)")
    if card.get("thinking"):
        out += _thinking_md(card)
    if card["cleaning"]:
        out += ["", "## Cleaning and PII redaction (kept rows)", ""]
        out += [f"- {k}: {v}" for k, v in card["cleaning"].items()]
    d = card["dedup"]
    out += ["", "## Deduplication", "",
            f"exact (normalised hash): {'on' if d['exact'] else 'off'}, dropped {d['exact_dropped']} · "
            f"near (MinHash LSH, {d['num_perm']} perms, {d['shingle_words']}-word shingles, "
            f"Jaccard ≥ {d['near_threshold']}): "
            f"{'on' if d['near'] else 'off'}, dropped {d['near_dropped']}"]
    for e in d["examples"]:
        out.append(f"- `{e['row']}` duplicates `{e['duplicate_of']}` ({e['step']}, similarity {e['similarity']})")
    x = card["decontamination"]
    out += ["", "## Decontamination", ""]
    if x.get("checked") is False:
        out.append(f"Not checked: {x['why']}.")
    else:
        out.append(f"{x['n']}-gram overlap against suite(s) {', '.join(x['suites'])}: {x['eval_items']} eval items "
                   f"({', '.join(f'{k} {v}' for k, v in x['eval_tasks'].items())}); rows dropped: {x['rows_dropped']}.")
        if x["items_shorter_than_n"]:
            short = ", ".join(f"{k} {v}" for k, v in x["items_shorter_than_n"].items())
            out.append(f"Eval items shorter than {x['n']} words cannot be matched by n-grams: {short}.")
        for m in x["matches"][:50]:
            out.append(f"- `{m['row']}` matched {m['task']} item `{m['item']}`")
    if card.get("tools"):
        t = card["tools"]
        q = t["rows_quarantined"]
        keys = sorted({*t["tools_per_row"], *t["calls_per_row"]}, key=int)
        out += ["", "## Tool calls (kept rows)", "",
                (f"{t['rows_with_tools']} of {t['rows']} rows offer tools, {t['rows_with_calls']} make calls "
                 f"({t['calls']} calls to {t['distinct_functions_called']} distinct functions); "
                 f"every kept call names a declared function and its arguments pass that function's JSON Schema "
                 f"({t['arguments_valid']}/{t['calls']} valid)."),
                "", (f"Quarantined for their calls or tools: unknown function {q['unknown_function']} · arguments "
                     f"not JSON {q['arguments_not_json']} · arguments off-schema {q['arguments_off_schema']} · "
                     f"malformed tools {q['malformed_tools']}"), "",
                "| how many per row | " + " | ".join(keys) + " |"]
        out += ["|---|" + "---:|" * len(keys),
                "| tools offered | " + " | ".join(str(t["tools_per_row"].get(k, 0)) for k in keys) + " |",
                "| calls made | " + " | ".join(str(t["calls_per_row"].get(k, 0)) for k in keys) + " |"]
        if t["top_functions"]:
            out += ["", "Most called: " + ", ".join(f"`{k}` {v}" for k, v in t["top_functions"].items())]
    out += ["", "## Sample rows (train)", ""]
    for s in card["samples"]:
        out += ["```json", json.dumps(s, indent=1, ensure_ascii=False), "```"]
    return "\n".join(out) + "\n"


def _thinking_md(card: dict) -> list[str]:
    t = card["thinking"]
    q = t["rows_quarantined"]
    out = ["", "## Thinking traces (kept rows)", "",
           f"{t['rows_with_thinking']} of {t['rows']} rows think (assistant `reasoning_content`); quarantined for "
           f"their thinking: malformed {q['malformed']} · over the cap {q['too_long']}"]
    if t["lengths"]:
        x = t["lengths"]
        out += ["", f"Thinking length in {t['unit']}: min {x['min']} · median {x['median']} · mean {x['mean']} · "
                    f"max {x['max']} · total {x['total']}", "", f"| {t['unit']} | rows |", "|---|---:|"]
        h = t["histogram"]
        out += [f"| {lo}–{hi - 1} | {n} |" for lo, hi, n in zip(h["edges"], h["edges"][1:], h["rows"])]
        out += ["", f"![thinking lengths]({card['name']}.thinking.png)"]
    return out
