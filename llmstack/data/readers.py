"""The readers and writer of curation's two datatrove passes: pass 1 reads the sources into canonical rows
(SourceReader), pass 2 reads pass 1's per-task outputs back in source order (OrderedReader); every pass writes JSONL
through `jsonl_writer`.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers import JsonlWriter

from llmstack.config.data import DatasetSpec
from llmstack.data.formats import BadRow, flat_text, to_row
from llmstack.data.sources import BadRecord, FetchedSource, iter_records
from llmstack.data.teacher import REJECTED, rejected


def _as_json(writer, doc: Document) -> dict:
    """What datatrove's default adapter writes, without its `dataclasses.asdict`: that deep-copies every row and
    signature just to serialise them (~0.4 ms of CPU per row and write here). Our documents carry no media."""
    if doc.media:
        return writer._default_adapter(doc)
    return {k: v for k, v in (("text", doc.text), ("id", doc.id), ("metadata", doc.metadata)) if v}


def jsonl_writer(folder: Path) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=_as_json)


# ---------------------------------------------------------------- pass 1 reader


class SourceReader(PipelineStep):
    """Raw records -> Documents holding a canonical row. Bad records go to quarantine/read with a reason, teacher
    samples the verifier rejected to quarantine/verifier; a kept teacher sample's `metadata` (teacher, prompt id,
    sampling, verdict) rides along as the document's `provenance`."""

    type = "📖 - READER"
    name = "sources"

    def __init__(self, fetched: list[FetchedSource], spec: DatasetSpec, quarantine: Path, counts: Path):
        super().__init__()
        self.fetched, self.spec, self.quarantine, self.counts = fetched, spec, quarantine, counts

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        order = -1
        per_source: Counter = Counter()
        with jsonl_writer(self.quarantine) as bad, jsonl_writer(self.quarantine.parent / "verifier") as unverified:
            for src in self.fetched:
                single = len(src.files) == 1
                base = order + 1
                mine = lambda i, base=base: (base + i) % world_size == rank  # noqa: E731
                for label, row_no, rec in iter_records(src, self.spec.filters.max_chars, want=mine):
                    order += 1
                    if order % world_size != rank:
                        continue
                    per_source[src.spec.name] += 1
                    doc_id = f"{src.spec.name}#{row_no}" if single else f"{src.spec.name}/{Path(label).name}#{row_no}"
                    meta = {"source": src.spec.name, "order": order}
                    if isinstance(rec, BadRecord):
                        bad.write(Document(text=rec.raw, id=doc_id, metadata={**meta, "filter_reason": rec.reason}),
                                  rank)
                        continue
                    if src.spec.teacher and rejected(rec):
                        unverified.write(Document(text=json.dumps(rec, ensure_ascii=False), id=doc_id, metadata={
                            **meta, "filter_reason": REJECTED}), rank)
                        continue
                    if src.spec.teacher and isinstance(rec.get("metadata"), dict):
                        meta["provenance"] = rec["metadata"]
                    try:
                        row = to_row(rec, src.spec.format, self.spec.schema_, self.spec.placeholders,
                                     src.spec.text_field)
                    except BadRow as exc:
                        raw = json.dumps(rec, ensure_ascii=False, default=str)
                        bad.write(Document(text=raw, id=doc_id, metadata={**meta, "filter_reason": str(exc)}), rank)
                        continue
                    self.stat_update("rows")
                    yield Document(text=flat_text(row), id=doc_id, metadata={**meta, "row": row})
        self.counts.mkdir(parents=True, exist_ok=True)
        (self.counts / f"{rank}.json").write_text(json.dumps(dict(per_source)))


# ---------------------------------------------------------------- pass 2 reader


def read_jsonl(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jsonl"), key=lambda p: int(p.stem))


def iter_docs(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            yield json.loads(line)


class OrderedReader(PipelineStep):
    """Pass 1's per-task outputs merged back into source order (each is sorted; heapq.merge streams them)."""

    type = "📖 - READER"
    name = "ordered merge"

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = folder

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        streams = [iter_docs(p) for p in read_jsonl(self.folder)]
        for d in heapq.merge(*streams, key=lambda d: d["metadata"]["order"]):
            yield Document(text=d["text"], id=d["id"], metadata=d["metadata"])
