"""Seeded perturbations of eval items, for the robustness suite: the same task, the same items, the same scoring —
only the text a model reads changes.

    typos       two neighbouring inner letters swapped in about one word in six (at least one word)
    casing      the text lower-cased, about one word in five upper-cased
    whitespace  extra spaces between about one word in three, and a leading space
    shuffle     multiple choice: the answer options in another order (the gold index follows its option)
    prefix      an irrelevant sentence put before the question

Each item's change depends only on (seed, kind, item id), so a rerun, another stage or another backend sees exactly
the same perturbed text. The dataset hook (llmstack.eval.task_data.lm_eval_dataset) applies `perturb_rows` to a task's
test split when the TaskManager's metadata names a perturbation; few-shot exemplars stay clean.

Hand-written: the text transforms are a few lines each, and the libraries that offer them (nlpaug, textattack) pull in
models and word lists this offline project does not need.
"""

from __future__ import annotations

import random
import re

KINDS = ("typos", "casing", "whitespace", "shuffle", "prefix")
TEXT_FIELDS = ("question", "prompt")  # the text a task's prompt is made of (winogrande has neither: not perturbed)

DISTRACTORS = (
    "Note: the office printer on the second floor is out of paper again.",
    "Fun fact: an octopus has three hearts.",
    "Reminder: the team meeting moved to Thursday afternoon.",
    "By the way, it rained all weekend in the city.",
    "Unrelated: my cousin just adopted a grey cat named Pixel.",
)


def perturbable(doc: dict, kind: str) -> bool:
    if kind == "shuffle":
        return isinstance(doc.get("choices"), list) and len(doc["choices"]) > 1 and "gold" in doc
    return any(isinstance(doc.get(f), str) for f in TEXT_FIELDS)


def _rng(seed: int, kind: str, doc: dict) -> random.Random:
    return random.Random(f"{seed}:{kind}:{doc.get('id')}")  # str seeds hash with sha512: stable across runs


def _typos(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(re.sub(r"\W", "", w)) >= 4]
    if not long:
        return text
    chosen = {i for i in long if rng.random() < 1 / 6} or {rng.choice(long)}
    for i in chosen:
        w = words[i]
        letters = [j for j in range(1, len(w) - 1) if w[j].isalpha() and w[j + 1].isalpha() and w[j] != w[j + 1]]
        if letters:
            j = rng.choice(letters)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def _casing(text: str, rng: random.Random) -> str:
    return " ".join(w.upper() if rng.random() < 0.2 else w for w in text.lower().split(" "))


def _whitespace(text: str, rng: random.Random) -> str:
    return " " + "".join(w + (" " * rng.randint(2, 3) if rng.random() < 1 / 3 else " ")
                         for w in text.split(" ")).rstrip(" ")


def perturb_doc(doc: dict, kind: str, seed: int = 0) -> dict:
    """A perturbed copy of one item (the item itself when the kind does not apply to it). `shuffle` records the
    new order as `perm` (new position -> original position), so an answer can be mapped back to the clean item's."""
    if kind not in KINDS:
        raise ValueError(f"unknown perturbation '{kind}' (choose from {', '.join(KINDS)})")
    if not perturbable(doc, kind):
        return doc
    rng = _rng(seed, kind, doc)
    out = dict(doc)
    if kind == "shuffle":
        n = len(doc["choices"])
        perm = list(range(n))
        while perm == list(range(n)):  # a "shuffle" that keeps the order tests nothing
            rng.shuffle(perm)
        out["choices"] = [doc["choices"][p] for p in perm]
        out["gold"] = perm.index(doc["gold"])
        out["perm"] = perm
        return out
    field = next(f for f in TEXT_FIELDS if isinstance(doc.get(f), str))
    text = doc[field]
    if kind == "typos":
        out[field] = _typos(text, rng)
    elif kind == "casing":
        out[field] = _casing(text, rng)
    elif kind == "whitespace":
        out[field] = _whitespace(text, rng)
    else:
        out[field] = rng.choice(DISTRACTORS) + " " + text
    return out


def perturb_rows(rows: list[dict], kind: str, seed: int = 0) -> list[dict]:
    return [perturb_doc(r, kind, seed) for r in rows]
