"""py3langid's language identifier with its byte walk compiled by numba: the same features, scores and answers.

Why by hand: language id was the largest per-row cost of the curate pass (0.78 ms of ~2.9 ms per ~150-word document,
datatrove's step stats), and most of it is py3langid walking its feature DFA one byte at a time in a Python loop. No
other offline identifier decides like it (datatrove's LanguageFilter downloads a fastText model), so the model stays
and only the loop is compiled: the same walk over the same tables, with the features counted in first-occurrence order
as `collections.Counter` does, so the naive Bayes sum runs in the same order and the float32 scores are bitwise
py3langid's (tests/test_data_fastpaths.py). numba is already in the environment (vLLM depends on it). A numpy version
of the walk was tried first and was no faster (see scripts/bench_curate.py).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numba import njit
from py3langid.langid import MODEL_FILE, RAW_FLOOR, LanguageIdentifier


@njit(cache=True)
def _walk(data, nextmove, rowbase, output, scratch):  # pragma: no cover - compiled
    """Feature ids in first-occurrence order and their counts. `scratch` has one slot per feature, zero before
    and after the call."""
    ids = np.empty(len(data), dtype=np.int64)
    n = 0
    state = 0
    for byte in data:
        state = nextmove[rowbase[state] + byte]
        feature = output[state]
        if feature >= 0:
            if scratch[feature] == 0:
                ids[n] = feature
                n += 1
            scratch[feature] += 1
    counts = np.empty(n, dtype=np.float32)
    for i in range(n):
        counts[i] = scratch[ids[i]]
        scratch[ids[i]] = 0
    return ids[:n], counts


class CompiledLanguageIdentifier(LanguageIdentifier):
    """A py3langid LanguageIdentifier whose feature counting is compiled; everything else is py3langid's."""

    __slots__ = ["_nextmove", "_rowbase_np", "_output", "_scratch"]

    def prepare(self) -> CompiledLanguageIdentifier:
        self._nextmove = np.asarray(self.tk_nextmove, dtype=np.int64)
        self._rowbase_np = np.asarray(self._rowbase, dtype=np.int64)
        self._output = np.asarray(self.tk_output, dtype=np.int64)
        self._scratch = np.zeros(int(self._output.max()) + 1, dtype=np.int64)
        # The feature table ships as float16, and every call would convert the rows it gathers to float32 for the
        # matmul; converting it once gives bitwise the same scores at ~0.1 ms less per row.
        self.nb_ptc = np.ascontiguousarray(self.nb_ptc, dtype=np.float32)
        self._raw_score(b"warm up the compiled walk")  # compile (or load numba's cache) before workers fork
        return self

    def _raw_score(self, text):
        ids, counts = _walk(np.frombuffer(text, dtype=np.uint8), self._nextmove, self._rowbase_np, self._output,
                            self._scratch)
        if len(ids):  # py3langid's _sparse_score, on the same ids and counts in the same order
            return np.log1p(counts) @ self.nb_ptc[ids] + self.nb_pc
        fill = 0.0 if self._norm_probs else RAW_FLOOR
        return np.full(len(self.nb_classes), fill, dtype=np.float32)


@lru_cache(maxsize=1)
def langid_model() -> CompiledLanguageIdentifier:
    """py3langid's bundled model with normalised probabilities, loaded (and compiled) once per process."""
    return CompiledLanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True).prepare()
