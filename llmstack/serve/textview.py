"""The normalised view of a text the guard's rails match on, and the way back to the raw text (offsets of a match in
the view mapped to the raw characters it came from)."""

from __future__ import annotations

import bisect
import functools
import re as _re
import unicodedata

from llmstack.pii import Span

# The rails match on a view of the text, not on its raw code points: a full-width `＠` or `ｉｇｎｏｒｅ`, a Cyrillic `о`
# for a Latin `o`, a zero-width space inside an email's domain or between a card's digit groups, combining marks
# stacked on a word, and a JSON escape (`\u0040` for `@`, `\n` between the words of a phrase) would otherwise walk past
# every pattern. The view folds each character with NFKC, then to the ASCII letter or digit it is a homoglyph of
# (Unicode's confusables, TR39, as the `confusable-homoglyphs` package ships them), drops the invisible ones
# (zero-width, soft hyphen, bidi embeddings/overrides/isolates, variation selectors, tag characters) and the combining
# diacritical marks, and decodes JSON's string escapes; a match in the view is mapped back to the raw characters it came
# from, so redaction replaces the original span whole. Folding is per character (no canonical composition across
# characters: the patterns are ASCII, so composing `e` + U+0301 would change no match).
#
# Cost: text that is ASCII without a backslash (nearly every answer) is its own view at the cost of one C scan. Other
# text whose characters each fold to exactly one character (full-width forms, CJK punctuation, Cyrillic) is folded by
# one `str.translate` over a table of the Basic Multilingual Plane built once, with offsets unchanged; only text with
# escapes, dropped or expanding characters, or characters beyond the BMP takes the per-piece path, whose offset map is
# built only when a rail actually matches (`start`/`end`).
INVISIBLE = ("\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u3164\uffa0"
             + "".join(map(chr, range(0x200B, 0x2010))) + "".join(map(chr, range(0x202A, 0x202F)))
             + "".join(map(chr, range(0x2060, 0x2065))) + "".join(map(chr, range(0x2066, 0x2070)))
             + "".join(map(chr, range(0xFE00, 0xFE10))) + "\ufeff")
_INVISIBLE = frozenset(INVISIBLE)
_ASTRAL_INVISIBLE = ((0xE0000, 0xE0080), (0xE0100, 0xE01F0))  # tag characters ("ASCII smuggling"), variation selectors
_COMBINING = ((0x0300, 0x0370), (0x1AB0, 0x1B00), (0x1DC0, 0x1E00), (0x20D0, 0x2100), (0xFE20, 0xFE30))
# What the view rewrites: a JSON escape that can hide a match (`\uXXXX`; a control escape such as `\n`, which glued
# to the next word would hide a word boundary; `\\`, consumed so that `\\n` stays a backslash and an `n`), or a
# run of non-ASCII characters (each folded). `\"` and `\/` stay: no pattern tells them from `"` and `/`.
_ESCAPE = _re.compile(r"\\(?:u[0-9a-fA-F]{4}|[bfnrt\\])")
_FOLDABLE = _re.compile(_ESCAPE.pattern + r"|[^\x00-\x7f]+")
_ESCAPES = {"\\b": "\b", "\\f": "\f", "\\n": "\n", "\\r": "\r", "\\t": "\t", "\\\\": "\\\\"}


def _fold_char(c: str, homoglyphs: dict) -> str:
    cp = ord(c)
    if c in _INVISIBLE or any(lo <= cp < hi for lo, hi in _ASTRAL_INVISIBLE + _COMBINING):
        return ""
    f = unicodedata.normalize("NFKC", c)
    if len(f) == 1 and not f.isascii():
        ascii_twins = [h["c"] for h in homoglyphs.get(f, ()) if len(h["c"]) == 1 and h["c"].isascii()
                       and h["c"].isalnum()]
        if ascii_twins:  # a letter first: Cyrillic `О` reads as `O`, not as `0`
            f = next((t for t in ascii_twins if t.isalpha()), ascii_twins[0])
    return f


@functools.cache
def _tables() -> tuple[list[str | None], _re.Pattern, _re.Pattern]:
    """The BMP's folding table for `str.translate` (a list indexed by code point: faster than a dict, whose misses
    raise), a pattern of the characters the view changes, and one of those that do not fold to exactly one character
    (dropped or expanded); both patterns take surrogates and everything beyond the BMP too."""
    from confusable_homoglyphs.confusables import confusables_data

    table, changed, odd = [chr(cp) for cp in range(0x10000)], [], []
    for cp in range(0x80, 0x10000):
        if 0xD800 <= cp < 0xE000:
            table[cp] = None
            continue
        f = _fold_char(table[cp], confusables_data)
        if f != table[cp]:
            changed.append(_re.escape(table[cp]))
            if len(f) != 1:
                odd.append(_re.escape(table[cp]))
        table[cp] = f
    rest = "\ud800-\udfff\U00010000-\U0010ffff]"
    return table, _re.compile("[" + "".join(changed) + rest), _re.compile("[" + "".join(odd) + rest)


@functools.lru_cache(maxsize=4096)
def _fold(c: str) -> str:
    """One character's folded form (the table's for the BMP; astral characters computed and cached)."""
    if ord(c) < 0x10000:
        f = _tables()[0][ord(c)]
        return c if f is None else f  # None: a surrogate half, kept as written
    from confusable_homoglyphs.confusables import confusables_data

    return _fold_char(c, confusables_data)


class TextView:
    """`text` as the rails see it, and the way back: `start(i)`/`end(i)` map an offset of the view to one of the raw
    text (a match that begins or ends inside what one raw character or escape became takes that character whole)."""

    __slots__ = ("raw", "text", "_vstarts", "_pieces", "_pattern")

    def __init__(self, raw: str):
        self.raw, self.text, self._vstarts, self._pieces, self._pattern = raw, raw, [], [], None
        if raw.isascii():
            if "\\" not in raw:
                return
            self._pattern, self._pieces = _ESCAPE, None
            self.text = _unescape_ascii(raw)
            return
        else:
            table, changed, odd = _tables()
            if "\\" not in raw:
                if changed.search(raw) is None:
                    return  # nothing to fold: the view is the text
                if odd.search(raw) is None:
                    self.text = raw.translate(table)  # one character for one: offsets unchanged
                    return
            self._pattern = _FOLDABLE
        self.text = self._pattern.sub(_rewrite, raw)
        self._pieces = None  # the offset map: built when a rail matches (start / end)

    def _map(self) -> list[tuple[int, int, int, int]]:
        """(view start, raw start, view length, raw length) of each raw stretch whose length changed."""
        if self._pieces is None:
            pieces, delta = [], 0  # delta: view offset - raw offset, after the pieces so far
            for m in self._pattern.finditer(self.raw):
                s, tok = m.start(), m.group()
                if tok[0] == "\\":
                    f = _rewrite(m)
                    if len(f) != len(tok):
                        pieces.append((s + delta, s, len(f), len(tok)))
                        delta += len(f) - len(tok)
                    continue
                for k, c in enumerate(tok):  # one character folded to one moves no offset
                    f = _fold(c)
                    if len(f) != 1:  # dropped or expanded: a piece of its own
                        pieces.append((s + k + delta, s + k, len(f), 1))
                        delta += len(f) - 1
            self._pieces, self._vstarts = pieces, [p[0] for p in pieces]
        return self._pieces

    def start(self, i: int) -> int:
        pieces = self._map()
        k = bisect.bisect_right(self._vstarts, i) - 1
        if k < 0:
            return i
        vs, os, vl, ol = pieces[k]
        return os if i < vs + vl else i - (vs + vl) + os + ol

    def end(self, i: int) -> int:
        pieces = self._map()
        k = bisect.bisect_left(self._vstarts, i) - 1
        if k < 0:
            return i
        vs, os, vl, ol = pieces[k]
        return os + ol if i <= vs + vl else i - (vs + vl) + os + ol

    def span(self, sp: Span) -> Span:
        return Span(self.start(sp.start), self.end(sp.end), sp.kind)


_U_ESCAPE = _re.compile(r"\\u[0-9a-fA-F]{4}")


def _unescape_ascii(raw: str) -> str:
    """`_ESCAPE.sub(_rewrite, raw)` for ASCII text, with the control escapes done by C-speed `str.replace`: an escaped
    backslash is set aside first (`\\\\n` is a backslash and an `n`, as a left-to-right reading of the escapes has it),
    only `\\uXXXX` takes a callback."""
    if "\x00" in raw:  # the stand-in below would be ambiguous
        return _ESCAPE.sub(_rewrite, raw)
    text = raw.replace("\\\\", "\x00")
    for esc, c in _CONTROL:
        if esc in text:
            text = text.replace(esc, c)
    if "\\u" in text:
        text = _U_ESCAPE.sub(_rewrite, text)
    return text.replace("\x00", "\\\\")


_CONTROL = [(k, v) for k, v in _ESCAPES.items() if k != "\\\\"]


def _rewrite(m: _re.Match) -> str:
    tok = m.group()
    if tok[0] != "\\":
        return "".join(map(_fold, tok))
    if tok[1] == "u":
        c = chr(int(tok[2:], 16))
        return tok if "\ud800" <= c <= "\udfff" else _fold(c)  # a surrogate half stays as written
    return _ESCAPES[tok]
