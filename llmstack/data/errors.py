"""What a record that cannot become a row raises, and the reason prefixes the data card counts by. Its own module so
that the format adapters (formats.py) and the thinking normaliser (thinking.py) share it without importing each other.
"""

from __future__ import annotations


class BadRow(Exception):
    """A record that cannot become a row; the message is the quarantine reason."""


# Quarantine reasons for calls start with one of these, so the card can count them (argument validity).
UNKNOWN_FUNCTION = "tool call: unknown function"
BAD_JSON = "tool call: arguments are not valid JSON"
BAD_ARGUMENTS = "tool call: arguments do not match the schema"
BAD_TOOLS = "malformed tools"
