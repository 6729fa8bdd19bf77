"""The decode loop: batched prompts x n samples, KV cache, ESamp inside every decode step.

Rows are prompt-major: row ``p * n + j`` is sample ``j`` of prompt ``p``, so a prompt's rows are
contiguous and map onto its Distiller by a reshape. Each prompt is prefilled once and its KV cache
repeated n times. The first token comes from the prefill's logits and is sampled plainly: ESamp
neither trains on nor re-weights prefill positions (spec).

One decode step (``_decode_step``) is: model forward on the last tokens, capture of the source and
target states by hooks, Distiller prediction, candidate filtering, fusion, sampling, Distiller
update. It makes no host synchronisation of its own; the loop only looks at the host every
``check_every`` steps to hand finished prompts to the caller and to stop early.

The pieces of a step that do not depend on the cache layout (candidate choice, per-row
bookkeeping in :class:`DecodeState`, prefill, adapter set-up) are shared with the fixed-shape
engine in :mod:`esamp_pl.static_engine`; this one stays the reference path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from esamp_pl.adapter import AdapterSpec, AdapterStats, TestTimeAdapter
from esamp_pl.async_update import make_updater
from esamp_pl.error_signal import ERROR_KINDS, prediction_for_fusion
from esamp_pl.sampling import SamplingParams, fuse, sample_from_candidates, select_candidates
from esamp_pl.sites import OutputHead, SiteCapture, SitePair


FUSION_MODES = ("esamp", "sharpen_only")


@dataclass(frozen=True)
class ESampSettings:
    """ESamp on top of the LM's sampling settings."""

    adapter: AdapterSpec
    beta: float = 0.25
    "strength of the tilt toward unexplored directions; 0 gives exactly plain sampling"
    mode: str = "esamp"
    "esamp: (1 + beta) l - beta d; sharpen_only: (1 + beta) l, no Distiller (a control for the sharpening)"
    error: str = "plain"
    "plain: tilt along e_i = h_i - f(s_i) (paper); relative: along e_i minus its prompt's mean (error_signal.py)"

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0 and self.beta == self.beta):
            raise ValueError(f"esamp.beta must be a float >= 0 (paper default 0.25), but is {self.beta}")
        if self.mode not in FUSION_MODES:
            raise ValueError(f"esamp.mode must be one of {FUSION_MODES}, but is {self.mode!r}")
        if self.error not in ERROR_KINDS:
            raise ValueError(f"esamp.error must be one of {ERROR_KINDS}, but is {self.error!r}")

    @property
    def uses_distiller(self) -> bool:
        return self.mode == "esamp"


@dataclass(frozen=True)
class DecodeSettings:
    """Everything that decides which tokens a run produces."""

    n: int = 4
    "samples per prompt"
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    esamp: ESampSettings | None = None
    "None runs plain sampling"
    seed: int = 0
    check_every: int = 8
    "decode steps between host checks for finished prompts"
    ignore_eos: bool = False
    "every row runs to max_new_tokens, stop tokens included (benchmarks: the same work in every run)"

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n (samples per prompt) must be an integer >= 1, but is {self.n}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, but is {self.max_new_tokens}")
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, but is {self.check_every}")


@dataclass
class SampleResult:
    token_ids: list[int]
    "generated tokens, without the stop token"
    finish_reason: str
    "'stop' (a stop token was sampled) or 'length' (max_new_tokens reached)"
    logprob_sum: float = 0.0
    "sum over ``token_ids`` of log p(token) under the LM's own distribution (T = 1, no filter, no ESamp)"

    @property
    def perplexity(self) -> float:
        """Perplexity of the sample under the generating model, as a scorer pass would give it; nan if empty."""
        return math.exp(-self.logprob_sum / len(self.token_ids)) if self.token_ids else math.nan


@dataclass
class PromptResult:
    prompt_index: int
    samples: list[SampleResult]


@dataclass
class GenerationResult:
    prompts: list[PromptResult]
    tokens_generated: int
    decode_seconds: float
    "wall time of prefill + decode loop"
    steps: int
    "decode steps run (the first token, from the prefill, not counted)"
    adapter_stats: AdapterStats | None
    truncated_rows: int = 0
    "row-steps whose candidate set was cut to max_candidates (fixed-shape engine only; 0 = exact)"
    mode: str = "eager"
    "the decode path that ran (engine, CUDA graphs or not, update mode)"

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / max(self.decode_seconds, 1e-9)


def token_logprob(logits: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """log p(token) per row under the LM's own distribution (T = 1, before any filter or ESamp)."""
    logits = logits.float()
    return logits.gather(1, token.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` of shape [prompts, longest]."""
    if not prompt_ids or any(len(ids) == 0 for ids in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids.to(device), mask.to(device)


@dataclass
class DecodeState:
    """Per-row bookkeeping on the device, in fixed-size tensors: what was kept and which rows are done."""

    generated: torch.Tensor
    "[rows, max_new_tokens] kept tokens, pad elsewhere"
    lengths: torch.Tensor
    "[rows] tokens kept"
    stopped: torch.Tensor
    "[rows] a stop token ended the row"
    finished: torch.Tensor
    "[rows] the row keeps no more tokens"
    logprob_sums: torch.Tensor
    "[rows] float32: sum of the kept tokens' log-probabilities under the LM (its perplexity for free)"

    @classmethod
    def empty(cls, rows: int, max_new_tokens: int, pad_token_id: int, device) -> "DecodeState":
        return cls(generated=torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
                   lengths=torch.zeros(rows, dtype=torch.long, device=device),
                   stopped=torch.zeros(rows, dtype=torch.bool, device=device),
                   finished=torch.zeros(rows, dtype=torch.bool, device=device),
                   logprob_sums=torch.zeros(rows, dtype=torch.float32, device=device))

    def record(self, token: torch.Tensor, column: torch.Tensor, stop_token_ids: torch.Tensor, pad_token_id: int,
               logits: torch.Tensor) -> None:
        """Keep ``token`` in ``column`` ([1], a device index) for rows still running; a stop token ends its
        row without being kept. ``logits`` are the LM's for this position (the kept token's log-probability is
        summed). In place, no host synchronisation."""
        is_stop = torch.isin(token, stop_token_ids)
        keep = ~self.finished & ~is_stop
        self.generated.index_copy_(1, column, token.masked_fill(~keep, pad_token_id).unsqueeze(1))
        self.lengths += keep
        self.logprob_sums += token_logprob(logits, token).masked_fill(~keep, 0.0)
        self.stopped |= ~self.finished & is_stop
        self.finished |= is_stop


class DecodeEngine:
    """Generates n samples per prompt with plain sampling or ESamp, on any HF decoder-only LM."""

    def __init__(self, model, *, sites: SitePair, stop_token_ids: list[int], pad_token_id: int) -> None:
        if not stop_token_ids:
            raise ValueError("at least one stop token id is needed (the tokenizer's EOS)")
        self.model = model
        self.sites = sites
        self.head = OutputHead(model)
        self.device = next(model.parameters()).device
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), device=self.device)
        self.pad_token_id = pad_token_id

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _choose(self, logits, esamp: ESampSettings | None, adapter: TestTimeAdapter | None, source,
                sampling: SamplingParams, uniform: torch.Tensor, *, exact: bool = True, for_update: bool = True,
                truncated: torch.Tensor | None = None, target: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """Filter, fuse (when ESamp is on) and sample one token per row.

        ``exact=False`` keeps the candidate space at ``max_candidates`` (fixed shapes) and adds the
        rows it cut to ``truncated``; ``for_update`` is passed on to :meth:`TestTimeAdapter.predict`.
        ``target`` (this step's target states) and ``active`` (unfinished rows) serve ``esamp.error=relative``.
        """
        candidates = select_candidates(logits, sampling, exact=exact)
        if truncated is not None and candidates.partial:
            truncated += candidates.keep[:, -1].sum()
        scores = candidates.logits
        if esamp is not None and not esamp.uses_distiller:
            scores = (1.0 + esamp.beta) * candidates.logits.float()
        if adapter is not None:
            prediction = adapter.predict(source, for_update=for_update)
            if esamp.beta > 0:
                # esamp.error: the error the tilt follows (plain: the prediction as is; see error_signal.py)
                prediction = prediction_for_fusion(prediction, target, active, adapter.samples_per_prompt,
                                                   esamp.error)
                distiller_logits = self.head.logits_at(prediction, candidates.token_ids)
                scores = fuse(candidates.logits.float(), distiller_logits.float(), esamp.beta)
        return sample_from_candidates(candidates, scores, sampling, uniform)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: DecodeSettings, *,
                 initial_state: dict[str, torch.Tensor] | None = None,
                 on_prompt_done: Callable[[PromptResult], None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> GenerationResult:
        """Run the decode loop; ``on_prompt_done`` receives each prompt's samples as soon as all finish.

        ``initial_state`` is one Distiller's weights (warm start or svd init) copied into every
        prompt's Distiller before the first decode step; None keeps the paper's random init.
        """
        n, steps_max, sampling, esamp = settings.n, settings.max_new_tokens, settings.sampling, settings.esamp
        num_prompts = len(prompt_ids)
        rows = num_prompts * n
        device = self.device
        uniforms = self._uniforms(settings, rows)
        adapter = self._new_adapter(settings, num_prompts, initial_state)
        updater = make_updater(adapter, esamp.adapter.update_mode, device=device) if adapter is not None else None
        stops = self._stop_ids(settings)
        columns = torch.arange(steps_max, device=device)

        start = time.perf_counter()
        with SiteCapture(self.model, self.sites) as capture:
            cache, logits, attention_mask, next_position = self._prefill(capture, prompt_ids, n)
            cache.batch_repeat_interleave(n)
            state = DecodeState.empty(rows, steps_max, self.pad_token_id, device)
            reported = [False] * num_prompts
            results: list[PromptResult | None] = [None] * num_prompts

            token = self._choose(logits, None, None, None, sampling, uniforms[0])
            steps_run = 0
            try:
                for step in range(steps_max):
                    if step > 0:
                        active = ~state.finished
                        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                        logits = self._forward(token.unsqueeze(-1), attention_mask, next_position, cache)
                        next_position = next_position + 1
                        source, target = capture.pop()
                        if updater is not None:
                            updater.wait()
                        token = self._choose(logits, esamp, adapter, source, sampling, uniforms[step],
                                             for_update=updater is None or updater.reuses_prediction,
                                             target=target, active=active)
                        if updater is not None:
                            updater.stage(source, target, active)
                            updater.launch()
                        steps_run += 1
                    state.record(token, columns[step:step + 1], stops, self.pad_token_id, logits)
                    if step == steps_max - 1:
                        state.finished[:] = True
                    if on_step is not None:
                        on_step(step)
                    if (step + 1) % settings.check_every == 0 or step == steps_max - 1:
                        if self._report(state, n, reported, results, on_prompt_done):
                            break
            finally:
                if updater is not None:
                    updater.close()
        elapsed = time.perf_counter() - start
        done = [r for r in results if r is not None]
        mode = "eager" + (f", {esamp.adapter.update_mode} update" if adapter is not None else "")
        return GenerationResult(prompts=done, tokens_generated=int(state.lengths.sum()), decode_seconds=elapsed,
                                steps=steps_run, adapter_stats=adapter.stats() if adapter is not None else None,
                                mode=mode)

    def _uniforms(self, settings: DecodeSettings, rows: int) -> torch.Tensor:
        """One uniform number per row and step, drawn up front ([max_new_tokens, rows]).

        The sampler has its own random stream: the Distiller's init must not shift its numbers, so
        that beta = 0 reproduces plain sampling token for token.
        """
        sample_rng = torch.Generator(device=self.device).manual_seed(settings.seed)
        return torch.rand(settings.max_new_tokens, rows, generator=sample_rng, device=self.device)

    def _new_adapter(self, settings: DecodeSettings, num_prompts: int,
                     initial_state: dict[str, torch.Tensor] | None) -> TestTimeAdapter | None:
        esamp = settings.esamp
        if esamp is None or not esamp.uses_distiller:
            return None
        init_rng = torch.Generator().manual_seed(settings.seed + 1)
        adapter = TestTimeAdapter(esamp.adapter, num_prompts, settings.n, device=self.device, generator=init_rng,
                                  max_steps=settings.max_new_tokens)
        if initial_state is not None:
            adapter.load_initial_state(initial_state)
        return adapter

    def _stop_ids(self, settings: DecodeSettings) -> torch.Tensor:
        return self.stop_token_ids[:0] if settings.ignore_eos else self.stop_token_ids

    def _prefill(self, capture: SiteCapture, prompt_ids: list[list[int]], n: int):
        """Prefill each prompt once. Returns its DynamicCache (one row per prompt), and per row (prompt-major,
        n per prompt): the last position's logits, the attention mask and the next position."""
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id, self.device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(input_ids, attention_mask, positions, cache)
        capture.pop()  # prefill states: neither trained on nor used
        return (cache, logits.repeat_interleave(n, dim=0), attention_mask.repeat_interleave(n, dim=0),
                positions[:, -1:].repeat_interleave(n, dim=0) + 1)

    @staticmethod
    def _report(state: DecodeState, n, reported, results, on_prompt_done) -> bool:
        """Hand newly finished prompts to the caller (one host sync); True when all are done."""
        prompt_done = state.finished.view(-1, n).all(dim=1).tolist()
        pending = [p for p, done in enumerate(prompt_done) if done and not reported[p]]
        if pending:
            generated = state.generated
            lengths_host = state.lengths.tolist()
            stopped_host = state.stopped.tolist()
            logprob_sums_host = state.logprob_sums.tolist()
            for p in pending:
                samples = []
                for row in range(p * n, (p + 1) * n):
                    ids = generated[row, :lengths_host[row]].tolist()
                    samples.append(SampleResult(ids, "stop" if stopped_host[row] else "length",
                                                logprob_sums_host[row]))
                results[p] = PromptResult(p, samples)
                reported[p] = True
                if on_prompt_done is not None:
                    on_prompt_done(results[p])
        return all(prompt_done)
