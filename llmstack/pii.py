"""PII detection and redaction: one detector, used by data curation (`llmstack.data.filters`) and by the API guard's
rails (`llmstack.serve.rails`), so a curated dataset and a guarded endpoint agree on what PII is.

What is found, in this order (a span claimed by an earlier kind is masked before the later kinds look, as when each
kind replaces its matches in turn):

- SECRET: API keys by their provider prefix (`sk-`, `AKIA`, `ghp_`…, `xox?-`, `AIza`, `hf_`), and the value of a
  `api_key|secret|token|password = value` pair when that value has both letters and digits (so `password =
  'your_password'` stays: it is a placeholder, not a secret).
- EMAIL: the address pattern of datatrove's PIIFormatter, with RFC 5321's limits: a local part of at most 64 characters
  (of a longer run before the `@` only the last ≤ 64 characters from a word boundary are the local part, as a pattern
  bounded there would find) and a domain of at most 255 (a longer one is not an address).
- CREDIT_CARD: 13-19 digits in groups separated by single spaces or dashes, not glued to more digits, with a card
  issuer's prefix and length (Visa, Mastercard, Amex, Discover, JCB, Diners) and a valid Luhn checksum.
- SSN: US social security numbers written `123-45-6789`.
- IP: dotted IPv4 addresses that are globally routable (`ipaddress`' `is_global`): private, loopback and reserved
  addresses are not PII.
- PHONE: `+CC` then 2-4 digit groups, or an (area) code / 3-digit prefix then 3-4 and 4 digits; not glued to letters,
  `+`, or other digit groups (a longer number, a table of figures).

Matches are replaced by typed placeholders, `<KIND>` (`<EMAIL>`, `<PHONE>`, `<IP>`, `<CREDIT_CARD>`, `<SECRET>`,
`<SSN>`). These are heuristics written as patterns, not a classifier: they miss PII that has no fixed shape (names,
addresses) and may take a number that only looks like a phone or card for one.

The patterns run on google-re2, whose automata take time linear in the text: Python's backtracking `re` took
quadratic time on text with many word boundaries (minutes for a 400 KB message of `a.a.a.…`), which in the guard let
a single request hold a worker. RE2 has no look-behind or look-ahead, so the context conditions ("not preceded by a
digit", "not followed by a word character") match the neighbouring characters as part of the pattern, and the search
loop here steps back over them so the next match still sees them. Word characters, digits and word boundaries are
ASCII (as in RE2's `\\w`, `\\d`, `\\b`): a letter outside ASCII next to an address or number counts as a separator,
and full-width or Arabic-Indic digits are not digits. Each match costs O(its length) in Python, so a whole text costs
O(its length). The email pattern is capped at RFC 5321's lengths above; keys and key=value values are taken whole
however long they run (a cap would leave the rest of a long key in the text), which stays linear because each ends
where its token ends.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterator
from typing import NamedTuple

import re2

KINDS = ("SECRET", "EMAIL", "CREDIT_CARD", "SSN", "IP", "PHONE")
MAX_EMAIL_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_EMAIL_DOMAIN = 255  # RFC 5321 4.5.3.1.2


class Span(NamedTuple):
    start: int  # character offsets into the text, end exclusive
    end: int
    kind: str


# ---------------------------------------------------------------------------------------------- validators
def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Issuer prefixes and lengths (Visa, Mastercard, Amex, Discover, JCB, Diners): a long sum in a maths answer passes
# Luhn one time in ten, so the shape has to look like a card too.
_ISSUERS = [(("4",), {16, 19}), (("51", "52", "53", "54", "55", "22", "23", "24", "25", "26", "27"), {16}),
            (("34", "37"), {15}), (("6011", "65", "644", "645", "646", "647", "648", "649"), {16, 19}),
            (("35",), {16}), (("300", "301", "302", "303", "304", "305", "36", "38"), {14})]


def card_ok(number: str) -> bool:
    digits = "".join(c for c in number if c.isdigit())
    shaped = any(digits.startswith(prefixes) and len(digits) in lengths for prefixes, lengths in _ISSUERS)
    return shaped and luhn_ok(digits)


def public_ip(ip: str) -> bool:
    """datatrove's `public_ip_validator`: only a globally routable address is PII."""
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ patterns
# Patterns are bytes run in Latin-1 mode over the UTF-8 encoding of the text: every class below is ASCII, so a byte of
# a multi-byte character is "some other character", as the character itself is; one byte per position makes the
# search loop's offsets plain integers (mapped back to characters once, at the end).
def _compile(pattern: bytes):
    options = re2.Options()
    options.encoding = re2.Options.Encoding.LATIN1
    options.log_errors = False  # should a DFA outgrow its memory on crafted text, RE2 goes on (linear) without logging
    return re2.compile(pattern, options)


_SPACE = rb"[\t\n\x0b\x0c\r\x1c-\x1f ]"  # what Python's \s matches in ASCII
_LOCAL = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"

SECRET = _compile(
    rb"\b(?:sk-(?:proj-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|xox[abprs]-[A-Za-z0-9-]{10,}"
    rb"|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,})\b")
KEY_VALUE_SECRET = _compile(rb"(?i)\b(?:api[_-]?key|secret|token|password)" + _SPACE + rb"*[:=]" + _SPACE
                            + rb"*['\"]?([A-Za-z0-9_\-/+=]{16,})")
EMAIL = _compile(rb"\b" + _LOCAL + rb"+(?:\." + _LOCAL + rb"+)*@(?:(?:" + _LABEL + rb"\.)+" + _LABEL
                 + rb"|\[(?:" + _OCTET + rb"\.){3}(?:" + _OCTET + rb"|[A-Za-z0-9-]*[A-Za-z0-9]:)\])")
# Not preceded or followed by a digit: the neighbour is consumed (or is the start/end of the text).
CARD = _compile(rb"(?:^|[^0-9])((?:[0-9][ -]?){12,18}[0-9])(?:[^0-9]|$)")
SSN = _compile(rb"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b")
IPV4 = _compile(rb"(?:" + _OCTET + rb"\.){3}" + _OCTET)
# Phone shapes: "+CC" then 2-4 digit groups, or a national (area) / 3-digit prefix + 3-4 + 4 digits. Before it: not a
# word character or "+", nor a digit then one of " .,-"; after it: not a word character or "-", nor one of " .,"
# then a digit. Digit groups glued to more digit groups are not phone numbers.
PHONE = _compile(
    rb"(?:^|[^0-9A-Za-z_+ .,\-]|(?:^|[^0-9])[ .,\-])"
    rb"(\+[0-9]{1,3}(?:[ .\-]\(?[0-9]{2,4}\)?){2,4}|(?:\([0-9]{2,4}\)[ .\-]?|[0-9]{3}[ .\-])[0-9]{3,4}[ .\-][0-9]{4})"
    rb"(?:$|[^0-9A-Za-z_\- .,]|[ .,](?:$|[^0-9]))")

_DIGITS = b"0123456789"
_LETTERS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_WORD = frozenset(_DIGITS + _LETTERS + b"_")
_CONTINUATION = bytes(range(0x80, 0xC0))  # UTF-8 continuation bytes: deleting them leaves one byte per character


# ---------------------------------------------------------------------------------------- per-kind checks
# A check gets the encoded text and a match's span (s, e); it returns the span to claim (maybe narrowed) or None, and
# where the search goes on. As with `re.sub` and a replacement that keeps the match, a rejected match is passed over.
def _has(value: bytes, chars: bytes) -> bool:
    return len(value.translate(None, chars)) < len(value)


def _key_value(buf: bytes, s: int, e: int):
    # `password = 'your_password'` is a placeholder, not a secret: the value needs letters and digits.
    value = buf[s:e]
    return ((s, e) if _has(value, _DIGITS) and _has(value, _LETTERS) else None), e


def _email(buf: bytes, s: int, e: int):
    at = buf.index(b"@", s, e)
    if e - at - 1 > MAX_EMAIL_DOMAIN:
        return None, at + 1  # not an address; the domain may still be the local part of one that follows
    if at - s > MAX_EMAIL_LOCAL:
        # The last <= 64 characters that start at a word boundary and not at a dot are a valid local part.
        p = at - MAX_EMAIL_LOCAL
        while p < at and (buf[p] == 0x2E or (buf[p - 1] in _WORD) == (buf[p] in _WORD)):
            p += 1
        if p == at:
            return None, at + 1
        s = p
    return (s, e), e


def _card(buf: bytes, s: int, e: int):
    return ((s, e) if card_ok(buf[s:e].decode("ascii")) else None), e


def _ip(buf: bytes, s: int, e: int):
    return ((s, e) if public_ip(buf[s:e].decode("ascii")) else None), e


def _any(buf: bytes, s: int, e: int):
    return (s, e), e


class _Rule(NamedTuple):
    kind: str
    regex: object
    group: int  # the capturing group that is the match itself (0: all of it)
    lead: int  # how many characters of context before the match the pattern consumes, at most
    check: Callable


RULES = [_Rule("SECRET", SECRET, 0, 0, _any), _Rule("SECRET", KEY_VALUE_SECRET, 1, 0, _key_value),
         _Rule("EMAIL", EMAIL, 0, 0, _email),
         # cards before phones: a card number also looks like digit groups
         _Rule("CREDIT_CARD", CARD, 1, 1, _card), _Rule("SSN", SSN, 0, 0, _any), _Rule("IP", IPV4, 0, 0, _ip),
         _Rule("PHONE", PHONE, 1, 2, _any)]


def _any_rule():
    # Every rule's pattern as one alternation: one linear pass says whether any rule could claim anything, so text
    # with no PII (most of it; a streamed answer is checked chunk by chunk) costs one search instead of one per rule.
    options = re2.Options()
    options.encoding, options.never_capture, options.log_errors = re2.Options.Encoding.LATIN1, True, False
    return re2.compile(b"|".join(b"(?:" + rule.regex.pattern + b")" for rule in RULES), options)


_ANY_RULE = _any_rule()

# Every rule's match holds one of these bytes: a digit (cards, SSNs, IPs, phones), "@" (an email), ":" or "=" (a
# key=value secret), "-" or "_" (the other keys' prefixes), or else is one of the two key prefixes that have none of
# them (AKIA, AIza). Text without any — most chunks of a streamed answer — needs no search: a few byte operations
# instead of an RE2 call, which the guard makes once per streamed token and which costs several times more there,
# between other work, than in a loop of its own. tests/test_pii.py holds every rule to this.
_TRIGGERS = b"0123456789@:=-_"
_TRIGGER_WORDS = (b"AKIA", b"AIza")


def _could_match(buf: bytes) -> bool:
    return len(buf.translate(None, _TRIGGERS)) < len(buf) or any(w in buf for w in _TRIGGER_WORDS)


def _scan(rule: _Rule, buf: bytes) -> Iterator[tuple[int, int]]:
    """The spans `rule` claims in `buf`, left to right, as `re.finditer` with look-arounds would find them."""
    pos = done = 0  # next search start; end of the last match (a match may not start before it)
    while pos <= len(buf):
        m = rule.regex.search(buf, pos)
        if m is None:
            return
        s, e = m.span(rule.group)
        if s < done:  # only its consumed context may overlap the last match, so look again one further on
            pos = m.start() + 1
            continue
        span, done = rule.check(buf, s, e)
        if span is not None:
            yield span
        # step back over the context the next match may need to consume (it was part of this match, or its context)
        pos = max(m.start() + 1, done - rule.lead)


# ------------------------------------------------------------------------------------------------------ API
def find_pii(text: str) -> list[Span]:
    """Every PII span in `text`: sorted, non-overlapping, each of one kind of `KINDS`."""
    if not text:
        return []
    ascii_text = text.isascii()
    buf = encoded = text.encode("ascii") if ascii_text else text.encode("utf-8", "surrogatepass")
    if not _could_match(buf) or _ANY_RULE.search(buf) is None:
        return []
    found: list[tuple[int, int, str]] = []
    for rule in RULES:
        spans = list(_scan(rule, buf))
        if spans:
            found += [(s, e, rule.kind) for s, e in spans]
            masked = bytearray(buf)
            for s, e in spans:  # the later rules see a separator where this one matched (as they saw <KIND>)
                masked[s:e] = bytes(e - s)
            buf = bytes(masked)
    found.sort()
    if ascii_text:
        return [Span(*x) for x in found]
    # byte offsets -> character offsets, in one pass over the encoded text
    out, last, chars = [], 0, 0
    for s, e, kind in found:
        chars += len(encoded[last:s].translate(None, _CONTINUATION))
        start = chars
        chars += len(encoded[s:e].translate(None, _CONTINUATION))
        out.append(Span(start, chars, kind))
        last = e
    return out


def redact_spans(text: str, spans: list[Span]) -> str:
    """`text` with each span (sorted, non-overlapping, as `find_pii` gives them) replaced by `<KIND>`."""
    out, last = [], 0
    for s, e, kind in spans:
        out += [text[last:s], f"<{kind}>"]
        last = e
    out.append(text[last:])
    return "".join(out)


def redact_pii(text: str, counts: Counter | None = None) -> str:
    """Replace PII with typed placeholders (`<EMAIL>`, `<PHONE>`, `<IP>`, `<CREDIT_CARD>`, `<SECRET>`, `<SSN>`);
    adds one to `counts[kind]` per replacement."""
    spans = find_pii(text)
    if counts is not None:
        counts.update(span.kind for span in spans)
    return redact_spans(text, spans)
