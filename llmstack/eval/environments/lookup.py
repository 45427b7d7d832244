"""The lookup environment: questions answerable only by searching a local corpus (invented entries, see
lookup_corpus.py) through a `search` tool, and scored on the gold answer.

Search is SQLite's FTS5 full-text index (in the standard library's sqlite3, BM25 ranking, no server): the field's
tool for keyword search over a small corpus, rather than a hand-written matcher. The index is built once per process
in memory and shared by every environment instance.

The environment owns its reward: the episode's completion is not visible to it, so `get_reward` scores whether the
gold answer came back in a search result the model asked for (1.0): the model found the evidence. A recipe that also
wants the final answer checked adds a `python` reward over the completion (`contains_answer` is the check).
"""

from __future__ import annotations

import re
import sqlite3
import threading
from functools import lru_cache

from llmstack.eval.environments.lookup_corpus import DOCUMENTS, HELD_OUT, QUESTIONS

MAX_RESULTS = 3


@lru_cache(maxsize=1)
def _index() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:", check_same_thread=False)  # read-only after the build; tools run in threads
    db.execute("CREATE VIRTUAL TABLE docs USING fts5(title, body)")
    db.executemany("INSERT INTO docs VALUES (?, ?)", DOCUMENTS)
    db.commit()
    return db


_LOCK = threading.Lock()


def search_corpus(query: str, limit: int = MAX_RESULTS) -> list[tuple[str, str]]:
    """(title, body) of the best matches, by BM25. The query's words are OR-ed as plain terms: FTS5's query syntax
    (quotes, NEAR, column filters) is not the model's to use, and a stray quote would be a syntax error."""
    words = re.findall(r"\w+", query.lower())
    if not words:
        return []
    match = " OR ".join(f'"{w}"' for w in words[:16])
    with _LOCK:
        return _index().execute("SELECT title, body FROM docs WHERE docs MATCH ? ORDER BY rank LIMIT ?",
                                (match, limit)).fetchall()


def problems(split: str = "train") -> list[dict]:
    """Questions as `messages` rows (the gold answer as the assistant turn): `train`, or `held_out` (the last
    HELD_OUT, never trained on)."""
    chosen = QUESTIONS[-HELD_OUT:] if split == "held_out" else QUESTIONS[:-HELD_OUT]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in chosen]


def contains_answer(text: str, gold: str) -> bool:
    return bool(gold) and gold.lower() in (text or "").lower()


class Lookup:
    def reset(self, answer: str = "", **_) -> None:
        self.gold = (answer or "").strip()
        self.calls = 0
        self.invalid = 0
        self.found = False

    def search(self, query: str) -> str:
        """Search the encyclopedia; the best matching entries as text.

        Args:
            query: keywords to look for, e.g. the names in the question
        """
        self.calls += 1
        hits = search_corpus(query)
        if not hits:
            self.invalid += 1
            return "no results"
        text = "\n".join(f"{title}: {body}" for title, body in hits)
        self.found = self.found or contains_answer(text, self.gold)
        return text

    def get_reward(self) -> float:
        return 1.0 if self.found else 0.0
