"""The normalised view of a text the guard's rails match on, and the way back to the raw text (offsets of a match in
the view mapped to the raw characters it came from)."""

from __future__ import annotations

import bisect
import re as _re
import unicodedata

from llmstack.pii import Span

# The rails match on a view of the text, not on its raw code points: a full-width `＠` or `ｉｇｎｏｒｅ`, a zero-width
# space inside an email's domain or between a card's digit groups, and a JSON escape (`\u0040` for `@`, `\n` between
# the words of a phrase) would otherwise walk past every pattern. The view folds each character with NFKC, drops the
# invisible ones (zero-width, soft hyphen, bidi embeddings/overrides/isolates) and decodes JSON's string escapes; a
# match in the view is mapped back to the raw characters it came from, so redaction replaces the original span whole.
# NFKC is applied per character (compatibility mappings; no canonical composition across characters — the patterns
# are ASCII, so composing `e` + U+0301 would change no match). Text that is ASCII without a backslash (nearly every
# answer), or already NFKC without invisible characters or backslashes, is its own view at the cost of two C scans.
INVISIBLE = ("\u00ad" + "".join(map(chr, range(0x200B, 0x2010))) + "".join(map(chr, range(0x202A, 0x202F)))
             + "".join(map(chr, range(0x2060, 0x2065))) + "".join(map(chr, range(0x2066, 0x206A))) + "\ufeff")
_INVISIBLE = frozenset(INVISIBLE)
# What the view rewrites: a JSON escape that can hide a match (`\uXXXX`; a control escape such as `\n`, which glued
# to the next word would hide a word boundary; `\\`, consumed so that `\\n` stays a backslash and an `n`), or a
# run of non-ASCII characters (each folded). `\"` and `\/` stay: no pattern tells them from `"` and `/`.
_ESCAPE = _re.compile(r"\\(?:u[0-9a-fA-F]{4}|[bfnrt\\])")
_FOLDABLE = _re.compile(_ESCAPE.pattern + r"|[^\x00-\x7f]+")
_ESCAPES = {"\\b": "\b", "\\f": "\f", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\\\": "\\\\"}
_FOLDED: dict[str, str] = {}  # character -> its folded form (a few thousand distinct characters at most in practice)


def _fold(c: str) -> str:
    f = _FOLDED.get(c)
    if f is None:
        f = "" if c in _INVISIBLE else unicodedata.normalize("NFKC", c)
        if len(_FOLDED) < 65536:
            _FOLDED[c] = f
    return f


class TextView:
    """`text` as the rails see it, and the way back: `start(i)`/`end(i)` map an offset of the view to one of the raw
    text (a match that begins or ends inside what one raw character or escape became takes that character whole)."""

    __slots__ = ("raw", "text", "_vstarts", "_pieces")

    def __init__(self, raw: str):
        self.raw, self.text, self._vstarts, self._pieces = raw, raw, [], []
        if "\\" not in raw and (raw.isascii() or (not any(c in raw for c in INVISIBLE)  # C scans, each
                                                   and unicodedata.is_normalized("NFKC", raw))):
            return
        # pieces: (view start, raw start, view length, raw length) of each raw stretch that changed; identity between
        out, pieces, last, delta = [], [], 0, 0  # delta: view offset - raw offset, after the pieces so far
        # ASCII text has only escapes: a pattern that starts with its literal backslash scans far faster
        for m in (_ESCAPE if raw.isascii() else _FOLDABLE).finditer(raw):
            s, tok = m.start(), m.group()
            out.append(raw[last:s])
            last = s + len(tok)
            if tok[0] == "\\":
                if tok[1] == "u":
                    c = chr(int(tok[2:], 16))
                    f = tok if "\ud800" <= c <= "\udfff" else _fold(c)  # a surrogate half stays as written
                else:
                    f = _ESCAPES[tok]
                if f != tok:
                    pieces.append((s + delta, s, len(f), len(tok)))
                    delta += len(f) - len(tok)
                out.append(f)
                continue
            get = _FOLDED.get
            folds = [get(c) for c in tok]
            if None in folds:
                folds = [_fold(c) if f is None else f for c, f in zip(tok, folds, strict=True)]
            run = "".join(folds)
            out.append(run)
            for k, f in enumerate(folds):  # one character folded to one (a full-width form) moves no offset
                if len(f) != 1:  # dropped (invisible) or expanded (a ligature): a piece of its own
                    pieces.append((s + k + delta, s + k, len(f), 1))
                    delta += len(f) - 1
        out.append(raw[last:])
        self.text, self._pieces = "".join(out), pieces
        self._vstarts = [p[0] for p in pieces]

    def start(self, i: int) -> int:
        k = bisect.bisect_right(self._vstarts, i) - 1
        if k < 0:
            return i
        vs, os, vl, ol = self._pieces[k]
        return os if i < vs + vl else i - (vs + vl) + os + ol

    def end(self, i: int) -> int:
        k = bisect.bisect_left(self._vstarts, i) - 1
        if k < 0:
            return i
        vs, os, vl, ol = self._pieces[k]
        return os + ol if i <= vs + vl else i - (vs + vl) + os + ol

    def span(self, sp: Span) -> Span:
        return Span(self.start(sp.start), self.end(sp.end), sp.kind)
