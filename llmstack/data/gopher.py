"""datatrove's Gopher filters with the same checks, thresholds, order and drop reasons, at a fraction of the cost per
row.

Profiled on the curate pass (1,000 ~150-word documents, one task), datatrove's GopherRepetitionFilter was the largest
per-row cost: for each of nine n-gram sizes it builds every n-gram as a new joined string and walks them in Python. The
words themselves were not the waste (datatrove caches `split_into_words`: both Gopher filters share one tokenisation).
Here the paragraph and line checks still run as datatrove's own code (the parent is called with empty n-gram lists);
the n-gram checks are re-done because no library call gives the same numbers cheaper: each n-gram is sliced out of one
joined string (the same string datatrove builds, without the per-n-gram list and join), counted with C-level `Counter`
and `set`, and the order-dependent duplicate walk runs only when a set shows a repeat (with none it can only give 0).
GopherQuality keeps datatrove's code but looks up each distinct word's "has a non-punctuation character" and "has a
letter" once per process instead of once per occurrence. tests/test_data_fastpaths.py checks every decision and reason
against datatrove's filters on prose and adversarial texts.
"""

from __future__ import annotations

from collections import Counter
from itertools import accumulate, repeat
from operator import add

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.text import PUNCTUATION_SET, split_into_words


def _starts(words: list[str], sep: int) -> list[int]:
    # offset of each word (and, last, of the end) in sep.join(words), sep being 0 or 1 characters long
    return list(accumulate(map(add, map(len, words), repeat(sep)), initial=0))


def top_duplicate_chars(joined: str, starts: list[int], n: int) -> int:
    """datatrove's find_top_duplicate(get_n_grams(words, n)): characters of the most common n-gram times its count
    (the first such n-gram on ties, as Counter.most_common keeps insertion order)."""
    grams = [joined[starts[i]:starts[i + n] - 1] for i in range(len(starts) - n)]
    if not grams:
        return 0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def all_duplicate_chars(joined: str, starts: list[int], n: int) -> int:
    """datatrove's find_all_duplicate(words, n): n-grams are the words concatenated without a separator, and a repeat
    skips the walk past itself, so the count depends on order: walk only if some n-gram repeats at all."""
    grams = [joined[starts[i]:starts[i + n]] for i in range(len(starts) - n)]
    if len(set(grams)) == len(grams):
        return 0
    unique: set[str] = set()
    repeated, idx = 0, 0
    while idx < len(grams):
        gram = grams[idx]
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


def top_duplicate_chars_ids(ids: np.ndarray, vocab: int, words: list[str], starts: list[int], n: int) -> int:
    """top_duplicate_chars from word ids, vectorised. The spaced n-grams are equal exactly when their word tuples are
    (the words hold no whitespace), so each n-gram is one integer (ids in base `vocab`, exact while vocab**n < 2**63)
    and Counter counts those; ties go to the n-gram seen first, as before. Why not Counter: building
    ~170 joined strings per size was most of the repetition filter's cost."""
    m = len(ids) - n + 1
    if m <= 0:
        return 0
    if vocab ** n >= 2**63:
        return top_duplicate_chars(" ".join(words), starts, n)
    key = ids[:m].copy()
    for j in range(1, n):
        key *= vocab
        key += ids[j:j + m]
    keys = key.tolist()
    gram, top = Counter(keys).most_common(1)[0]  # Counter on ints: insertion order, so the same tie-break
    i = keys.index(gram)
    return (starts[i + n] - 1 - starts[i]) * top


_ODD = 0x100000001B3  # any odd multiplier works: below, only "different hashes => different strings" is used
_POW = np.ones(1, dtype=np.uint64)
_INV = np.ones(1, dtype=np.uint64)


def _powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """_ODD**i and its inverse's **i modulo 2**64 for i < size (numpy's uint64 arithmetic wraps modulo 2**64)."""
    global _POW, _INV
    if len(_POW) < size:
        size = max(size, 2 * len(_POW), 4096)
        _POW, _INV = np.ones(size, dtype=np.uint64), np.ones(size, dtype=np.uint64)
        np.cumprod(np.full(size - 1, _ODD, dtype=np.uint64), out=_POW[1:])
        np.cumprod(np.full(size - 1, pow(_ODD, -1, 2**64), dtype=np.uint64), out=_INV[1:])
    return _POW, _INV


def distinct_glued_sizes(glued: str, starts: list[int], sizes) -> set[int]:
    """The n in `sizes` for which every glued n-gram (glued[starts[i]:starts[i + n]]) is provably distinct, so that
    all_duplicate_chars is 0: each substring gets a polynomial hash modulo 2**64 from one prefix sum, and equal
    strings always hash equal, so n-grams with all-different hashes are all different strings. A collision proves
    nothing either way and leaves n to the exact string walk. Vectorised because the string walk was the repetition
    filter's largest cost, and in prose 87-99% of the sizes have no repeat at all."""
    codes = np.frombuffer(glued.encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    pw, inv = _powers(len(codes) + 1)
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes * pw[:len(codes)], out=prefix[1:])
    at = np.asarray(starts, dtype=np.int64)
    out = set()
    for n in sizes:
        if len(at) - n <= 0:
            out.add(n)
            continue
        s, e = at[:-n], at[n:]
        hashes = ((prefix[e] - prefix[s]) * inv[s]).tolist()
        if len(set(hashes)) == len(hashes):
            out.add(n)
    return out


class GopherRepetition(GopherRepetitionFilter):
    name = "👯 Gopher Repetition"

    def __init__(self, *args, top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                 dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)), **kwargs):
        super().__init__(*args, top_n_grams=(), dup_n_grams=(), **kwargs)  # the parent does paragraphs and lines
        self.ngram_top, self.ngram_dup = tuple(top_n_grams), tuple(dup_n_grams)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        verdict = super().filter(doc)
        if verdict is not True:
            return verdict
        text = doc.text
        words = split_into_words(text, self.language)  # cached: the parent's call already tokenised this text
        starts = _starts(words, 1)
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)
        for n, n_frac in self.ngram_top:
            if top_duplicate_chars_ids(ids, len(vocab), words, starts, n) / len(text) > n_frac:
                return False, f"top_{n}_gram"
        glued, starts = "".join(words), _starts(words, 0)
        distinct = distinct_glued_sizes(glued, starts, [n for n, _ in self.ngram_dup])
        for n, n_frac in self.ngram_dup:
            if n not in distinct and all_duplicate_chars(glued, starts, n) / len(text) > n_frac:
                return False, f"duplicated_{n}_n_grams"
        return True


# distinct word -> (has a non-punctuation character, has a letter); bounded so a long run cannot grow it without end
_WORD_KINDS: dict[str, tuple[bool, bool]] = {}


def _kinds(word: str) -> tuple[bool, bool]:
    kinds = _WORD_KINDS.get(word)
    if kinds is None:
        if len(_WORD_KINDS) > 500_000:
            _WORD_KINDS.clear()
        kinds = _WORD_KINDS[word] = (any(ch not in PUNCTUATION_SET for ch in word), any(c.isalpha() for c in word))
    return kinds


class GopherQuality(GopherQualityFilter):
    name = "🥇 Gopher Quality"

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        # datatrove's GopherQualityFilter.filter, check for check; the per-word tests run once per distinct word
        text = doc.text
        words = split_into_words(text, self.language)
        n_words = len(words)
        counts = Counter(words)
        n_non_symbol_words = non_symbol_chars = n_alpha_words = 0
        known = _WORD_KINDS.get
        for word, count in counts.items():  # per distinct word: the sums are the same, in any order
            non_symbol, alpha = known(word) or _kinds(word)
            if non_symbol:
                n_non_symbol_words += count
                non_symbol_chars += count * len(word)
            if alpha:
                n_alpha_words += count

        if self.min_doc_words and n_non_symbol_words < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_non_symbol_words > self.max_doc_words:
            return False, "gopher_long_doc"

        # np.mean of ints: an exact float sum divided by the count, which is what sum()/len gives (nan when empty)
        avg_n_words = non_symbol_chars / n_non_symbol_words if n_non_symbol_words else float("nan")
        if self.min_avg_word_length and avg_n_words < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and avg_n_words > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"

        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"

        lines = text.splitlines()
        if (self.max_bullet_lines_ratio
                and sum(s.lstrip().startswith("•") or s.lstrip().startswith("-") for s in lines) / len(lines)
                > self.max_bullet_lines_ratio):
            return False, "gopher_too_many_bullets"
        if (self.max_ellipsis_lines_ratio
                and sum(s.rstrip().endswith("...") or s.rstrip().endswith("…") for s in lines) / len(lines)
                > self.max_ellipsis_lines_ratio):
            return False, "gopher_too_many_end_ellipsis"

        if (self.max_non_alpha_words_ratio
                and n_alpha_words / n_words < self.max_non_alpha_words_ratio):
            return False, "gopher_below_alpha_threshold"

        if self.min_stop_words and len(self.stop_words.intersection(counts)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True
