#!/usr/bin/env bash
# Sets up and runs mp4totext in embedded mode (gRPC server + workers in one process; SQLite,
# local disk, in-memory queue: no external servers). Default: transcribe a generated sample and exit.
#   bash scripts/run.sh                 # demo
#   bash scripts/run.sh lecture.mp4     # transcribe your file
#   bash scripts/run.sh --serve         # keep serving on 127.0.0.1:50051
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- --demo; fi
exec .venv/bin/mp4totext embedded "$@"
