#!/usr/bin/env bash
# Sets up and runs the whole test suite against real services: RabbitMQ (started here if it is
# installed but not running), PostgreSQL on 127.0.0.1:5432, SeaweedFS S3 (started by the tests),
# ffmpeg, espeak-ng and faster-whisper tiny.en.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,diarize

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do port_open 5672 && break; sleep 1; done
  fi
fi
if ! port_open 5432 && command -v pg_ctlcluster >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
# --fast: the fast tier (< 5 min on 2 cores): the unit tests and the main path on the real services
# (an upload -> transcript through RabbitMQ + S3 + PostgreSQL, a speaker run, an AI item on the local
# LLM server). The full suite, without --fast, is the README's test command and what CI runs.
args=()
for a in "$@"; do
  if [ "$a" = --fast ]; then args+=(-m fast); else args+=("$a"); fi
done
# The twenty slowest tests end every run's output: where the suite's time goes is in every CI log.
exec .venv/bin/python -m pytest --durations=20 ${args[@]+"${args[@]}"}
