"""ESamp inside vLLM: a plugin for vLLM's V1 engine (tested: vLLM 0.32, CPU build, V1 model runner).

Install it next to vLLM (``scripts/install_vllm.sh``); vLLM then loads it through its entry points
(:mod:`esamp_pl.vllm.plugin`). A request turns ESamp on with ``esamp_*`` keys in
``SamplingParams.extra_args`` (``vllm_xargs`` on the OpenAI-compatible server); see docs/vllm.md.

Layout: :mod:`options` (request and server settings), :mod:`groups` (the Distiller bank),
:mod:`runtime` (the step, version-independent), :mod:`capture` (hooks into fixed buffers);
the vLLM-version-specific parts are :mod:`v1_runner` and :mod:`mrv2_runner` (the two model
runners of vLLM 0.32; the MRV2 one has never run on CUDA) and :mod:`processor` (both
logits-processor interfaces); :mod:`offline` runs the project's configs through ``vllm.LLM``.
"""

from __future__ import annotations

from typing import Any


def generate_with_vllm(cfg: Any, llm: Any = None) -> dict[str, Any]:
    """``scripts/generate.py engine=vllm``: see :func:`esamp_pl.vllm.offline.generate_with_vllm`."""
    from esamp_pl.vllm.offline import generate_with_vllm as run

    return run(cfg, llm)


def benchmark(cfg: Any, llm: Any = None) -> dict[str, Any]:
    """``scripts/benchmark.py engine=vllm``: see :func:`esamp_pl.vllm.offline.benchmark`."""
    from esamp_pl.vllm.offline import benchmark as run

    return run(cfg, llm)
