"""Which stages a job runs, in what order, on which queue, and the share of progress each covers.

One registry, ``STAGES`` (a ``StageSpec`` per stage), is the pipeline:

    prepare_media (critical) -> transcribe (high) -> [diarize (diarize)] -> finalize (critical)

and everything else is derived from it: actor routes, the order of stages, the percent span of
each stage for a job's config, the stages recovery re-sends from, the actors' time limits and
the queues that need a worker capability. A new stage (e.g. PII redaction) is one ``StageSpec``
here plus its stage function and actor declaration (docs/architecture.md, "Add a stage").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from mp4totext.config import Settings
from mp4totext.contracts import BROKER_MAX_PRIORITY, JobConfig, Stage

# Queue names and their max priority are fixed: RabbitMQ refuses to redeclare an existing queue
# with another x-max-priority (PRECONDITION_FAILED), so changing them needs a migration.
# "diarize" is a high-priority queue of its own: only workers installed with the diarize extra
# (torch + pyannote.audio) consume it, so servers and transcription workers stay small.
QUEUES = ("critical", "high", "diarize", "default", "low")

Config = JobConfig | Mapping[str, Any] | None


def wants_speakers(config: Config) -> bool:
    return JobConfig.from_json(config).diarization.enabled


def _always(config: Config) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a job. ``weight``: its share of the job's progress in percent; the one stage
    with ``weight=None`` takes what the stages a job skips leave (transcription: 5..95 alone,
    5..70 when speaker recognition follows). ``waits_in``: the stage a job is QUEUED in while
    this stage's message is on its queue (recovery re-sends from there). ``on_media``: the actor
    takes a media id (media preparation), not a job id. ``capability``: what a worker must load
    to consume the queue (workers.main). ``finishing``: its message goes first on its queue."""

    stage: Stage
    actor: str
    queue: str
    time_limit_s: Callable[[Settings], float]
    weight: float | None
    runs: Callable[[Config], bool] = _always
    waits_in: Stage | None = None
    on_media: bool = False
    capability: str = ""
    finishing: bool = False


STAGES: tuple[StageSpec, ...] = (
    StageSpec(Stage.PREPARING_MEDIA, "prepare_media", "critical", lambda s: s.prepare_time_limit_s, 5.0,
              on_media=True),
    StageSpec(Stage.TRANSCRIBING, "transcribe", "high", lambda s: s.job_time_limit_s + 60, None,
              waits_in=Stage.WAITING, capability="transcription"),
    StageSpec(Stage.DIARIZING, "diarize", "diarize", lambda s: s.diarization_time_limit_s + 60, 25.0,
              runs=wants_speakers, waits_in=Stage.DIARIZING, capability="diarization"),
    StageSpec(Stage.FINALIZING, "finalize", "critical", lambda s: 60, 5.0, finishing=True),
)

# Actor name -> queue. Servers enqueue by name without loading worker code. The stages' actors,
# then the work that is not a job stage.
ROUTES = {spec.actor: spec.queue for spec in STAGES} | {
    "enhance": "default",  # AI items (core.enhancements), after the transcript exists
    "maintenance": "low",
    "retention": "low",  # core.retention: expired data, orphans, temp files, VACUUM
    "deliver_webhook": "critical",  # core.webhooks: notifications to the tenants' endpoints
    "usage_report": "low",  # core.usage: the weekly usage report of a tenant
}

def _steps(spec: StageSpec) -> tuple[Stage, ...]:
    """The stages a job is in for ``spec``: the one it waits in for the message, then the stage."""
    return tuple(dict.fromkeys((spec.waits_in or spec.stage, spec.stage)))


# The actor that moves a job on from each stage it can wait or run in (also how the
# maintenance sweep re-enqueues a job whose message was lost).
ACTOR_FOR_STAGE = {stage: spec.actor for spec in STAGES if not spec.on_media for stage in _steps(spec)}

# The stages a QUEUED job waits in for its stage's message (what recovery looks for).
WAITING_STAGES = tuple(dict.fromkeys(spec.waits_in for spec in STAGES if spec.waits_in))

STAGE_ORDER = [s for spec in STAGES for s in _steps(spec)] + [Stage.DONE]


def stages(config: Config) -> list[Stage]:
    """The stages a job with this config goes through, in order."""
    return [s for spec in STAGES if spec.runs(config) for s in _steps(spec)] + [Stage.DONE]


def _starts(config: Config, every: bool = False) -> dict[Stage, float]:
    """Overall percent at the start of each stage of this job (its waiting stage starts with it);
    ``every``: as if every optional stage ran."""
    specs = [spec for spec in STAGES if every or spec.runs(config)]
    fixed = sum(spec.weight for spec in specs if spec.weight is not None)
    at, out = 0.0, {}
    for spec in specs:
        out[spec.stage] = at
        if spec.waits_in:
            out[spec.waits_in] = at
        at += spec.weight if spec.weight is not None else 100.0 - fixed
    out[Stage.DONE] = 100.0
    return out


# Overall percent at the start of each stage when every stage runs: a floor the job's progress
# is raised to as it enters a stage (transcribing starts at 5; finalizing at 95).
STAGE_PERCENT = _starts(None, every=True)


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
    starts = _starts(config)
    return starts[stage], starts[next_stage(config, stage)]


def actor_for(stage: str) -> str:
    return ACTOR_FOR_STAGE.get(Stage(stage), "transcribe")


def time_limits_s(settings: Settings) -> dict[str, float]:
    """Each stage actor's time limit (the worker adds those of the other actors)."""
    return {spec.actor: spec.time_limit_s(settings) for spec in STAGES}


def queues_needing(capability: str) -> set[str]:
    return {spec.queue for spec in STAGES if spec.capability == capability}


# Messages that finish work already done go first on their queue: a job whose transcript is
# ready must not wait behind a backlog of new uploads' media preparation on "critical".
FINISHING_ACTORS = frozenset(spec.actor for spec in STAGES if spec.finishing)


def message_priority(actor: str, job_priority: int) -> int:
    """The broker priority of ``actor``'s message for a job of ``job_priority``."""
    return BROKER_MAX_PRIORITY if actor in FINISHING_ACTORS else job_priority
