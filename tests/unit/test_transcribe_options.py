"""A job's options reach faster-whisper: the stage calls the real model with exactly them."""
from __future__ import annotations

from typing import Any

import numpy as np
from faster_whisper import WhisperModel

from mp4totext.contracts import JobConfig
from workers.stages.model_files import locate
from workers.stages.transcribe import TranscribeOptions, transcribe


class RecordingModel(WhisperModel):
    """The real tiny.en model, remembering the arguments of each transcribe call."""

    calls: list[dict[str, Any]]

    def transcribe(self, audio: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append(kwargs)
        return super().transcribe(audio, **kwargs)


def test_options_of_a_job_are_what_the_recognizer_is_called_with() -> None:
    model = RecordingModel(locate("tiny.en", ""), device="cpu", compute_type="int8")
    model.calls = []
    config = JobConfig(language="en", beam_size=2, vad=False, word_timestamps=False, task="transcribe",
                       initial_prompt="A lecture about Dramatiq.", hotwords=["Dramatiq", "RabbitMQ"])
    opts = TranscribeOptions.of(config, default_beam=5)
    result = transcribe(model, np.zeros(16000, dtype=np.float32), opts, model_name="tiny.en")
    (call,) = model.calls
    assert call["language"] == "en" and call["beam_size"] == 2 and call["vad_filter"] is False
    assert call["word_timestamps"] is False and call["task"] == "transcribe"
    assert call["initial_prompt"] == "A lecture about Dramatiq." and call["hotwords"] == "Dramatiq, RabbitMQ"
    assert result.model == "tiny.en" and result.duration == 1.0 and result.task == "transcribe"


def test_unset_options_take_the_server_defaults() -> None:
    opts = TranscribeOptions.of(JobConfig(), default_beam=5)
    assert (opts.language, opts.beam_size, opts.vad_filter, opts.word_timestamps, opts.hotwords) == \
        (None, 5, True, True, ())
