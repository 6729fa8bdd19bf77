"""vLLM-version-specific part 2 of 2: the V1 logits-processor interface (``vllm.v1.sample.logits_processor``).

vLLM's sampler runs custom logits processors that are not argmax-invariant *before* its own
temperature, min-p and top-k/top-p, so ESamp's post-filter fusion cannot simply re-weight the
logits there (vLLM's filters would then act on the fused distribution). This processor instead
does the whole ESamp step for ESamp rows (:meth:`ESampRuntime.step`): it applies the request's
own filters to the logits it receives (allowed-token masks, bad words, logit bias and min-tokens
already applied by vLLM), fuses on the candidates, draws the token, and hands vLLM's sampler a
row whose only finite logit is that token, so vLLM's temperature, filters and draw return it
unchanged. Rows of other requests, prefill rows and ``esamp_beta = 0`` rows keep vLLM's draw.

Penalties (presence / frequency / repetition) run after custom processors in vLLM and are
refused for ESamp requests by :meth:`ESampLogitsProcessor.validate_params` (HTTP 400 on a server).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import SamplingParams as VllmSamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from esamp_pl.vllm import v1_runner
from esamp_pl.vllm.options import RequestOptions, request_options
from esamp_pl.vllm.runtime import esamp_sampling

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """An ESamp request in the persistent batch (keyed by its batch index)."""

    options: RequestOptions
    params: VllmSamplingParams
    output_token_ids: list[int]
    "vLLM's live list of the request's generated tokens"


def _penalised(params: VllmSamplingParams) -> bool:
    return (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0)


class ESampLogitsProcessor(LogitsProcessor):
    """ESamp for requests whose ``extra_args`` carry ``esamp_*`` keys; other requests pass through."""

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        options = request_options(sampling_params.extra_args)  # a bad key or value is a ValueError here
        if options is not None and _penalised(sampling_params):
            raise ValueError("ESamp requests cannot use presence/frequency/repetition penalties (vLLM applies "
                             "them after ESamp's draw); drop the penalties or the esamp_* keys")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}
        self._warned_unattached = False

    def is_argmax_invariant(self) -> bool:
        return False  # ESamp rows change their argmax: the processor must run for greedy requests too

    def _new_row(self, params: VllmSamplingParams, _prompt, output_token_ids: list[int]) -> _Row | None:
        options = request_options(params.extra_args)
        return None if options is None else _Row(options, params, output_token_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)
        bound = v1_runner.binding()
        # Any batch change may carry a finish: a freed batch index that a new request took at once is not
        # listed in ``removed``, so ask the runner which members still exist.
        if batch_update is not None and bound is not None:
            runtime = bound.runtime
            for request_id in [r for r in runtime.members if not bound.view.request_exists(r)]:
                runtime.finish(request_id)  # finished (preempted requests stay in runner.requests)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        bound = v1_runner.binding()
        if bound is None:
            if not self._warned_unattached:
                log.error("esamp_pl: ESamp requests arrived but the plugin is not attached to this vLLM model "
                          "runner (only the V1 runner is supported: on CUDA set VLLM_USE_V2_MODEL_RUNNER=0); "
                          "they run as plain vLLM sampling")
                self._warned_unattached = True
            return logits
        view, runtime = bound.view, bound.runtime
        num_rows = logits.shape[0]
        request_ids = view.request_ids(num_rows)
        token_rows, scheduled = view.token_rows(num_rows)
        decode: list[tuple[int, str]] = []
        tokens: list[int] = []
        for index, row in self.rows.items():
            # A decode row runs one generated token; prefill (and recompute) rows keep vLLM's plain draw.
            if index >= num_rows or not row.output_token_ids or scheduled[index] != 1:
                continue
            request_id = request_ids[index]
            if request_id not in runtime.members:
                self._join(runtime, request_id, row, view)
            decode.append((index, request_id))
            tokens.append(token_rows[index])
        if decode:
            index = torch.tensor(tokens, device=bound.capture.source.device)
            runtime.step(logits, decode, *bound.capture.rows(index))
        return logits

    @staticmethod
    def _join(runtime, request_id: str, row: _Row, view) -> None:
        options, params = row.options, row.params
        parent, index = v1_runner.parse_child_id(request_id)
        if options.group is not None:
            group, size = f"group:{options.group}", options.group_size or 1
        else:
            group, size = f"request:{parent}", 1
        sampling = esamp_sampling(params.temperature, params.top_k, params.top_p, params.min_p,
                                  runtime.settings.max_candidates)
        runtime.add(request_id, options, sampling, seed=params.seed, group=group, slot=index, size=size)
