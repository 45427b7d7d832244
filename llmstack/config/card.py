"""The recipe's optional `card:` block: what the model card says that no run can measure — what the model is for,
what it is not for, and what its makers know it gets wrong. Everything else on the card (data, training, evaluation,
release decision) comes from the run itself (llmstack/registry/card.py)."""

from __future__ import annotations

from pydantic import Field

from llmstack.config.base import Strict


class CardSpec(Strict):
    intended_use: str | None = Field(
        None, description="who the model is for and what it should be used for (the card's 'Intended use')")
    out_of_scope: str | None = Field(
        None, description="uses the model is not meant or not fit for (the card's 'Out-of-scope use')")
    limitations: list[str] = Field(
        default_factory=list, description="known limitations and risks, one per item (the card's 'Known limitations')")
    license: str | None = Field(
        None, description="the tuned model's licence as an SPDX id or Hub licence name (default: the base model's "
                          "licence where it is recorded)")
    language: list[str] = Field(
        default_factory=list, description="languages the model is meant for, as ISO 639-1 codes, e.g. [en]")
    tags: list[str] = Field(default_factory=list, description="extra Hub tags for the card's metadata")
