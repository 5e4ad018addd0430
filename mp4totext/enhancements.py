"""Typed contracts of the AI layer: what a user can ask for, and the documented shapes of what
comes back (validated with these models, published as JSON schemas in docs/schemas/).

An *enhancement* is one AI item of a transcription: a clean-up, a translation into one
language, a summary or lecture notes. It has a state of its own; the transcript it reads is
never changed by it.
"""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mp4totext.contracts import ITEM_TERMINAL_STATES, _Model


class EnhancementKind(enum.StrEnum):
    CLEANUP = "CLEANUP"
    TRANSLATION = "TRANSLATION"
    SUMMARY = "SUMMARY"
    LECTURE_NOTES = "LECTURE_NOTES"


class EnhancementState(enum.StrEnum):
    PENDING = "PENDING"  # waiting for its transcript, or queued
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ITEM_TERMINAL = ITEM_TERMINAL_STATES  # one set: EnhancementState values are these strings

# BCP-47 as clients send it: a language subtag and optional script/region/variant subtags.
BCP47 = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}$")


class EnhancementRequest(_Model):
    """One item a user asked for. ``language`` is the output language (BCP-47); "" = the transcript's."""

    kind: EnhancementKind
    language: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return self.kind.value, self.language.lower()


# ---------------------------------------------------------------- outputs (the documented schemas)


class _Out(BaseModel):
    """Every field required, nothing else allowed: the shape structured outputs enforce."""

    model_config = ConfigDict(extra="forbid")


class ActionItem(_Out):
    description: str = Field(description="What is to be done.")
    owner: str = Field(description="Who does it, when the transcript names someone; else empty.")


class Summary(_Out):
    abstract: str = Field(description="A short abstract of the whole recording: 2-5 sentences.")
    key_points: list[str] = Field(description="The main points, most important first.")
    decisions: list[str] = Field(description="Decisions that were made (meetings); empty when none.")
    action_items: list[ActionItem] = Field(description="Tasks agreed on (meetings); empty when none.")


class OutlineItem(_Out):
    title: str = Field(description="Heading of this part of the lecture.")
    start_s: float = Field(ge=0, description="Where this part starts, in seconds from the beginning (snapped to "
                                             "the start of a segment of the transcript).")
    points: list[str] = Field(description="What this part says, as short bullet points.")


class KeyTerm(_Out):
    term: str
    definition: str


class ReviewQuestion(_Out):
    question: str
    answer: str


class LectureNotes(_Out):
    title: str = Field(description="A title for the lecture.")
    outline: list[OutlineItem] = Field(description="The lecture's parts in order, with where each starts.")
    key_terms: list[KeyTerm] = Field(description="Terms the lecture introduces, with definitions.")
    examples: list[str] = Field(description="Worked examples and formulas, as given in the lecture.")
    review_questions: list[ReviewQuestion] = Field(description="Questions to review the lecture, with answers.")


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of an output model (what docs/schemas/ holds and the LLM is held to)."""
    return model.model_json_schema()


# Keywords OpenAI's strict structured outputs refuse; the answer is still validated against them.
_NOT_STRICT = frozenset({"maxLength", "minLength", "maxItems", "minItems", "minimum", "maximum", "exclusiveMinimum",
                         "exclusiveMaximum", "pattern", "format"})


def strict_schema(schema: Any) -> Any:
    """``schema`` without the keywords strict structured outputs do not take (recursively)."""
    if isinstance(schema, dict):
        return {k: strict_schema(v) for k, v in schema.items() if k not in _NOT_STRICT or not isinstance(v, (int, str))
                or k == "properties"}
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def segment_texts_schema(ids: list[int]) -> dict[str, Any]:
    """Clean-up and translation output for a batch: one string per segment id, exactly those ids."""
    return {"type": "object", "properties": {str(i): {"type": "string"} for i in ids},
            "required": [str(i) for i in ids], "additionalProperties": False}


class TokenUsage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def __add__(self, other: "TokenUsage") -> "TokenUsage":
        return TokenUsage(prompt_tokens=self.prompt_tokens + other.prompt_tokens,
                          completion_tokens=self.completion_tokens + other.completion_tokens,
                          cost=round(self.cost + other.cost, 8))


@dataclasses.dataclass(frozen=True)
class KindSpec:
    """What the product knows of one AI kind; every layer reads it from ``KINDS`` (server validation,
    conversion and export, the worker's item runner). The worker's prompts and the proto
    converters are keyed by kind next to their code; tests/unit/test_registries.py checks that
    every kind has each of them.

    ``segments``: the result is a rewritten transcript (a TranscriptResult: segment formats);
    otherwise a document validated by ``model`` and published as docs/schemas/<schema>.schema.json.
    ``target_language``: "required" (a translation), "forbidden" (a clean-up keeps the transcript's
    language), "optional" (documents: the transcript's language when empty)."""

    kind: EnhancementKind
    segments: bool
    target_language: str
    formats: tuple[str, ...]  # export formats, the first the default
    model: type[BaseModel] | None = None
    schema: str = ""
    expansion: float = 1.3  # answer tokens per input token, at most (segment kinds)

    @property
    def keeps_language(self) -> bool:
        return self.target_language == "forbidden"


_SEGMENT_FORMATS = ("txt", "srt", "vtt", "json", "tsv")
KINDS: dict[EnhancementKind, KindSpec] = {spec.kind: spec for spec in (
    KindSpec(EnhancementKind.CLEANUP, segments=True, target_language="forbidden", formats=_SEGMENT_FORMATS),
    KindSpec(EnhancementKind.TRANSLATION, segments=True, target_language="required", formats=_SEGMENT_FORMATS,
             expansion=2.0),
    KindSpec(EnhancementKind.SUMMARY, segments=False, target_language="optional", formats=("md", "txt", "json"),
             model=Summary, schema="summary"),
    KindSpec(EnhancementKind.LECTURE_NOTES, segments=False, target_language="optional", formats=("md", "json"),
             model=LectureNotes, schema="lecture-notes"),
)}

DOCUMENTED = {spec.schema: spec.model for spec in KINDS.values() if spec.model}  # docs/schemas/<name>.schema.json


def documented_schema(name: str) -> dict[str, Any]:
    """The published JSON schema of an output (``python -m mp4totext.enhancements DIR`` writes them)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://mp4totext.dev/schemas/{name}.schema.json", **schema_of(DOCUMENTED[name])}


if __name__ == "__main__":
    import json
    import pathlib
    import sys

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")
    for doc in DOCUMENTED:
        (out / f"{doc}.schema.json").write_text(json.dumps(documented_schema(doc), indent=2, ensure_ascii=False) + "\n")
