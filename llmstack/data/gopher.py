"""datatrove's Gopher filters with the same checks, thresholds, order and drop reasons, at a fraction of the cost per row.

Profiled on the curate pass (1,000 ~150-word documents, one task), datatrove's GopherRepetitionFilter was the largest
per-row cost: for each of nine n-gram sizes it builds every n-gram as a new joined string and walks them in Python. The
words themselves were not the waste (datatrove caches `split_into_words`, so both Gopher filters share one tokenisation).
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
        spaced, starts = " ".join(words), _starts(words, 1)
        for n, n_frac in self.ngram_top:
            if top_duplicate_chars(spaced, starts, n) / len(text) > n_frac:
                return False, f"top_{n}_gram"
        glued, starts = "".join(words), _starts(words, 0)
        for n, n_frac in self.ngram_dup:
            if all_duplicate_chars(glued, starts, n) / len(text) > n_frac:
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
