"""Summaries and lecture notes as Markdown, plain text or JSON (pure functions).

Clean-ups and translations are transcripts (same segments, new text): core.export renders them.
"""
from __future__ import annotations

import json
from typing import Any

from typing import Callable

from mp4totext.enhancements import KINDS, EnhancementKind, LectureNotes, Summary

# kind -> formats it exports to (core.export.FORMATS names, plus "md")
ITEM_FORMATS = {kind: spec.formats for kind, spec in KINDS.items()}
MARKDOWN = ("text/markdown; charset=utf-8", "md")


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def _list(items: list[str]) -> list[str]:
    return [f"- {x}" for x in items if x.strip()]


def summary_markdown(summary: Summary, title: str = "Summary") -> str:
    out = [f"# {title}", "", summary.abstract.strip(), ""]
    if summary.key_points:
        out += ["## Key points", "", *_list(summary.key_points), ""]
    if summary.decisions:
        out += ["## Decisions", "", *_list(summary.decisions), ""]
    if summary.action_items:
        out += ["## Action items", ""]
        out += [f"- [ ] {a.description}" + (f" (owner: {a.owner})" if a.owner.strip() else "")
                for a in summary.action_items]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def summary_text(summary: Summary) -> str:
    out = [summary.abstract.strip(), ""]
    for heading, items in (("Key points", summary.key_points), ("Decisions", summary.decisions)):
        if items:
            out += [f"{heading}:", *[f"  * {x}" for x in items], ""]
    if summary.action_items:
        out += ["Action items:", *[f"  * {a.description}" + (f" ({a.owner})" if a.owner.strip() else "")
                                   for a in summary.action_items], ""]
    return "\n".join(out).rstrip() + "\n"


def notes_markdown(notes: LectureNotes) -> str:
    out = [f"# {notes.title.strip() or 'Lecture notes'}", ""]
    if notes.outline:
        out += ["## Outline", ""]
        for part in notes.outline:
            out += [f"### [{_clock(part.start_s)}] {part.title.strip()}", "", *_list(part.points), ""]
    if notes.key_terms:
        out += ["## Key terms", "", *[f"- **{t.term.strip()}**: {t.definition.strip()}" for t in notes.key_terms], ""]
    if notes.examples:
        out += ["## Examples and formulas", "", *_list(notes.examples), ""]
    if notes.review_questions:
        out += ["## Review questions", ""]
        for i, q in enumerate(notes.review_questions, 1):
            out += [f"{i}. {q.question.strip()}", "", f"   *Answer:* {q.answer.strip()}", ""]
    return "\n".join(out).rstrip() + "\n"


# document kind -> format -> renderer of its validated model ("json" is the result itself, for every kind)
RENDERERS: dict[EnhancementKind, dict[str, Callable[[Any], str]]] = {
    EnhancementKind.SUMMARY: {"md": summary_markdown, "txt": summary_text},
    EnhancementKind.LECTURE_NOTES: {"md": notes_markdown},
}


def document(kind: EnhancementKind, fmt: str, result: dict[str, Any]) -> str:
    """A document item (summary, lecture notes) in ``fmt`` (one of its ``KindSpec.formats``)."""
    if fmt == "json":
        return json.dumps(result, ensure_ascii=False, indent=2) + "\n"
    model = KINDS[kind].model
    assert model is not None, f"{kind} is not a document kind"
    return RENDERERS[kind][fmt](model.model_validate(result))
