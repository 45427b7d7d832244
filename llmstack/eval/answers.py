"""Final answers read out of free text: what a rule-based check compares (the grpo stage's gsm8k reward, the teacher
source's gsm8k verifier in curation)."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """GSM8K convention: the number after '####', else the last number in the text ('1,234' -> 1234)."""
    marked = "####" in text
    if marked:
        text = text.rsplit("####", 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    return float(found[0 if marked else -1].replace(",", ""))


def same_number(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) < 1e-6
