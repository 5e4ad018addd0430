"""The registries the product is extended through: every registered AI kind (KindSpec) and job
stage (StageSpec) has what each layer needs, so adding one and forgetting a layer fails here,
not in a user's request."""
from __future__ import annotations

import json
import pathlib

import pytest

from core import ai_export, export, plan
from mp4totext.config import Settings
from mp4totext.contracts import Stage
from mp4totext.enhancements import KINDS, EnhancementKind, documented_schema
from mp4totext.v1 import transcription_pb2 as tpb
from server import convert
from server.validation import KIND_NAMES
from workers.stages import enhance

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", list(EnhancementKind))
def test_every_ai_kind_is_registered_in_every_layer(kind: EnhancementKind) -> None:
    spec = KINDS[kind]
    assert tpb.EnhancementKind.Value(f"ENHANCEMENT_KIND_{kind}") in KIND_NAMES  # the proto value
    assert convert.KIND[kind.value] == tpb.EnhancementKind.Value(f"ENHANCEMENT_KIND_{kind}")
    assert spec.target_language in ("required", "forbidden", "optional")
    assert spec.formats and set(spec.formats) <= set(export.FORMATS) | {"md"}, spec.formats
    assert ai_export.ITEM_FORMATS[kind] == spec.formats
    if spec.segments:
        assert kind in enhance.SEGMENT_TASKS and spec.model is None
        assert enhance.SEGMENT_TASKS[kind]("tr").strip()
        return
    assert spec.model is not None and kind in enhance.DOCUMENT_TASKS  # the worker's prompt
    field, _ = convert.DOCUMENT_FIELDS[kind]  # the proto converter, and the field it fills
    assert field in tpb.Enhancement.DESCRIPTOR.fields_by_name
    published = ROOT / "docs" / "schemas" / f"{spec.schema}.schema.json"
    assert json.loads(published.read_text()) == documented_schema(spec.schema), \
        f"{published} is stale: python -m mp4totext.enhancements docs/schemas"
    for fmt in spec.formats:  # every format it offers renders (json is the result itself)
        assert fmt == "json" or fmt in ai_export.RENDERERS[kind], (kind, fmt)


def test_every_stage_is_routed_ordered_and_weighted() -> None:
    s = Settings()
    assert len({spec.stage for spec in plan.STAGES}) == len(plan.STAGES)
    assert [spec.weight for spec in plan.STAGES].count(None) == 1  # one stage takes what the others leave
    assert sum(spec.weight or 0 for spec in plan.STAGES) < 100
    for spec in plan.STAGES:
        assert f"TRANSCRIPTION_STAGE_{spec.stage}" in tpb.TranscriptionStage.keys()
        assert plan.ROUTES[spec.actor] == spec.queue and spec.queue in plan.QUEUES
        assert spec.time_limit_s(s) > 0
        assert plan.STAGE_ORDER.index(spec.stage) < plan.STAGE_ORDER.index(Stage.DONE)
    for stage in plan.WAITING_STAGES:  # recovery re-sends these: each has an actor that takes a job id
        assert plan.ACTOR_FOR_STAGE[stage] in plan.ROUTES
    assert plan.queues_needing("diarization") == {"diarize"}


@pytest.mark.parametrize("config", [{}, {"diarization": {"enabled": True}}])
def test_every_job_plan_spans_zero_to_a_hundred_percent(config: dict) -> None:
    """Whatever stages a config skips, the job's progress still runs 0..100 without a gap."""
    stages = plan.stages(config)
    assert stages[0] == Stage.PREPARING_MEDIA and stages[-1] == Stage.DONE
    end = 0.0
    for stage in stages[:-1]:
        if stage == Stage.WAITING:
            continue
        start, stop = plan.percent_span(config, stage)
        assert start == end and stop > start, (stage, start, stop)
        end = stop
    assert end == 100.0
