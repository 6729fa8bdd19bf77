"""vLLM-version-specific: the V1 model runner (``vllm.v1.worker.gpu_model_runner``).

Tested on vLLM 0.32 (its CPU build falls back to this runner: "Model Runner V2 requires Triton").
Everything the plugin needs from the runner goes through :class:`RunnerView`, so a vLLM release
that changes the runner changes this file only:

* after the runner loads its model, :func:`install` attaches the capture hooks
  (:class:`~esamp_pl.vllm.capture.VllmStateCapture`) and the per-process ESamp runtime;
* per step: the request id of each batch row (``input_batch.req_ids``), the flattened token row
  whose logits the row's sample is drawn from (``query_start_loc[i + 1] - 1``, as the runner's
  own ``logits_indices`` without speculative decoding) and the number of tokens the row ran;
* whether a request still exists (finished requests leave ``runner.requests``; preempted ones stay).

Model Runner V2 (vLLM's default on CUDA) keeps its batch state elsewhere: its adapter is
:mod:`esamp_pl.vllm.mrv2_runner` (never run on CUDA); ``VLLM_USE_V2_MODEL_RUNNER=0`` selects this runner.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

from esamp_pl.vllm.capture import VllmStateCapture
from esamp_pl.vllm.runner_view import RunnerViewBase

log = logging.getLogger(__name__)

CHILD_REQUEST = re.compile(r"^(\d+)_(.+)$")
"vLLM names sample k of an n-request '<k>_<parent id>' (vllm/v1/engine/parallel_sampling.py)"

_BINDING: "RunnerBinding | None" = None


def parse_child_id(request_id: str) -> tuple[str, int | None]:
    """(group key, sample index) of a request id; a request of its own is a group of one."""
    match = CHILD_REQUEST.match(request_id)
    if match is None:
        return request_id, None
    return match.group(2), int(match.group(1))


class RunnerView(RunnerViewBase):
    """What the plugin reads from a V1 ``GPUModelRunner`` (or its CPU subclass)."""

    def request_ids(self, rows: int) -> list[str]:
        return self.runner.input_batch.req_ids[:rows]

    def token_rows(self, rows: int) -> tuple[list[int], list[int]]:
        """Per batch row: the flattened token row its logits come from, and how many tokens it ran."""
        starts = self.runner.query_start_loc.np[:rows + 1]
        ends = starts[1:]
        return (ends - 1).tolist(), (ends - starts[:-1]).tolist()

    def request_exists(self, request_id: str) -> bool:
        return request_id in self.runner.requests


@dataclass
class RunnerBinding:
    """The runner of this worker process, its capture hooks and its ESamp runtime."""

    view: RunnerView
    capture: VllmStateCapture
    runtime: Any  # esamp_pl.vllm.runtime.ESampRuntime (imported lazily with torch-heavy parts)


def binding() -> RunnerBinding | None:
    """The binding of this process's model runner, once its model is loaded."""
    return _BINDING


def _attach(runner: Any) -> None:
    global _BINDING
    from esamp_pl.vllm.build import build_runtime  # lazily: needs the loaded model

    view = RunnerView(runner)
    if _BINDING is not None and _BINDING.view.runner is runner:
        return
    if _BINDING is not None:
        _BINDING.capture.remove()
    capture, runtime = build_runtime(view)
    _BINDING = RunnerBinding(view=view, capture=capture, runtime=runtime)
    log.info("esamp_pl: ESamp plugin attached to %s", type(runner).__name__)


def _wrap_load_model(cls: type) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_esamp_wrapped", False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _attach(self)
        return result

    load_model._esamp_wrapped = True
    cls.load_model = load_model


def install() -> None:
    """Attach ESamp to every V1 model runner this process creates (idempotent)."""
    from vllm.v1.worker import gpu_model_runner

    _wrap_load_model(gpu_model_runner.GPUModelRunner)
    try:
        from vllm.v1.worker import cpu_model_runner
    except Exception:  # pragma: no cover - builds without the CPU runner
        return
    _wrap_load_model(cpu_model_runner.CPUModelRunner)
