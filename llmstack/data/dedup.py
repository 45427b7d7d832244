"""Exact and near-duplicate removal, as datatrove filters run in one ordered pass (the first occurrence is kept).

Exact: sha1 of the text normalised by datatrove's `simplify_text` (case, whitespace, punctuation, digits), so rows
that differ only in formatting count as the same. Near: MinHash over word shingles with datasketch's `MinHashLSH`;
a row whose estimated Jaccard similarity to an already kept row reaches the threshold is dropped, and the quarantine
record names the row it duplicates. The LSH index holds one signature per kept row (num_perm × 8 bytes): memory grows
with the kept corpus, not with the rows streamed through — for billions of rows use datatrove's disk-based
MinhashDedup stages on a Slurm/Ray executor instead.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from functools import lru_cache

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import DEF_TEXT_NORM_CONFIG, simplify_text

# In ASCII text, removing diacritics (NFD, then drop combining marks) changes nothing, and it was most of the time
# simplify_text took: skip that step there.
_ASCII_TEXT = dataclasses.replace(DEF_TEXT_NORM_CONFIG, norm_unicode_diacritics=False)


@lru_cache(maxsize=8)
def normalised(text: str) -> str:
    # Cached: decontamination and the dedup signatures look at the same text one after the other.
    return simplify_text(text, _ASCII_TEXT if text.isascii() else DEF_TEXT_NORM_CONFIG)


def shingles(text: str, k: int) -> list[bytes]:
    words = normalised(text).split()
    if len(words) <= k:
        return [" ".join(words).encode()]
    return [" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)]


def pack_signature(hashvalues) -> str:
    """A signature as it travels from pass 1 to pass 2 (JSON lines): base64 of its little-endian uint32 values,
    ~5x shorter than a JSON list of 128 integers and decoded with one numpy call in the serial pass."""
    import numpy as np

    values = np.asarray(hashvalues)
    if values.dtype != np.uint32:  # datasketch's default scheme (affine32); any other would not round-trip
        raise ValueError(f"expected uint32 MinHash values, got {values.dtype}")
    return base64.b64encode(values.astype("<u4").tobytes()).decode("ascii")


def unpack_signature(packed):
    import numpy as np

    if isinstance(packed, list):  # a pass-1 output written before signatures were packed
        return np.array(packed, dtype=np.uint32)
    return np.frombuffer(base64.b64decode(packed), dtype="<u4").astype(np.uint32)


class DedupSignatures(PipelineStep):
    """Per row, in the parallel pass: the normalised-text hash and the MinHash signature. The ordered pass then only
    does dictionary and LSH lookups (the same split as datatrove's own MinhashDedupSignature/...Filter stages)."""

    type = "🫂 - DEDUP"
    name = "signatures"

    # How many normalised-text hashes a task remembers to skip signatures of its own repeats (then it starts over):
    # ~100 bytes each, so memory stays bounded however long the task runs; forgetting only costs a signature.
    MAX_SEEN = 1_000_000

    def __init__(self, num_perm: int, shingle_words: int, near: bool = True, exact: bool = False):
        super().__init__()
        self.num_perm, self.k, self.near, self.exact = num_perm, shingle_words, near, exact
        self._template = None

    def signature(self, text: str):
        from datasketch import MinHash

        if self._template is None:
            self._template = MinHash(num_perm=self.num_perm, seed=1)
        m = self._template.copy()  # reuses the permutation arrays instead of regenerating them per row
        m.update_batch(shingles(text, self.k))
        return m

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        # With exact dedup on, a row whose normalised text this task already passed on is an exact duplicate of a row
        # earlier in source order (a task reads its rows in order, and that row reached this step, so it is in the
        # pass-1 output): the ordered pass drops it as an exact duplicate before near dedup, whichever task held the
        # first copy, and discards its signature unread. So it gets none here. A MinHash was the costliest step per
        # such row, and repeats are where our pass 1 did work the baseline's dedup loop never does.
        seen = set()
        for doc in data:
            key = hashlib.sha1(normalised(doc.text).encode()).hexdigest()
            doc.metadata["norm_sha1"] = key
            if self.near:
                if self.exact and key in seen:
                    self.stat_update("repeats_unsigned")
                else:
                    if self.exact:
                        if len(seen) >= self.MAX_SEEN:
                            seen.clear()
                        seen.add(key)
                    doc.metadata["minhash"] = pack_signature(self.signature(doc.text).hashvalues)
            yield doc


class ExactDedupFilter(BaseFilter):
    name = "exact dedup"

    def __init__(self, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.seen: dict[str, str] = {}

    def filter(self, doc: Document):
        key = doc.metadata.pop("norm_sha1", None) or hashlib.sha1(normalised(doc.text).encode()).hexdigest()
        first = self.seen.setdefault(key, doc.id)
        if first != doc.id:
            doc.metadata["duplicate_of"] = first
            doc.metadata.pop("minhash", None)
            return False, "exact duplicate"
        return True


class NearDedupFilter(BaseFilter):
    """MinHash LSH over the signatures from `DedupSignatures` (computed here if a row has none)."""

    name = "near dedup"

    def __init__(self, threshold: float, num_perm: int, shingle_words: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.threshold, self.num_perm, self.k = threshold, num_perm, shingle_words
        self._lsh = None
        self._sigs: dict = {}  # kept row id -> LeanMinHash, to confirm LSH candidates
        self._signer = DedupSignatures(num_perm, shingle_words)

    def filter(self, doc: Document):
        from datasketch import LeanMinHash, MinHash, MinHashLSH

        if self._lsh is None:
            self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
            self._scheme = MinHash(num_perm=self.num_perm, seed=1).scheme  # what DedupSignatures used
        values = doc.metadata.pop("minhash", None)
        m = (LeanMinHash(seed=1, hashvalues=unpack_signature(values), scheme=self._scheme)
             if values is not None else LeanMinHash(self._signer.signature(doc.text)))
        hits = self._lsh.query(m)
        if hits:
            # LSH candidates can be false positives: confirm against the estimated Jaccard of each candidate.
            best = max(hits, key=lambda h: (self._sigs[h].jaccard(m), h))
            score = float(self._sigs[best].jaccard(m))
            if score >= self.threshold:
                doc.metadata["duplicate_of"] = best
                doc.metadata["similarity"] = round(score, 3)
                return False, f"near duplicate (Jaccard >= {self.threshold})"
        self._sigs[doc.id] = m
        self._lsh.insert(doc.id, m, check_duplication=False)
        return True


def jaccard(a: str, b: str, k: int = 5) -> float:
    """Exact Jaccard of two texts' shingle sets (tests compare MinHash estimates against it)."""
    sa, sb = set(shingles(a, k)), set(shingles(b, k))
    return len(sa & sb) / max(1, len(sa | sb))

