"""vLLM-version-specific: the logits-processor interfaces of vLLM's two model runners.

vLLM 0.32 loads the classes of the ``vllm.logits_processors`` entry-point group into whichever runner
runs: the V1 runner wants ``vllm.v1.sample.logits_processor.LogitsProcessor`` (``update_state`` with
batch indices, ``apply(logits)``), Model Runner V2 wants
``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor`` (``add_request`` with persistent slots,
``apply(logits, ctx)``) and refuses any other class at start-up, in the API server too. So the one
entry-point class, :class:`ESampLogitsProcessor`, implements both; the runner's constructor call says
which one it serves, and the batch layout comes from :mod:`esamp_pl.vllm.v1_runner` or
:mod:`esamp_pl.vllm.mrv2_runner`.

Both samplers run custom logits processors that are not argmax-invariant *before* their own
temperature, min-p and top-k/top-p, so ESamp's post-filter fusion cannot simply re-weight the
logits there (vLLM's filters would then act on the fused distribution). This processor instead
does the whole ESamp step for ESamp rows (:meth:`ESampRuntime.step`): it applies the request's
own filters to the logits it receives (allowed-token masks, bad words, logit bias and min-tokens
already applied by vLLM), fuses on the candidates, draws the token, and hands vLLM's sampler a
row whose only finite logit is that token, so vLLM's temperature, filters and draw return it
unchanged. Rows of other requests, prefill rows and ``esamp_beta = 0`` rows keep vLLM's draw.

Penalties (presence / frequency / repetition) run after custom processors in the V1 runner and are
refused for ESamp requests by :meth:`ESampLogitsProcessor.validate_params` (HTTP 400 on a server);
MRV2 applies them before, but the check does not know the runner and refuses them there too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import SamplingParams as VllmSamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from esamp_pl.vllm import mrv2_runner, v1_runner
from esamp_pl.vllm.options import RequestOptions, request_options
from esamp_pl.vllm.runtime import esamp_sampling

try:  # vLLM 0.32: Model Runner V2's interface (import-light: no triton, no CUDA)
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as Mrv2LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState
except ImportError:  # pragma: no cover - a vLLM without Model Runner V2
    LogitsContext = LogitsProcRequestState = None
    _RUNNER_INTERFACES: tuple[type, ...] = (LogitsProcessor,)
else:
    _RUNNER_INTERFACES = (LogitsProcessor, Mrv2LogitsProcessor)

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """An ESamp request in the persistent batch (keyed by its batch index)."""

    options: RequestOptions
    params: VllmSamplingParams
    output_token_ids: list[int]
    "vLLM's live list of the request's generated tokens (V1 runner; empty under MRV2)"


def _penalised(params: VllmSamplingParams) -> bool:
    return (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0)


class ESampLogitsProcessor(*_RUNNER_INTERFACES):
    """ESamp for requests whose ``extra_args`` carry ``esamp_*`` keys; other requests pass through.

    Built by the V1 runner as ``(vllm_config, device, is_pin_memory)`` and by Model Runner V2 as
    ``(vllm_config, req_states)``; each calls only its own interface's methods.
    """

    @classmethod
    def validate_params(cls, sampling_params: VllmSamplingParams) -> None:
        options = request_options(sampling_params.extra_args)  # a bad key or value is a ValueError here
        if options is not None and _penalised(sampling_params):
            raise ValueError("ESamp requests cannot use presence/frequency/repetition penalties (vLLM's V1 runner "
                             "applies them after ESamp's draw); drop the penalties or the esamp_* keys")

    def __init__(self, vllm_config, *runner_args) -> None:
        self.mrv2 = LogitsProcRequestState is not None and len(runner_args) == 1 and isinstance(
            runner_args[0], LogitsProcRequestState)
        self.rows: dict[int, _Row] = {}
        "ESamp requests by V1 batch index, or by MRV2 request slot"
        self._warned_unattached = False

    # ---- the V1 runner's interface ----------------------------------------------------------------------
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

    def apply(self, logits: torch.Tensor, ctx: LogitsContext | None = None) -> torch.Tensor:
        if not self.rows:
            return logits
        if self.mrv2:
            return self._apply_mrv2(logits)
        bound = self._bound(v1_runner.binding())
        if bound is None:
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
                _join(runtime, request_id, row)
            decode.append((index, request_id))
            tokens.append(token_rows[index])
        if decode:
            index = torch.tensor(tokens, device=bound.capture.source.device)
            runtime.step(logits, decode, *bound.capture.rows(index))
        return logits

    # ---- Model Runner V2's interface --------------------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: VllmSamplingParams) -> bool:
        """A request took slot ``req_idx`` (a recycled slot: the previous occupant's row is replaced)."""
        row = self._new_row(sampling_params, None, [])
        if row is None:
            self.rows.pop(req_idx, None)
            return False
        self.rows[req_idx] = row
        return True

    def _apply_mrv2(self, logits: torch.Tensor) -> torch.Tensor:
        bound = self._bound(mrv2_runner.binding())
        if bound is None or bound.view.batch is None:
            return logits  # not attached, or a profiling run of the sampler outside ``sample``
        batch, runtime = bound.view.batch, bound.runtime
        decode = mrv2_runner.decode_rows(batch, self.rows)
        if not decode:
            return logits
        for _, request_id, slot in decode:
            if request_id not in runtime.members:
                _join(runtime, request_id, self.rows[slot])
        logits_rows = [logits_row for logits_row, _, _ in decode]
        index = mrv2_runner.token_index(batch, logits_rows).to(bound.capture.source.device)
        runtime.step(logits, [(logits_row, request_id) for logits_row, request_id, _ in decode],
                     *bound.capture.rows(index))
        return logits

    # ---- both -------------------------------------------------------------------------------------------
    def _bound(self, bound):
        if bound is None and not self._warned_unattached:
            log.error("esamp_pl: ESamp requests arrived but the plugin is not attached to this vLLM model "
                      "runner; they run as plain vLLM sampling")
            self._warned_unattached = True
        return bound


def _join(runtime, request_id: str, row: _Row) -> None:
    """Make ``request_id`` a member of its group: the n samples of one request, or its ``esamp_group``."""
    options, params = row.options, row.params
    parent, index = v1_runner.parse_child_id(request_id)
    if options.group is not None:
        group, size = f"group:{options.group}", options.group_size or 1
    else:
        group, size = f"request:{parent}", 1
    sampling = esamp_sampling(params.temperature, params.top_k, params.top_p, params.min_p,
                              runtime.settings.max_candidates)
    runtime.add(request_id, options, sampling, seed=params.seed, group=group, slot=index, size=size)
