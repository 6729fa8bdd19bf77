#!/usr/bin/env bash
# The GPU check of issue 13, in one call of at most 10 minutes on an H200 machine (no network, no model weights).
#
#   bash scripts/gpu_check.sh --fetch-wheels      # here, with network: the wheels the GPU machine lacks, into .whl/
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --dry-run OUT   # here, on the CPU: every step below, on a
#                                                 # tiny random Qwen2 (PYTHON: a Python with torch; default python3)
#   bash scripts/gpu_check.sh OUT                 # there: writes logs, JSON and summary.txt into OUT
#
# Through this workplace's device tool: run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"], timeout_s=600)
# from the checkout the session was started in, after --fetch-wheels there (.whl/ is gitignored; 15 MiB).
#
# Steps: versions of the machine; install from .whl/ what it lacks (hydra-core, omegaconf, antlr4, gguf, datasets,
# dill, multiprocess; transformers when its version differs from the one tested here); a short benchmark on a tiny
# model (catches a failing CUDA-graph capture in seconds); `pytest -m cuda`; then
# `scripts/benchmark.py --config-name benchmark_gpu` on random weights of Qwen2.5-7B's shape in bf16 (8 prompts x
# 16 samples x 256 tokens, EOS ignored: ESamp off / on with CUDA graphs and the side-stream update / on without
# graphs / HF generate). A failing step is logged and the next still runs; the summary lists every step's exit
# status and the script exits non-zero if any failed. OUT holds at most 8 files (what the device tool brings back).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$REPO/.whl"
FETCH_PYTHON="${PYTHON:-}"  # --fetch-wheels reads the versions of this checkout's .venv unless PYTHON names another
PYTHON="${PYTHON:-python3}"
MODULES=(hydra omegaconf antlr4 gguf datasets dill multiprocess)
PACKAGES=(hydra-core omegaconf antlr4-python3-runtime gguf datasets dill multiprocess transformers)
WHEEL_BUDGET_MB=60  # the device tool carries at most 64 MiB, the repository included

usage() { sed -n '2,7p' "$0" >&2; exit 2; }

fetch_wheels() {
  # The versions this machine's tests ran with, as wheels for the GPU machine's Python (3.12, x86-64).
  mkdir -p "$WHEELS"
  local pins=() pkg version py="$FETCH_PYTHON"
  if [[ -z "$py" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then py="$REPO/.venv/bin/python"; else py=python3; fi
  fi
  for pkg in "${PACKAGES[@]}"; do
    version="$("$py" -c "import importlib.metadata as m; print(m.version('$pkg'))")" || {
      echo "FAIL: $py has no $pkg: run scripts/install.sh first, or set PYTHON to the Python the tests ran with" >&2
      exit 1; }
    pins+=("$pkg==$version")
  done
  echo "pins: ${pins[*]}"
  local binary=() source_only=()
  for pin in "${pins[@]}"; do
    if [[ "$pin" == antlr4-python3-runtime==* ]]; then source_only+=("$pin"); else binary+=("$pin"); fi
  done
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${binary[@]}"
  "$py" -m pip wheel -q --no-deps -w "$WHEELS" "${source_only[@]}"  # antlr4 4.9.3 ships no wheel; pure Python
  ls -l "$WHEELS"
  local total_mb
  total_mb=$(du -sm "$WHEELS" | cut -f1)
  echo "wheels: ${total_mb} MiB (budget ${WHEEL_BUDGET_MB})"
  (( total_mb <= WHEEL_BUDGET_MB )) || { echo "FAIL: .whl/ is over ${WHEEL_BUDGET_MB} MiB" >&2; exit 1; }
}

[[ $# -ge 1 ]] || usage
DRY_RUN=0
case "$1" in
  --fetch-wheels) fetch_wheels; exit 0 ;;
  --dry-run) DRY_RUN=1; shift ;;
  -h|--help) usage ;;
esac
[[ $# -eq 1 ]] || usage
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"  # hydra run folders, the installed wheels: outside OUT
SITE="$WORK/site"
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$REPO"
: >"$SUMMARY"
FAILED=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND (a program: under a timeout; a function here: as is) with its output
# in OUT/NAME.log, records its exit status, goes on.
step() {
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS rc=0
  local limit_note="limit ${limit}s"
  declare -F "$1" >/dev/null && limit_note="a function of this script, no time limit"
  echo "== $name ($limit_note): $*" | tee -a "$SUMMARY"
  # In the background, so that `set -e` holds inside a step function (it is off in an `||` context).
  if declare -F "$1" >/dev/null; then
    "$@" >"$OUT/$name.log" 2>&1 &
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 &
  fi
  wait $! || rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
  if (( rc != 0 )); then FAILED=$((FAILED + 1)); fi
  return 0
}

environment() {
  date -u
  uname -a
  nvidia-smi || echo "no nvidia-smi"
  "$PYTHON" - <<'PY'
import importlib.metadata as m, sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.mem_get_info(0))
for name in ("transformers", "tokenizers", "huggingface-hub", "safetensors", "lightning", "numpy", "pytest",
             "matplotlib", "hydra-core", "omegaconf", "gguf", "datasets"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
PY
}

install() {
  # What the machine lacks (everything, in a dry run, so that the install itself is rehearsed), from .whl/ only.
  local wanted=() module tested have
  for module in "${MODULES[@]}"; do
    if (( DRY_RUN )) || ! "$PYTHON" -c "import $module" 2>/dev/null; then wanted+=("$module"); fi
  done
  tested="$(ls "$WHEELS"/transformers-*.whl | sed 's/.*transformers-\([^-]*\)-.*/\1/')"
  have="$("$PYTHON" -c 'import transformers; print(transformers.__version__)' 2>/dev/null || echo none)"
  if (( DRY_RUN )) || [[ "$have" != "$tested" ]]; then wanted+=(transformers); fi
  echo "have transformers $have, tested $tested; installing: ${wanted[*]:-nothing}"
  (( ${#wanted[@]} )) || return 0
  local files=() prefix
  for module in "${wanted[@]}"; do
    case "$module" in hydra) prefix=hydra_core ;; antlr4) prefix=antlr4_python3_runtime ;; *) prefix=$module ;; esac
    files+=("$(ls "$WHEELS"/"$prefix"-*.whl)")  # fails (and says so) when the wheel was not fetched
  done
  local cross=()
  (( DRY_RUN )) && cross=(--python-version 3.12 --implementation cp --only-binary=:all:)  # the GPU machine's Python
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${cross[@]}" "${files[@]}"
  ls "$SITE"
}

install_and_check() {
  install
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  check_imports
}

check_imports() {
  "$PYTHON" -c "
import hydra, omegaconf, gguf, datasets, transformers, esamp_pl
from esamp_pl import benchmark, static_engine
print('esamp_pl from', esamp_pl.__file__, '| transformers', transformers.__version__, '| hydra', hydra.__version__)
"
}

if (( DRY_RUN )); then
  DEVICE=(device=cpu threads=1)
  SHAPE=tiny-qwen2
  BENCH=(num_prompts=2 n=4 max_new_tokens=16 rounds=2 hf_rounds=1)
else
  DEVICE=()
  SHAPE=qwen2.5-7b
  BENCH=()
fi
HYDRA=(hydra.output_subdir=null hydra.job.chdir=false)

step environment 0 environment
step install 0 install_and_check
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
step smoke 90 "$PYTHON" scripts/benchmark.py --config-name benchmark_gpu benchmark_shape=tiny-qwen2 "${DEVICE[@]}" \
  num_prompts=2 n=4 max_new_tokens=16 rounds=1 hf_rounds=1 warmup=1 "hydra.run.dir=$WORK/smoke" "${HYDRA[@]}"
step pytest_cuda 120 "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider tests
step benchmark_gpu 300 "$PYTHON" scripts/benchmark.py --config-name benchmark_gpu "benchmark_shape=$SHAPE" \
  "${DEVICE[@]}" "${BENCH[@]}" "hydra.run.dir=$WORK/benchmark" "${HYDRA[@]}"

{
  echo "-- summary ($( ((DRY_RUN)) && echo "dry run on the CPU" || echo "GPU run" ), $(date -u))"
  echo "pytest -m cuda: $(grep -E "passed|failed|skipped|deselected|error|no tests ran" "$OUT/pytest_cuda.log" |
                          tail -n 1 || echo "no result line")"
  for name in smoke benchmark_gpu; do  # the last line of each is the benchmark's JSON summary
    if tail -n 1 "$OUT/$name.log" | grep -q '^{'; then
      [[ $name == benchmark_gpu ]] && tail -n 1 "$OUT/$name.log" >"$OUT/$name.json"
      # On the GPU, a run whose ESamp-on mode fell back to eager or made no update counts as a failure.
      tail -n 1 "$OUT/$name.log" | "$PYTHON" -c "
import json, sys
s = json.loads(sys.stdin.read())
print(sys.argv[1], {k: s.get(k) for k in ('esamp_on_off_ratio', 'esamp_on_off_ratio_paired', 'cpu_time_ratio',
      'graphs_ratio', 'engine_hf_ratio', 'updates', 'extras_share', 'paths', 'model', 'dtype', 'rows')})
problems = [] if s['updates'] > 0 else ['no Distiller update performed']
if sys.argv[2] == '0' and not s['paths']['on'].startswith('static, cuda graphs'):
    problems.append('ESamp on ran without CUDA graphs: ' + s['paths']['on'])
for p in problems:
    print('FAIL:', sys.argv[1], p)
sys.exit(1 if problems else 0)
" "$name" "$DRY_RUN" || echo "checks failed: $name"
    else
      echo "$name: no JSON line (see $name.log)"
    fi
  done
  echo "failed steps: $FAILED"
} | tee -a "$SUMMARY"
if grep -q "^checks failed" "$SUMMARY"; then FAILED=$((FAILED + 1)); fi
rm -rf "$WORK"
(( FAILED == 0 ))
