"""Decontamination: drop training rows that share a word n-gram (default 13, as in GPT-3's and lm-eval's checks) with
any item of the eval suites the recipe scores, and say which benchmark item each dropped row matched.

Eval texts come through `eval_texts(suite)`, which asks the eval package (`llmstack.eval.task_data.iter_eval_texts`)
when it is installed. Texts are normalised with datatrove's `simplify_text` on both sides. datatrove's own
NGramsDecont* steps need lighteval's task tables and record only hashes, so the card could not name the matched item:
this index keeps (task, item_id) per n-gram instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from llmstack.data.dedup import normalised

log = logging.getLogger("llmstack")

EvalItem = tuple[str, str, str]  # (task, item_id, text)


def eval_texts(suite: str) -> Iterator[EvalItem]:
    """Every (task, item_id, text) the suite scores; nothing (with a warning) if the eval package is absent."""
    try:
        from llmstack.eval.task_data import iter_eval_texts
    except ImportError:
        log.warning("decontamination: llmstack.eval.task_data is not available; suite '%s' not checked", suite)
        return iter(())
    return iter_eval_texts(suite)


def _digest(words: list[str]) -> bytes:
    return hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest()


def _grams(text: str, n: int) -> Iterator[bytes]:
    words = normalised(text).split()
    for i in range(len(words) - n + 1):
        yield _digest(words[i:i + n])


class NGramIndex:
    def __init__(self, items: Iterable[EvalItem], n: int):
        self.n = n
        self.index: dict[bytes, tuple[str, str]] = {}
        self.items = 0
        self.too_short: dict[str, int] = {}  # task -> items with fewer than n words (cannot be checked this way)
        self.tasks: dict[str, int] = {}
        self.vocab: set[str] = set()  # every word of an indexed n-gram
        for task, item_id, text in items:
            self.items += 1
            self.tasks[task] = self.tasks.get(task, 0) + 1
            grams = list(_grams(text, n))
            if not grams:
                self.too_short[task] = self.too_short.get(task, 0) + 1
                continue
            self.vocab.update(normalised(text).split())
            for g in grams:
                self.index.setdefault(g, (task, item_id))

    def match(self, text: str) -> tuple[str, str] | None:
        """The first eval item (in the row's word order) sharing an n-gram with the text. Only n-grams whose words
        are all in the eval vocabulary can match, so only those are hashed: hashing every n-gram of every row was
        the cost of this step, and most rows have few such runs."""
        words = normalised(text).split()
        n, vocab, index, run = self.n, self.vocab, self.index, 0
        for end, word in enumerate(words, 1):
            run = run + 1 if word in vocab else 0
            if run >= n:
                hit = index.get(_digest(words[end - n:end]))
                if hit:
                    return hit
        return None


class DecontaminationFilter(BaseFilter):
    name = "decontaminate"

    def __init__(self, index: NGramIndex, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.index = index

    def filter(self, doc: Document):
        hit = self.index.match(doc.text)
        if hit:
            doc.metadata["eval_task"], doc.metadata["eval_item"] = hit
            return False, f"contaminated: {self.index.n}-gram overlap with eval task {hit[0]}"
        return True
