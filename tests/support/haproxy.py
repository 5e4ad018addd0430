"""The committed haproxy/haproxy.cfg with static servers instead of its DNS server-template."""
from __future__ import annotations

import re

from tests.support.common import ROOT


def haproxy_config(servers: list[tuple[str, int, int, int]]) -> str:
    """``servers``: (name, gRPC port, HTTP check port, agent port) for each server line."""
    text = (ROOT / "haproxy" / "haproxy.cfg").read_text()
    lines = "\n".join(f"    server {name} 127.0.0.1:{port} check port {http} agent-port {agent}"
                      for name, port, http, agent in servers)
    new, n = re.subn(r"^\s*server-template .*$", lines, text, flags=re.M)
    assert n == 1, "haproxy.cfg must have exactly one server-template line"
    return new
