"""vLLM-version-specific: Model Runner V2 (``vllm/v1/worker/gpu/model_runner.py``, vLLM 0.32's default on CUDA).

NEVER RUN ON CUDA: written against vLLM 0.32's source and tested on the CPU machine only, with MRV2's
own ``InputBatch`` / ``LogitsContext`` classes and faithful fakes of the runner attributes read here
(MRV2 refuses to start without Triton, so it cannot run on the CPU build). See docs/vllm.md.

What MRV2 gives the plugin, and where (vLLM 0.32):

* its sampler runs custom logits processors of its own interface
  (``vllm/v1/worker/gpu/sample/logits_processor/interface.py``) after bias, penalties and bad words and
  before temperature, min-p and top-k/top-p (``Sampler.apply_sampling_params`` in ``sample/sampler.py``),
  so the V1 trick carries over: :class:`esamp_pl.vllm.processor.ESampLogitsProcessor` turns an ESamp row
  into its drawn token alone; requests are known by their persistent slot (``add_request(req_idx, ...)``);
* the batch being sampled is ``GPUModelRunner.sample(hidden_states, input_batch, grammar_output)``'s
  ``input_batch`` (``vllm/v1/worker/gpu/input_batch.py``); the runner clears ``execute_model_state``
  before it samples, so :func:`install` wraps ``sample`` to hold the batch for the processor:
  batch position ``i`` is request ``req_ids[i]`` in slot ``idx_mapping_np[i]``, it is a decode row when
  ``is_prefilling_np[i]`` is false and it ran one token (``num_scheduled_tokens[i] == 1``), and its
  logits row ``cu_num_logits_np[i]`` was computed from token row ``logits_indices[...]`` of the
  forward, which is also the row of the capture buffers (indexed on the device: no host sync);
* requests finish in ``finish_requests(scheduler_output)``, which also drops *preempted* requests from
  ``req_states``; the wrap finishes only ``scheduler_output.finished_req_ids``, so a preempted sample
  keeps its group and Distiller and rejoins when it resumes (in another slot).

The capture hooks are those of the V1 runner (:class:`~esamp_pl.vllm.capture.VllmStateCapture`); under
MRV2's FULL CUDA graphs their copies into the fixed buffers are recorded with the forward and replayed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Container
from typing import Any

import torch

from esamp_pl.vllm.runner_view import RunnerViewBase
from esamp_pl.vllm.v1_runner import RunnerBinding

log = logging.getLogger(__name__)

_BINDING: RunnerBinding | None = None


class Mrv2RunnerView(RunnerViewBase):
    """What the plugin reads from an MRV2 ``GPUModelRunner`` (``vllm.v1.worker.gpu.model_runner``)."""

    def __init__(self, runner: Any) -> None:
        super().__init__(runner)
        self.batch: Any = None
        "the ``InputBatch`` being sampled, set by the wrapped ``sample`` for the duration of the call"


def decode_rows(batch: Any, esamp_slots: Container[int]) -> list[tuple[int, str, int]]:
    """(logits row, request id, slot) of the decode rows of ESamp requests in an MRV2 ``InputBatch``.

    A request that is still prefilling (its last prompt chunk samples its first token, and a resumed
    request re-runs its prompt and earlier output) keeps vLLM's own draw, as in the own engine.
    """
    rows: list[tuple[int, str, int]] = []
    cu_num_logits = batch.cu_num_logits_np
    for i in range(batch.num_reqs):
        slot = int(batch.idx_mapping_np[i])
        if slot not in esamp_slots or batch.is_prefilling_np[i] or batch.num_scheduled_tokens[i] != 1:
            continue
        if cu_num_logits[i + 1] - cu_num_logits[i] != 1:
            continue  # a request with draft tokens (speculative decoding is refused; never reached)
        rows.append((int(cu_num_logits[i]), batch.req_ids[i], slot))
    return rows


def token_index(batch: Any, logits_rows: list[int]) -> torch.Tensor:
    """The forward's token rows (rows of the capture buffers) of ``logits_rows``, on the device."""
    rows = torch.tensor(logits_rows, dtype=torch.long, device=batch.logits_indices.device)
    return batch.logits_indices.index_select(0, rows).long()


def binding() -> RunnerBinding | None:
    """The binding of this process's MRV2 runner, once its model is loaded."""
    return _BINDING


def _attach(runner: Any) -> None:
    global _BINDING
    from esamp_pl.vllm.build import build_runtime  # lazily: needs the loaded model

    if _BINDING is not None and _BINDING.view.runner is runner:
        return
    if _BINDING is not None:
        _BINDING.capture.remove()
    view = Mrv2RunnerView(runner)
    capture, runtime = build_runtime(view)
    _BINDING = RunnerBinding(view=view, capture=capture, runtime=runtime)
    log.warning("esamp_pl: ESamp plugin attached to %s (Model Runner V2: never run on CUDA by its authors)",
                type(runner).__name__)


def _bound_to(runner: Any) -> RunnerBinding | None:
    return _BINDING if _BINDING is not None and _BINDING.view.runner is runner else None


def _after_load_model(runner: Any, result: Any, *_args: Any, **_kwargs: Any) -> Any:
    _attach(runner)
    return result


def _sample(original: Callable[..., Any], runner: Any, hidden_states: Any, input_batch: Any,
            *args: Any, **kwargs: Any) -> Any:
    bound = _bound_to(runner)
    if bound is None:
        return original(runner, hidden_states, input_batch, *args, **kwargs)
    bound.view.batch = input_batch
    try:
        return original(runner, hidden_states, input_batch, *args, **kwargs)
    finally:
        bound.view.batch = None


def _finish_requests(original: Callable[..., Any], runner: Any, scheduler_output: Any, *args: Any,
                     **kwargs: Any) -> Any:
    result = original(runner, scheduler_output, *args, **kwargs)
    bound = _bound_to(runner)
    if bound is not None:
        for request_id in scheduler_output.finished_req_ids:  # not the preempted ones: they come back
            bound.runtime.finish(request_id)
    return result


def _wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = cls.__dict__.get(name)
    if original is None or getattr(original, "_esamp_wrapped", False):
        return
    wrapped = functools.wraps(original)(make(original))
    wrapped._esamp_wrapped = True
    setattr(cls, name, wrapped)


def wrap_runner_class(cls: type) -> None:
    """Wrap ``load_model`` (attach), ``sample`` (hold the batch) and ``finish_requests`` (free) of ``cls``."""
    _wrap(cls, "load_model", lambda original: lambda self, *a, **k: _after_load_model(self, original(self, *a, **k)))
    _wrap(cls, "sample", lambda original: lambda self, *a, **k: _sample(original, self, *a, **k))
    _wrap(cls, "finish_requests", lambda original: lambda self, *a, **k: _finish_requests(original, self, *a, **k))


def install() -> None:
    """Attach ESamp to every MRV2 runner this process creates (idempotent; a vLLM without MRV2: nothing)."""
    try:
        from vllm.v1.worker.gpu import model_runner
    except Exception as error:  # pragma: no cover - a vLLM without MRV2, or one whose MRV2 cannot load here
        log.debug("esamp_pl: no Model Runner V2 to attach to (%s)", error)
        return
    wrap_runner_class(model_runner.GPUModelRunner)
