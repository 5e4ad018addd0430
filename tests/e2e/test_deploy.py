"""The production stack's files, checked by the real programs that will read them:
Debian's docker-compose (config), promtool (Prometheus config, alert rules, and every
dashboard query as PromQL), HAProxy (-c, in test_haproxy.py)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from typing import Any

import pytest
import yaml

from tests.support import ROOT, need

COMPOSE = ROOT / "docker-compose.yml"
DASHBOARDS = ROOT / "observability" / "grafana" / "dashboards"
PROVISIONING = ROOT / "observability" / "grafana" / "provisioning"


def run(args: list[str], **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    need(shutil.which("docker-compose") is not None, "docker-compose (apt-get install docker-compose)")
    out = run(["docker-compose", "-f", str(COMPOSE), "config"])
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_services_and_policies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("haproxy", "api", "worker-critical", "worker-high", "worker-low", "rabbitmq", "minio",
                 "minio-init", "postgres", "jaeger", "prometheus", "grafana"):
        assert name in services, name
    assert services["api"]["deploy"]["replicas"] >= 2
    queues = {n: s["command"][-1] for n, s in services.items() if n.startswith("worker-") and not s.get("profiles")}
    assert queues == {"worker-critical": "critical", "worker-high": "high", "worker-low": "default,low"}
    assert services["worker-diarize"]["command"][-1] == "diarize"
    assert services["worker-diarize"]["profiles"] == ["diarization"]
    assert services["worker-diarize"]["build"]["args"]["EXTRAS"] == "diarize"
    for name, svc in services.items():
        if name != "minio-init":
            assert svc.get("restart") == "unless-stopped", name
        # replicas must be scalable: no fixed container names or host ports on app services
        if name == "api" or name.startswith("worker-"):
            assert "container_name" not in svc and "ports" not in svc, name
            assert "healthcheck" in svc, name
            env = svc["environment"]
            assert env["MP4T_HTTP_LISTEN"] == "0.0.0.0:9100" and env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    for name in ("postgres", "rabbitmq", "minio"):
        assert "healthcheck" in services[name], name
    assert set(compose["volumes"]) >= {"pgdata", "rabbitdata", "miniodata", "promdata", "grafanadata"}
    assert services["minio"]["environment"]["MINIO_API_STALE_UPLOADS_EXPIRY"]
    assert services["worker-high-gpu"]["profiles"] == ["gpu"]


def test_compose_mounts_exist_and_secrets_are_not_baked(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if src.startswith("/") or src.startswith("."):
                assert (ROOT / src).exists() or __import__("pathlib").Path(src).exists(), f"{name}: {src}"
        build = svc.get("build")
        if build:
            assert (ROOT / build.get("dockerfile", "Dockerfile")).exists(), name
    for dockerfile in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / dockerfile).read_text()
        assert not re.search(r"(PASSWORD|SECRET|ACCESS_KEY)\s*=", text), dockerfile
        for src in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
            assert (ROOT / src).exists(), f"{dockerfile}: COPY {src}"
    # Every ${VAR} the compose file reads is documented in the example env file.
    documented = set(re.findall(r"^([A-Z_]+)=", (ROOT / "deploy" / "example.env").read_text(), flags=re.M))
    used = set(re.findall(r"\$\{([A-Z_]+)(?::?-[^}]*)?\}", COMPOSE.read_text()))
    assert used <= documented, used - documented


def test_rabbitmq_consumer_timeout_exceeds_longest_job() -> None:
    from mp4totext.config import Settings

    conf = (ROOT / "deploy" / "rabbitmq.conf").read_text()
    timeout_ms = int(re.search(r"^consumer_timeout\s*=\s*(\d+)", conf, flags=re.M).group(1))
    s = Settings()
    # The longest single delivery: a transcribe message (its actor's time limit is the job's + 60 s).
    assert timeout_ms > max(s.job_time_limit_s + 60, s.prepare_time_limit_s) * 1000 * 1.25
    assert timeout_ms > s.retry_max_backoff_ms


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    need(path is not None, "promtool (apt-get install prometheus)")
    return str(path)


def test_prometheus_config_and_rules(promtool: str) -> None:
    out = run([promtool, "check", "config", "observability/prometheus/prometheus.yml"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def _dashboards() -> list[dict[str, Any]]:
    files = sorted(DASHBOARDS.glob("*.json"))
    assert files
    return [json.loads(f.read_text()) for f in files]


def _exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_provisioning_and_dashboard_structure() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yml").read_text())["datasources"]
    uids = {d["uid"]: d["type"] for d in sources}
    assert uids == {"prometheus": "prometheus", "jaeger": "jaeger"}
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "dashboards.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for dash in _dashboards():
        assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids))
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        for topic in ("throughput", "latency", "queue depth", "failed", "real-time factor"):
            assert topic in titles, topic
        for p in dash["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
            if p["type"] != "row":
                assert p["datasource"]["uid"] in uids and p["targets"], p["title"]
                for t in p["targets"]:
                    assert t["datasource"]["uid"] in uids and t["refId"]


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Any) -> None:
    """promtool parses every panel query (as recording rules: $__rate_interval -> 5m)."""
    rules = [{"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "5m")}
             for dash in _dashboards() for i, e in enumerate(_exprs(dash))]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)])
    assert out.returncode == 0, out.stdout + out.stderr


def _exported_names() -> set[str]:
    """Sample names our processes can export (all families, with or without samples yet)."""
    from prometheus_client.core import REGISTRY

    from observability import metrics

    names: set[str] = set()
    for fam in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(fam.type, [""])
        names.update(fam.name + s for s in suffixes)
    for cls, args in ((metrics.JobStateCollector, (dict,)), (metrics.QueueDepthCollector, ("amqp://", []))):
        collector = cls(*args)
        collector.cache.value, collector.cache.at = {}, time.monotonic()
        names.update(f.name for f in collector.collect())
    return names


def test_dashboard_and_alerts_use_metrics_we_export() -> None:
    names = _exported_names()
    alerts = (ROOT / "observability" / "prometheus" / "alerts.yml").read_text()
    used = set()
    for text in [*(e for d in _dashboards() for e in _exprs(d)), alerts]:
        used.update(re.findall(r"\b((?:mp4t|grpc_server)_[a-z_]+)", text))
    assert used and used <= names, used - names
