"""Typed contracts shared by the server, the workers, the exports and the database.

- States and stages of media and transcriptions (string enums: their values are what the
  database stores and what the protos name, ``TRANSCRIPTION_STATE_<value>``).
- Claim outcomes of the job state machine.
- The one priority mapping: API ``Priority`` <-> RabbitMQ ``broker_priority``.
- The transcription result, as stored (JSON) and as read by exports and the API.
- The progress event, as published on the progress bus and sent by Watch.
"""
from __future__ import annotations

import datetime as dt
import enum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field


class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class Stage(enum.StrEnum):
    """Where a transcription is in its pipeline (see core.plan for the order of a job)."""

    PREPARING_MEDIA = "PREPARING_MEDIA"
    WAITING = "WAITING"
    TRANSCRIBING = "TRANSCRIBING"
    DIARIZING = "DIARIZING"
    FINALIZING = "FINALIZING"
    DONE = "DONE"


class MediaState(enum.StrEnum):
    PROCESSING = "PROCESSING"
    READY = "READY"
    FAILED = "FAILED"


class ClaimOutcome(enum.Enum):
    """What claiming a stage for a message found."""

    RUN = "run"  # claimed: do the work
    SKIP = "skip"  # another live message holds it, or it is behind: drop this duplicate
    PAST = "past"  # the stage is already done (redelivery after a crash): make sure the next one runs
    DONE = "done"  # terminal or deleted: nothing to do
    EXHAUSTED = "exhausted"  # attempted too often (a required stage has failed the job)
    CANCELLED = "cancelled"  # cancellation was pending: the claim ended the job CANCELLED


class Priority(enum.IntEnum):
    """The API's Priority enum values (protos: mp4totext.v1.Priority)."""

    UNSPECIFIED = 0
    LOW = 1
    NORMAL = 2
    HIGH = 3
    URGENT = 4


BROKER_MAX_PRIORITY = 10
# API priority -> RabbitMQ broker_priority within a queue (UNSPECIFIED means NORMAL).
_BROKER_PRIORITY = {Priority.UNSPECIFIED: 5, Priority.LOW: 2, Priority.NORMAL: 5, Priority.HIGH: 7,
                    Priority.URGENT: 10}
_FROM_BROKER = {b: p for p, b in _BROKER_PRIORITY.items() if p != Priority.UNSPECIFIED}


def broker_priority(priority: int) -> int:
    """RabbitMQ priority of an API priority; raises ValueError for an unknown one."""
    return _BROKER_PRIORITY[Priority(priority)]


def api_priority(broker: int) -> Priority:
    """API priority of a stored broker priority (unknown values read as NORMAL)."""
    return _FROM_BROKER.get(broker, Priority.NORMAL)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def to_json(self) -> dict[str, Any]:
        """The JSON-able form stored in the database (unset optional values left out)."""
        return self.model_dump(mode="json", exclude_none=True)

    @classmethod
    def from_json(cls, data: Any) -> Self:
        """An instance from its stored form (``None`` or ``{}``: the defaults); instances pass through."""
        return data if isinstance(data, cls) else cls.model_validate(data or {})


# ---------------------------------------------------------------- a job's options


class KnownSpeakerRef(_Model):
    """A named reference voice: a stretch of one of the tenant's (READY) media."""

    name: str
    media_id: str
    start_s: float = 0.0
    end_s: float | None = None  # None = the media's end (at most MAX_REFERENCE_S after start_s)


class DiarizationOptions(_Model):
    enabled: bool = False
    min_speakers: int | None = None
    max_speakers: int | None = None
    known_speakers: list[KnownSpeakerRef] = Field(default_factory=list)


class JobConfig(_Model):
    """A transcription's validated options, as stored on the job (JSON) and read by its stages."""

    language_code: str = ""  # as the client sent it (BCP-47 or "auto")
    language: str | None = None  # the Whisper language, None = detect
    beam_size: int | None = None  # None = the server's default
    vad: bool = True
    word_timestamps: bool = True
    task: str = "transcribe"  # or "translate" (to English)
    initial_prompt: str | None = None
    hotwords: list[str] = Field(default_factory=list)
    model: str | None = None  # a model of the deployment's set; None = route by language
    expected_languages: list[str] = Field(default_factory=list)  # Whisper languages detection may choose
    diarization: DiarizationOptions = Field(default_factory=DiarizationOptions)
    ai: list[dict[str, str]] = Field(default_factory=list)  # AI items asked at creation: {"kind", "language"}


# ---------------------------------------------------------------- the transcription result


class Word(_Model):
    word: str
    start: float
    end: float
    probability: float = 0.0
    speaker: str | None = None


class Segment(_Model):
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    words: list[Word] = Field(default_factory=list)
    speaker: str | None = None
    language: str = ""  # the language this segment was recognised in


class LanguageShare(_Model):
    """One language of the speech: how much of it, and how sure detection was."""

    language: str
    duration: float = 0.0  # seconds of audio recognised in this language
    probability: float = 0.0  # detection probability, averaged over its windows by duration


class SpeakerSummary(_Model):
    label: str
    speaking_s: float = 0.0
    words: int = 0
    identified: bool = False  # label is a known speaker's name (DiarizationOptions.known_speakers)
    similarity: float | None = None  # cosine similarity to that known speaker's reference


class DiarizationState(enum.StrEnum):
    NOT_REQUESTED = "NOT_REQUESTED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class DiarizationInfo(_Model):
    state: DiarizationState = DiarizationState.NOT_REQUESTED
    error_message: str = ""
    pipeline: str = ""
    processing_s: float | None = None
    turns: int = 0


class TranscriptResult(_Model):
    """What a transcription produced. Stored as JSON on the job; stages return new copies."""

    text: str = ""
    language: str = ""
    language_probability: float = 0.0
    duration: float = 0.0
    speech_duration: float = 0.0
    segments: list[Segment] = Field(default_factory=list)
    model: str = ""  # the model that ran ("base+tiny.en" when parts of the audio ran on each)
    task: str = "transcribe"
    recognition_s: float = 0.0
    language_uncertain: bool = False  # detection's probability was below the configured minimum
    languages: list[LanguageShare] = Field(default_factory=list)  # most spoken first
    speakers: list[SpeakerSummary] = Field(default_factory=list)
    speaker_count: int = 0
    diarization: DiarizationInfo = Field(default_factory=DiarizationInfo)


    def without_speakers(self, error: str) -> "TranscriptResult":
        """This result, marked: speaker recognition failed for good (the transcript stays)."""
        return self.model_copy(update={"diarization": DiarizationInfo(state=DiarizationState.FAILED,
                                                                       error_message=error)})


# ---------------------------------------------------------------- progress


ITEM_TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


class ItemStatus(_Model):
    """Where one AI item of a job is (mp4totext.enhancements), as Watch reports it."""

    id: str
    kind: str
    language: str = ""
    state: str = "PENDING"
    chunks_done: int = 0
    chunks_total: int = 0
    error_message: str = ""


class ProgressEvent(_Model):
    """A job's state as the progress bus carries it and Watch sends it. A job with AI items goes
    on after its own terminal state until each item has ended."""

    id: str
    sequence: int
    state: JobState
    stage: Stage
    progress: float = 0.0
    processed_s: float | None = None
    duration_s: float | None = None
    error_message: str = ""
    attempts: int = 0
    heartbeat: bool = False
    time: dt.datetime | None = None
    items: list[ItemStatus] = Field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES and all(i.state in ITEM_TERMINAL_STATES for i in self.items)


class DeletedEvent(_Model):
    """Published when a job is deleted: its watchers end with NOT_FOUND."""

    id: str
    sequence: int
    deleted: bool = True


def parse_event(data: dict[str, Any]) -> ProgressEvent | DeletedEvent:
    return DeletedEvent.model_validate(data) if data.get("deleted") else ProgressEvent.model_validate(data)
