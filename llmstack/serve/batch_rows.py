"""The rows `llmstack generate` works on: read from JSONL, parquet or a `datasets` folder, checked one by one
(config/generate.py), split into the rows to generate and the quarantined ones (with the reason), assigned to shards
by a stable hash of their id, and minus the ids an earlier run already wrote to the output (resume).

A row without an `id` gets `line-N`, N its 1-based line (row) number in the input, so a rerun over the same file gives
it the same id. The output is append-only JSONL; a run killed mid-write can leave a torn last line, which `done_ids`
cuts off (the row is generated again) instead of failing on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from llmstack.config.base import format_errors
from llmstack.config.generate import InputRow, Sampling


class InputError(Exception):
    """The input as a whole cannot be read (missing file, unknown format): the run stops before any row."""


@dataclass
class Row:
    key: str  # the id as a string: what resume, dedup and sharding compare
    id: str | int
    line: int
    row: InputRow
    sampling: dict  # the resolved sampling: the run's defaults, the row's overrides, the row's seed


@dataclass
class Plan:
    rows: list[Row] = field(default_factory=list)  # to generate, in input order
    quarantined: list[dict] = field(default_factory=list)  # {"line", "id", "reason", "row"}
    done: int = 0  # rows of this shard already in the output


def shard_of(key: str, shards: int) -> int:
    """Which of `shards` shards a row id belongs to: stable across runs, machines and Python hash seeds."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shards


def read_input(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(1-based line, record) for each row; a JSONL line that is not a JSON object comes as its raw text. JSONL is
    read line by line (no size limit); parquet files and `datasets` folders through the `datasets` library."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".parquet":
        yield from enumerate(_read_dataset(path), start=1)
        return
    if not path.is_file():
        raise InputError(f"{path}: no such file (give a .jsonl file, a .parquet file or a `datasets` folder)")
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                yield n, line.rstrip("\n")
                continue
            yield n, rec if isinstance(rec, dict) else line.rstrip("\n")


def _read_dataset(path: Path) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.Dataset.from_parquet(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{path}: not a `datasets` folder or parquet file ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise InputError(f"{path}: a DatasetDict with splits {list(ds)}; save the one split to generate over")
        ds = next(iter(ds.values()))
    yield from ds


def resolve_sampling(defaults: Sampling, row: Sampling, key: str) -> dict:
    """The row's sampling: its own values over the run's defaults. A row without a seed gets the run's seed plus a
    stable hash of its id: reproducible, yet two rows with the same prompt do not get the same sample."""
    out = {**defaults.model_dump(), **row.model_dump(exclude_none=True)}
    if row.seed is None:
        out["seed"] = ((defaults.seed or 0) + shard_of(key, 2**31)) % 2**31
    out["stop"] = out.get("stop") or []
    out["ignore_eos"] = bool(out.get("ignore_eos"))
    return out


def plan(path: Path, defaults: Sampling, done: set[str], shards: int = 1, shard: int = 0) -> Plan:
    """Check every row; keep this shard's rows not yet `done`, quarantine this shard's malformed ones. Duplicate ids
    are found over the whole input (the first occurrence is generated, later ones are quarantined)."""
    out = Plan()
    first_line: dict[str, int] = {}
    for line, rec in read_input(path):
        raw_id = rec.get("id") if isinstance(rec, dict) else None
        key = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else f"line-{line}"
        if shard_of(key, shards) != shard:
            first_line.setdefault(key, line)
            continue
        reason, row = None, None
        if not isinstance(rec, dict):
            reason = "not a JSON object"
        else:
            try:
                row = InputRow.model_validate(rec)
            except ValidationError as exc:
                reason = "; ".join(format_errors(exc, InputRow))
        if reason is None and key in first_line:
            reason = f"duplicate id '{key}' (first on line {first_line[key]})"
        first_line.setdefault(key, line)
        if reason is not None:
            out.quarantined.append({"line": line, "id": raw_id if key == str(raw_id) else None, "reason": reason,
                                    "row": rec})
        elif key in done:
            out.done += 1
        else:
            out.rows.append(Row(key, row.id if row.id is not None else key, line, row,
                                resolve_sampling(defaults, row.sampling, key)))
    return out


def done_ids(out: Path) -> set[str]:
    """The ids an earlier run wrote to `out`. A torn last line (a run killed mid-write) is cut off the file, so the
    next append starts on a clean line and that row is generated again; a broken line before the last is not what
    this program writes, and stops the run rather than being cut away with everything after it."""
    if not out.is_file():
        return set()
    with open(out, "rb") as f:
        lines = f.readlines()
    ids, good_end = set(), 0
    for n, raw in enumerate(lines, start=1):
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not raw.endswith(b"\n") or not isinstance(rec, dict) or "id" not in rec:
            if n < len(lines):
                raise InputError(f"{out}: line {n} is not an output record, and it is not the last line (a torn "
                                 "write); fix or remove the file")
            with open(out, "r+b") as f:
                f.truncate(good_end)
            break
        ids.add(str(rec["id"]))
        good_end += len(raw)
    return ids
