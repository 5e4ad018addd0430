"""Settings sections: each component gets the part of the configuration it reads, derived from
Settings (declared once), the environment staying flat (MP4T_LLM_MODEL is ``settings.llm.model``)."""
from __future__ import annotations

import dataclasses

import pytest

from mp4totext.config import LLMSettings, S3Settings, Settings, WebhookSettings, from_env, section


@pytest.mark.parametrize("cls, prefix", [(LLMSettings, "llm_"), (S3Settings, "s3_"), (WebhookSettings, "webhook_")])
def test_a_section_holds_every_setting_of_its_prefix_and_nothing_else(cls: type, prefix: str) -> None:
    expected = {f.name[len(prefix):] for f in dataclasses.fields(Settings) if f.name.startswith(prefix)}
    assert {f.name for f in dataclasses.fields(cls)} == expected and expected


def test_sections_read_the_environment_and_are_frozen_and_hashable() -> None:
    s = from_env({"MP4T_LLM_MODEL": "qwen", "MP4T_LLM_TIMEOUT_S": "7.5", "MP4T_S3_BUCKET": "b",
                  "MP4T_WEBHOOK_ALLOW_NETS": "10.0.0.0/8"})
    assert (s.llm.model, s.llm.timeout_s, s.s3.bucket, s.webhook.allow_nets) == ("qwen", 7.5, "b", "10.0.0.0/8")
    assert s.llm.max_attempts == Settings().llm_max_attempts  # defaults come from Settings
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.llm.model = "other"  # type: ignore[misc]
    assert hash(s.llm) == hash(from_env({"MP4T_LLM_MODEL": "qwen", "MP4T_LLM_TIMEOUT_S": "7.5"}).llm)
    llm = s.llm
    assert section(llm, LLMSettings) is llm  # a section passes through


def test_the_store_is_built_from_its_section() -> None:
    from storage.objects import S3Store, make_store

    store = make_store(Settings(storage_backend="s3", s3_endpoint="127.0.0.1:1", s3_bucket="sections"))
    assert isinstance(store, S3Store)
