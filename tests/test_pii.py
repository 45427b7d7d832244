"""llmstack.pii, the one PII detector of curation and the API guard: which kinds it finds and which look-alikes it
leaves, that it takes linear time on the inputs that made the old backtracking patterns quadratic, and that curation
and the guard redact a text the same way."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import pytest

from llmstack.config.serve import GuardPolicy, RailPolicy
from llmstack.pii import KINDS, MAX_EMAIL_LOCAL, find_pii, redact_pii
from llmstack.serve.rails import Rails

FOUND = [
    # emails (datatrove's pattern)
    ("Mail bob.smith@corp.example.com now", "Mail <EMAIL> now"),
    ("write to a+tag@mail.co.uk.", "write to <EMAIL>."),
    ("literal me@[192.168.0.1]", "literal <EMAIL>"),
    ("a..b@x.com", "a..<EMAIL>"),  # no empty dot-atom: the address starts after the dots
    ("请联系john@example.com谢谢", "请联系<EMAIL>谢谢"),  # ASCII word boundaries: CJK text around it is a separator
    # phones
    ("call +1 415-555-0134.", "call <PHONE>."),
    ("call (555) 123-4567 now", "call <PHONE> now"),
    ("Mail me at jane.doe@example.com or call 555-123-4567.", "Mail me at <EMAIL> or call <PHONE>."),
    ("电话 +86 10 1234 5678", "电话 <PHONE>"),
    # public IPs only
    ("Server 8.8.8.8, router 192.168.0.1.", "Server <IP>, router 192.168.0.1."),
    # cards: issuer shape and Luhn
    ("Card 4111 1111 1111 1111, ok", "Card <CREDIT_CARD>, ok"),
    ("Card 5500-0000-0000-0004", "Card <CREDIT_CARD>"),
    ("amex 378282246310005", "amex <CREDIT_CARD>"),
    # SSNs
    ("ssn 123-45-6789.", "ssn <SSN>."),
    # secrets
    ("key sk-abcdefghijklmnopqrstuvwxyz123456 and AKIAABCDEFGHIJKLMNOP", "key <SECRET> and <SECRET>"),
    ("token hf_" + "a1" * 15 + " here", "token <SECRET> here"),
    ('api_key = "a8f3k2j9d8s7f6g5h4j3"', 'api_key = "<SECRET>"'),
    ("PASSWORD: Tr0ub4dor3xkcd936zz", "PASSWORD: <SECRET>"),
]

LEFT_ALONE = [
    "not an address: foo@bar",  # no dot in the domain
    "x" * (MAX_EMAIL_LOCAL + 1) + "@example.com",  # a local part longer than RFC 5321 allows
    "user@" + "b." * 150 + "com",  # a domain longer than 255
    "router 192.168.0.1, loopback 127.0.0.1, private 10.0.0.1, shared 100.64.0.1",
    "not a card: 4111 1111 1111 1112",  # fails Luhn
    "not a card: 1234567890123452",  # passes Luhn, but no issuer's numbers start with 12
    "256626720691 + 1646615806005 = 4212883012996",  # a sum that passes Luhn (LLaMA-Factory's dpo_en_demo)
    "472547338 + 960397912423686 = 960398384971024",
    "In 1999-2004 pi was 3.14159.",
    "Budget 1946 67,229 1945 100, 031",  # a table of figures, not phones
    "1 555-123-4567",  # glued to another digit group
    "call 555-123-4567 9",
    "x555-123-4567",  # glued to letters
    "555-123-4567-8901",
    "not an ssn 123-45-67890",
    "password = 'your_password'",  # a placeholder, not a secret
    "EMAIL_PASSWORD = 'your_email_password'",
    "sk-short",
]


@pytest.mark.parametrize("text, redacted", FOUND)
def test_kinds_found(text, redacted):
    counts = Counter()
    assert redact_pii(text, counts) == redacted
    assert sum(counts.values()) == redacted.count("<") and set(counts) <= set(KINDS)


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_look_alikes_left_alone(text):
    counts = Counter()
    assert redact_pii(text, counts) == text and not counts


def test_spans_are_character_offsets_kinds_in_order_and_long_local_parts_cut():
    text = "héllo 😀 bob@x.org, ☎ +1 415-555-0134, card 4111111111111111"
    spans = find_pii(text)
    assert [(text[s:e], kind) for s, e, kind in spans] == [
        ("bob@x.org", "EMAIL"), ("+1 415-555-0134", "PHONE"), ("4111111111111111", "CREDIT_CARD")]
    # earlier kinds win: a key's value is a secret, not an email's local part or a phone
    assert redact_pii("token=a8f3k2j9d8s7f6g5h4j3@corp.com") == "token=<SECRET>@corp.com"
    # of a run longer than 64 characters before the @, the last <= 64 from a word boundary are the local part
    text = "a.b." * 30 + "john@corp.com"
    (span,) = find_pii(text)
    assert span.end == len(text) and span.end - span.start - len("@corp.com") <= MAX_EMAIL_LOCAL
    assert redact_pii(text).endswith(".<EMAIL>")


# Each of these took the old backtracking patterns quadratic time (curation: 0.3 s at 10 KB, 6.7 s at 40 KB of "a.";
# the guard: 290 s on 400 KB): at 1 MB that is hours. RE2 does each in well under a second.
PATHOLOGICAL = {
    "word boundaries": "a." * 500_000,
    "digits and spaces": "1234 5678 " * 100_000,
    "at signs": "a@" * 500_000,
    "dashes": "a-" * 500_000,
    "one long word": "x" * 1_000_000,
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_linear_time_on_pathological_input(name):
    text = PATHOLOGICAL[name]
    start = time.perf_counter()
    find_pii(text)
    assert time.perf_counter() - start < 5.0


def test_guard_rails_linear_time_on_pathological_input():
    text = "a." * 500_000
    start = time.perf_counter()
    v = Rails.from_config(GuardPolicy().input).check(text)  # injection heuristics and PII
    assert v.text == text and not v.blocked
    # a 1 MB word could still become an address: held whole
    rail = Rails.from_config(GuardPolicy().output, "output", holdback=48).stream()
    assert rail.feed("x" * 1_000_000).text == ""
    assert rail.feed(" done", final=True).text == "x" * 1_000_000 + " done"
    # a long word streamed 4 characters at a time
    rail = Rails.from_config(GuardPolicy().output, "output", holdback=48).stream()
    out = "".join(rail.feed("ab.c" if i < 2_499 else "ab.c", final=i == 2_499).text for i in range(2_500))
    assert out == "ab.c" * 2_500
    assert time.perf_counter() - start < 5.0


SAMPLES = [t for t, _ in FOUND] + LEFT_ALONE + [
    "Contact: john.smith@example.org thanks, or +44 20 7946 0958 / 4111-1111-1111-1111 from 8.8.4.4",
    "api_key: 'sk-proj-abcdefghijklmnopqrstuvwxyz0123' ssn 078-05-1120 tel (020) 7946-0958",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_curation_and_guard_redact_alike(text):
    from llmstack.data.filters import redact_pii as curation_redact

    counts = Counter()
    curated = curation_redact(text, counts)
    verdict = Rails.from_config(RailPolicy(injection="off", pii="redact")).check(text)
    assert verdict.text == curated
    assert verdict.decisions == [f"pii:redact:{kind}" for kind in sorted(counts)]


def test_guard_does_not_import_datatrove():
    code = ("import sys, llmstack.serve.guard, llmstack.serve.rails; "
            "sys.exit(any(m.startswith('datatrove') for m in sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_text_without_a_trigger_byte_is_never_searched_and_no_rule_could_have_matched_it():
    """find_pii skips the RE2 search for text with none of `_TRIGGERS` and neither of `_TRIGGER_WORDS`: every rule's
    match must hold one. Checked on every example above, on the key prefixes that have no digit, dash or underscore,
    and on random text over an alphabet of letters, digits and the characters the patterns name (the implication,
    rule by rule, on the raw regex search: also the matches a rule's checks would then reject)."""
    import random

    from llmstack import pii

    # keys with no digit: only their prefix's dash or underscore, or the prefix itself, gives them away
    trigger_free = ["AKIAABCDEFGHIJKLMNOP", "AIza" + "b" * 35, "key AKIAQWERTYUIOPASDFGH here", "sk-" + "q" * 24,
                    "ghp_" + "Q" * 36, "xoxb-" + "q" * 12, "hf_" + "q" * 30]
    for text in trigger_free:
        assert find_pii(text) and pii._could_match(text.encode())
    # raw matches (a rule's check may still reject them) that hold a single trigger: ":", "=", one digit repeated
    for text in ["password: abcdefghijklmnopqrstuv", "secret=abcdefghijklmnopqrstuv", "n 0000000000000000",
                 "n 9999999999999999"]:
        assert any(rule.regex.search(text.encode()) for rule in pii.RULES) and pii._could_match(text.encode())
    rng = random.Random(0)
    alphabet = "aAkKiIzZsSxXoOhfgpuyrt " * 3 + "0123456789" * 2 + "@.:=-_+()[]'\"\n/"
    seeds = [t for t, _ in FOUND] + LEFT_ALONE + trigger_free
    kinds = Counter()
    for n in range(20_000):
        if n % 2:  # random text
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        else:  # an example with a few characters replaced, dropped or added
            text = list(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                k = rng.randrange(len(text) + 1)
                text[k:k + rng.randint(0, 1)] = rng.choice(alphabet) if rng.random() < 0.7 else ""
            text = "".join(text)
        buf = text.encode()
        for rule in pii.RULES:
            if rule.regex.search(buf) is not None:
                kinds[rule.kind] += 1
                assert pii._could_match(buf), (rule.kind, buf)
    assert all(kinds[kind] > 50 for kind in KINDS), kinds  # the texts did reach every pattern
    assert not pii._could_match(b" plain words, and (more) words!") and find_pii(" plain words, and more") == []
