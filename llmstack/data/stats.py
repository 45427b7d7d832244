"""What the data card says about a dataset's kept rows beyond counts: tool calls (ToolStats) and thinking traces
(ThinkingStats). Each sees the kept rows one at a time, as curation's mixing step streams them."""

from __future__ import annotations

import statistics
from array import array
from collections import Counter
from pathlib import Path

from llmstack.data.thinking import THINKING, traces


class ToolStats:
    """What the card says about a tool dataset's kept rows: tools offered and calls made per row, the functions
    called, and argument validity (every kept call passed its JSON Schema; the failures are in quarantine)."""

    def __init__(self):
        self.rows = 0
        self.tools_per_row: Counter = Counter()
        self.calls_per_row: Counter = Counter()
        self.functions: Counter = Counter()

    def add(self, row: dict) -> None:
        self.rows += 1
        calls = [c["function"]["name"] for m in row["messages"] for c in m.get("tool_calls") or []]
        self.tools_per_row[len(row.get("tools") or [])] += 1
        self.calls_per_row[len(calls)] += 1
        self.functions.update(calls)

    def summary(self, dropped: Counter) -> dict:
        from llmstack.data.formats import BAD_ARGUMENTS, BAD_JSON, BAD_TOOLS, UNKNOWN_FUNCTION

        invalid = {label: sum(n for (_, reason), n in dropped.items() if reason.startswith(prefix))
                   for label, prefix in (("unknown_function", UNKNOWN_FUNCTION), ("arguments_not_json", BAD_JSON),
                                         ("arguments_off_schema", BAD_ARGUMENTS), ("malformed_tools", BAD_TOOLS))}
        calls = sum(self.functions.values())
        return {"rows": self.rows, "rows_with_tools": self.rows - self.tools_per_row.get(0, 0),
                "rows_with_calls": self.rows - self.calls_per_row.get(0, 0),
                "tools_per_row": {str(k): v for k, v in sorted(self.tools_per_row.items())},
                "calls_per_row": {str(k): v for k, v in sorted(self.calls_per_row.items())},
                "calls": calls, "distinct_functions_called": len(self.functions),
                "top_functions": dict(self.functions.most_common(10)),
                # kept calls were all checked against their tool's JSON Schema when the row was read
                "arguments_valid": calls, "rows_quarantined": invalid}


class ThinkingStats:
    """Rows with thinking and how long their traces are: tokens of the recipe tokenizer when the stage has one (as the
    card's row lengths are), else whitespace-separated words. A row's length is its traces' lengths together."""

    def __init__(self, tokenizer: Path | None):
        self.tokenizer = str(tokenizer) if tokenizer is not None else None
        self.unit = "tokens" if tokenizer is not None else "words"
        self.rows = 0
        self.lengths = array("l")
        self._pending: list[list[str]] = []

    def add(self, row: dict) -> None:
        self.rows += 1
        found = traces(row)
        if found:
            self._pending.append(found)
            if len(self._pending) >= 256:
                self._flush()

    def _flush(self) -> None:
        texts = [t for row in self._pending for t in row]
        if self.tokenizer is not None:
            from llmstack.data.filters import count_tokens

            counts = iter(count_tokens(self.tokenizer, texts))
        else:
            counts = iter(len(t.split()) for t in texts)
        for row in self._pending:
            self.lengths.append(sum(next(counts) for _ in row))
        self._pending = []

    def summary(self, dropped: Counter) -> dict:
        self._flush()
        lengths = sorted(self.lengths)
        malformed = sum(n for (_, reason), n in dropped.items() if reason.startswith(f"{THINKING}:"))
        quarantined = {"malformed": malformed,
                       "too_long": sum(n for (step, _), n in dropped.items() if step == "thinking_length")}
        out = {"rows": self.rows, "rows_with_thinking": len(lengths), "unit": self.unit,
               "lengths": ({"min": lengths[0], "median": statistics.median(lengths),
                            "mean": round(statistics.fmean(lengths), 1), "max": lengths[-1], "total": sum(lengths)}
                           if lengths else {}),
               "rows_quarantined": quarantined}
        if lengths:
            edges = _edges(lengths[-1])
            out["histogram"] = {"edges": edges, "rows": [sum(1 for n in lengths if lo <= n < hi)
                                                         for lo, hi in zip(edges, edges[1:])]}
        return out


def _edges(top: int, bins: int = 10) -> list[int]:
    """Ten equal integer bins from 0 to past the longest trace (the last edge is exclusive)."""
    width = max(1, -(-(top + 1) // bins))
    return [width * k for k in range(bins + 1)]
