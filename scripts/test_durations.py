"""Write tests/durations.json, each test file's seconds (setup, call and teardown of all its tests) in a full run, from
that run's JUnit XML report. `make test` hands the suite to two pytest-xdist workers one file at a time, longest first
by this record (tests/conftest.py), so that no long file starts last; refresh it when files grow or move:

    make test PYTEST_ARGS=--junitxml=runs/junit.xml && .venv/bin/python scripts/test_durations.py runs/junit.xml

A file the record lacks still runs, counted as a short one.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def file_seconds(report: Path) -> dict[str, float]:
    """Seconds per test file name: a testcase's classname is its module's dotted path (`tests.test_sweep`), or with
    a test class, the module's path and the class (`tests.test_x.TestY`)."""
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(report).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        module = next((p for p in parts if p.startswith("test_")), None)
        if module is not None:
            seconds[f"{module}.py"] += float(case.get("time") or 0)
    return dict(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="a full run's JUnit XML report (pytest --junitxml)")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "durations.json")
    args = ap.parse_args()
    seconds = file_seconds(args.report)
    if not seconds:
        raise SystemExit(f"{args.report}: no test cases in it; give the --junitxml report of a full run")
    args.out.write_text(json.dumps({k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
                                   indent=1) + "\n")
    print(f"wrote {args.out}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all")


if __name__ == "__main__":
    main()
