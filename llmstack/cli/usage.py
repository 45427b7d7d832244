"""`llmstack usage`: a running server's usage records — requests, tokens and cost per key, model and UTC day, what
spend budgets charge — read from its admin route (`GET /admin/usage`, an admin key), like `llmstack route`.

    llmstack usage --key alice --since YYYY-MM-DD
    llmstack usage --model assistant --json
"""

from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import urlencode

import typer

from llmstack.cli.common import Base, KeyEnv, admin_call

COLUMNS = (("day", "day"), ("key", "key"), ("model", "model"), ("requests", "requests"),
           ("input_tokens", "input tokens"), ("output_tokens", "output tokens"), ("cost_usd", "cost USD"))


def usage(key: Annotated[str | None, typer.Option(help="only this key id")] = None,
          model: Annotated[str | None, typer.Option(help="only this model (the version that answered)")] = None,
          since: Annotated[str | None, typer.Option(help="first UTC day, YYYY-MM-DD (default: 30 days ago)")] = None,
          until: Annotated[str | None, typer.Option(help="last UTC day, YYYY-MM-DD (default: today)")] = None,
          as_json: Annotated[bool, typer.Option("--json", help="print the records as JSON")] = False,
          api_base: Base = "http://127.0.0.1:8000", api_key_env: KeyEnv = "LLMSTACK_ADMIN_KEY"):
    """Print usage per key, model and UTC day, with totals."""
    query = {k: v for k, v in {"key": key, "model": model, "since": since, "until": until}.items() if v}
    report = admin_call("GET", f"{api_base}/admin/usage" + (f"?{urlencode(query)}" if query else ""), api_key_env)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print(table(report))


def table(report: dict) -> str:
    """The records as an aligned text table, a totals line last."""
    def cell(field: str, v) -> str:
        return f"{v:.6f}" if field == "cost_usd" else str(v)

    rows = [[title for _, title in COLUMNS]]
    rows += [[cell(f, r[f]) for f, _ in COLUMNS] for r in report["rows"]]
    totals = report["totals"]
    rows.append(["total", "", "", *[cell(f, totals[f]) for f, _ in COLUMNS[3:]]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    return "\n".join([f"usage {report['since']} .. {report['until']} (UTC days)", *lines])
