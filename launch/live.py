"""Live captions' wiring: the server replica decodes (server.live_service), with the stage's decoder."""
from __future__ import annotations

from typing import Any

from mp4totext import config


def decoders(s: config.Settings) -> Any:
    """Live captions decode in the server replica (server.live_service): the stage's decoder
    factory, or None where MP4T_LIVE_MAX_STREAMS=0 (no model is ever loaded then)."""
    if s.live_max_streams <= 0:
        return None
    from workers.stages import live

    return live.factory(s)
