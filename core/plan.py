"""Which stages a job runs, in what order, on which queue, and the share of progress each covers.

The one place that turns a job's config into its pipeline:

    prepare_media (critical) -> transcribe (high) -> [diarize (diarize)] -> finalize (critical)

A new stage is added here (its ``Stage``, its actor and queue, and when a job runs it) and
declared once in ``workers.actors``.
"""
from __future__ import annotations

from typing import Any, Mapping

from mp4totext.contracts import BROKER_MAX_PRIORITY, JobConfig, Stage

# Queue names and their max priority are fixed: RabbitMQ refuses to redeclare an existing queue
# with another x-max-priority (PRECONDITION_FAILED), so changing them needs a migration.
# "diarize" is a high-priority queue of its own: only workers installed with the diarize extra
# (torch + pyannote.audio) consume it, so servers and transcription workers stay small.
QUEUES = ("critical", "high", "diarize", "default", "low")

# Actor name -> queue. Servers enqueue by name without loading worker code.
ROUTES = {
    "prepare_media": "critical",
    "transcribe": "high",
    "diarize": "diarize",
    "finalize": "critical",
    "enhance": "default",  # AI items (core.enhancements), after the transcript exists
    "maintenance": "low",
    "retention": "low",  # core.retention: expired data, orphans, temp files, VACUUM
    "deliver_webhook": "critical",  # core.webhooks: notifications to the tenants' endpoints
    "usage_report": "low",  # core.usage: the weekly usage report of a tenant
}

# The actor that moves a job on from each stage it can wait or run in (also how the
# maintenance sweep re-enqueues a job whose message was lost).
ACTOR_FOR_STAGE = {
    Stage.WAITING: "transcribe",
    Stage.TRANSCRIBING: "transcribe",
    Stage.DIARIZING: "diarize",
    Stage.FINALIZING: "finalize",
}

STAGE_ORDER = [Stage.PREPARING_MEDIA, Stage.WAITING, Stage.TRANSCRIBING, Stage.DIARIZING, Stage.FINALIZING,
               Stage.DONE]

# Overall percent at the start of each stage; transcribing spans 5..95, or 5..70 when
# speaker recognition (70..95) follows.
STAGE_PERCENT = {Stage.PREPARING_MEDIA: 0.0, Stage.WAITING: 5.0, Stage.TRANSCRIBING: 5.0, Stage.DIARIZING: 70.0,
                 Stage.FINALIZING: 95.0, Stage.DONE: 100.0}


Config = JobConfig | Mapping[str, Any] | None


def wants_speakers(config: Config) -> bool:
    return JobConfig.from_json(config).diarization.enabled


def stages(config: Config) -> list[Stage]:
    """The stages a job with this config goes through, in order."""
    optional = [Stage.DIARIZING] if wants_speakers(config) else []
    return [Stage.PREPARING_MEDIA, Stage.WAITING, Stage.TRANSCRIBING, *optional, Stage.FINALIZING, Stage.DONE]


def next_stage(config: Config, stage: Stage) -> Stage:
    """The stage after ``stage`` for this job (WAITING and TRANSCRIBING are one step)."""
    plan = stages(config)
    if stage == Stage.WAITING:
        stage = Stage.TRANSCRIBING
    return plan[plan.index(stage) + 1]


def is_ahead(stage: str, of: str) -> bool:
    return STAGE_ORDER.index(Stage(stage)) > STAGE_ORDER.index(Stage(of))


def percent_span(config: Config, stage: Stage) -> tuple[float, float]:
    """Overall percent at the start and end of ``stage`` for this job."""
    return STAGE_PERCENT[stage], STAGE_PERCENT[next_stage(config, stage)]


def actor_for(stage: str) -> str:
    return ACTOR_FOR_STAGE.get(Stage(stage), "transcribe")


# Messages that finish work already done go first on their queue: a job whose transcript is
# ready must not wait behind a backlog of new uploads' media preparation on "critical".
FINISHING_ACTORS = frozenset({"finalize"})


def message_priority(actor: str, job_priority: int) -> int:
    """The broker priority of ``actor``'s message for a job of ``job_priority``."""
    return BROKER_MAX_PRIORITY if actor in FINISHING_ACTORS else job_priority
