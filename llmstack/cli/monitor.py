"""`llmstack monitor`: drift of live traffic against the training data (PSI/KS per feature, plots)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from llmstack.cli.common import console, fail


def monitor(reference: Annotated[str, typer.Option(help="curated dataset folder (runs/…/curate/sft) or profile JSON")],
            live: Annotated[str, typer.Option(help="live profile: JSON file or the server's /v1/monitor/profile URL")],
            out: Annotated[Path, typer.Option(help="report folder")] = Path("monitor"),
            api_key_env: Annotated[str, typer.Option(help="env var with the API key for a URL")] = "LLMSTACK_API_KEY",
            psi_alert: Annotated[float, typer.Option(help="PSI above which a feature counts as drifted")] = 0.25):
    """Compare live traffic with the training data (PSI/KS per feature); writes a report with plots. Exit 3 on drift."""
    from llmstack.monitor import compare, load_profile, write_report

    try:
        ref, cur = load_profile(reference), load_profile(live, os.environ.get(api_key_env))
    except (OSError, ValueError, KeyError) as exc:
        fail(exc)
    result = compare(ref, cur, psi_alert=psi_alert)
    report = write_report(result, out)
    for name, f in result["features"].items():
        print(f"{name:12s} PSI {f['psi']:.3f}  {f['status']}")
    console.print(f"report: {report}")
    if result["drift"]:
        raise typer.Exit(3)
