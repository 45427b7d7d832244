"""Benchmark results as data: every scripts/bench_*.py hands its figures to `write`, which adds what the run was (the
command line, git sha, CPU model and flags, load average, GPU) and saves one JSON record under benchmarks/results/.
The docs' benchmarks page is generated from the latest record of each benchmark (scripts/gen_docs.py), so a number
on that page always comes with the machine and command that produced it.

A record: {"bench", "when" (UTC, ISO 8601), "source" ("measured" or where a converted figure came from), "command",
"git_sha", "machine": {"cpu_model", "cpu_flags": {flag: bool}, "cores", "load_avg", "gpu"}, "settings", "figures",
"ratios", "goals", "notes"}. `figures` maps a table's name to a list of rows (dicts), a dict of values, or one value;
`ratios` maps a name to a number; `goals` maps a ratio's name to what it should be ("<= 1.10x").
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
ENV_DIR = "LLMSTACK_BENCH_RESULTS"  # where records go instead (a test, or a read-only checkout)
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "avx2")  # the ones that decide vLLM's CPU kernels and bf16 speed


def results_dir(override: str | Path | None = None) -> Path:
    return Path(override or os.environ.get(ENV_DIR) or RESULTS)


def add_argument(parser: argparse.ArgumentParser) -> None:
    """`--results-dir` on a bench script's command line (default: benchmarks/results/, or $LLMSTACK_BENCH_RESULTS)."""
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"where the JSON record goes (default: benchmarks/results/ or ${ENV_DIR})")


def cpu(cpuinfo: str | None = None) -> dict:
    """CPU model and the flags that matter here, from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    model, flags = platform.processor() or None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu_model": model, "cpu_flags": {f: f in flags for f in CPU_FLAGS}}


def gpu() -> str | None:
    """The CUDA device's name where torch is already imported and sees one (never imports torch itself)."""
    torch = sys.modules.get("torch")
    try:
        return torch.cuda.get_device_name() if torch is not None and torch.cuda.is_available() else None
    except Exception:  # a broken CUDA setup must not lose the record
        return None


def machine() -> dict:
    return {**cpu(), "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "gpu": gpu()}


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def write(bench: str, *, settings: dict, figures: dict, ratios: dict | None = None, goals: dict | None = None,
          notes: str | None = None, results: str | Path | None = None, argv: list[str] | None = None) -> Path:
    """Save one measured run of `bench` as benchmarks/results/<bench>-<UTC timestamp>.json; returns its path."""
    now = dt.datetime.now(dt.UTC)
    argv = sys.argv if argv is None else argv
    record = {"bench": bench, "when": now.isoformat(timespec="seconds"), "source": "measured",
              "command": " ".join([Path(sys.executable).name, *argv]), "git_sha": git_sha(), "machine": machine(),
              "settings": settings, "figures": figures, "ratios": ratios or {}, "goals": goals or {}}
    if notes:
        record["notes"] = notes
    out = results_dir(results)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}-{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"benchmark record: {path}")
    return path


@contextlib.contextmanager
def work_folder(prefix: str):
    """A temp folder for a run's servers, their logs and a staged model: removed when the run ends, kept when it fails
    (its path printed), for the logs."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        print(f"kept for its logs: {path}", file=sys.stderr)
        raise
    shutil.rmtree(path, ignore_errors=True)


def model(name: str, work: str | Path) -> Path:
    """The model a benchmark runs: `tiny` builds the test suite's tiny random model under `work` (a smoke check of the
    script in seconds), any other name is a packaged model or a folder (`llmstack.models.resolve`)."""
    if name == "tiny":
        from llmstack.testing import build_tiny_model

        return build_tiny_model(Path(work) / "tiny")
    from llmstack.models import resolve

    return resolve(name)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def latest(results: str | Path | None = None) -> dict[str, dict]:
    """The newest record of each benchmark (by its `when`), keyed by benchmark name."""
    newest: dict[str, dict] = {}
    for path in sorted(results_dir(results).glob("*.json")):
        rec = load(path)
        if rec["bench"] not in newest or rec["when"] > newest[rec["bench"]]["when"]:
            newest[rec["bench"]] = rec
    return newest
