"""What every format adapter shares: `BadRow` (a record that cannot become a row; its message is the quarantine
reason), the reason prefixes the data card counts by, and reading one turn. Its own module so that the adapters
(formats.py), their tool-call half (tool_rows.py) and the thinking normaliser (thinking.py) share it without importing
each other.
"""

from __future__ import annotations

from typing import Any


class BadRow(Exception):
    """A record that cannot become a row; the message is the quarantine reason."""


# Quarantine reasons for calls start with one of these, so the card can count them (argument validity).
UNKNOWN_FUNCTION = "tool call: unknown function"
BAD_JSON = "tool call: arguments are not valid JSON"
BAD_ARGUMENTS = "tool call: arguments do not match the schema"
BAD_TOOLS = "malformed tools"

REASONING = "reasoning_content"  # an assistant turn's thinking trace (thinking.py)
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
            "bot": "assistant", "system": "system"}


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"malformed: {what} must be a string, got {type(value).__name__}")
    return value


def turn(raw: Any, role_key: str, content_key: str, where: str) -> dict:
    if not isinstance(raw, dict):
        raise BadRow(f"malformed: {where} must be an object, got {type(raw).__name__}")
    if role_key not in raw or content_key not in raw:
        raise BadRow(f"malformed: {where} needs `{role_key}` and `{content_key}`")
    role = ROLE_MAP.get(str(raw[role_key]).lower())
    if role is None:
        raise BadRow(f"malformed: {where} has unsupported role '{raw[role_key]}'")
    msg = {"role": role, "content": text(raw[content_key], f"{where}.{content_key}")}
    if REASONING in raw:  # checked, with inline <think> blocks, by thinking.normalise
        msg[REASONING] = raw[REASONING]
    return msg
