"""The decode loop both engines share: prefill, first token, decode steps, finish, reporting, results.

Rows are prompt-major: row ``p * n + j`` is sample ``j`` of prompt ``p``, so a prompt's rows are
contiguous and map onto its Distiller by a reshape. Each prompt is prefilled once and its KV cache
repeated n times. The first token comes from the prefill's logits and is sampled plainly: ESamp
neither trains on nor re-weights prefill positions (spec).

:class:`DecodeLoop` writes the outer loop once; an engine supplies how a run starts (``_begin``:
its cache and buffers after the prefill), one decode step (``_decode_step``) and how a run ends.
Every step ends in :meth:`DecodeLoop._sample`: candidates, ESamp's scores
(:class:`esamp_pl.esamp.ESampStep`), sampling, per-row bookkeeping in :class:`DecodeState`. A step
makes no host synchronisation of its own; the loop only looks at the host every ``check_every``
steps to hand finished prompts to the caller and to stop early.

The engines: :mod:`esamp_pl.engine` (eager, DynamicCache: the reference path) and
:mod:`esamp_pl.static_engine` (fixed shapes, CUDA graphs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from esamp_pl.adapter import AdapterStats
from esamp_pl.esamp import ESampSettings, ESampStep
from esamp_pl.kl_budget import KLBudgetStats
from esamp_pl.sampling import SamplingParams, sample_from_candidates, select_candidates
from esamp_pl.sites import OutputHead, SiteCapture, SitePair


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
    "'stop' (a stop token was sampled), 'length' (max_new_tokens reached) or 'nonfinite' (the LM's logits were\
 NaN/inf: the row ended there, ``token_ids`` are the tokens before)"
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
    "row-steps whose candidate set overflowed the fixed candidate space (more ties with the k-th logit than it has\
 room for; CUDA static engine only); 0 = every step sampled exactly what the filters keep"
    nonfinite_rows: int = 0
    "rows ended early because the LM's logits were not finite (finish_reason 'nonfinite')"
    mode: str = "eager"
    "the decode path that ran (engine, CUDA graphs or not, update mode)"
    kl_budget: KLBudgetStats | None = None
    "realised beta and KL when esamp.kl_budget is set; None otherwise"

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
    nonfinite: torch.Tensor
    "[rows] the LM's logits were not finite: the row ended there without keeping the token"

    @classmethod
    def empty(cls, rows: int, max_new_tokens: int, pad_token_id: int, device) -> "DecodeState":
        return cls(generated=torch.full((rows, max_new_tokens), pad_token_id, dtype=torch.long, device=device),
                   lengths=torch.zeros(rows, dtype=torch.long, device=device),
                   stopped=torch.zeros(rows, dtype=torch.bool, device=device),
                   finished=torch.zeros(rows, dtype=torch.bool, device=device),
                   logprob_sums=torch.zeros(rows, dtype=torch.float32, device=device),
                   nonfinite=torch.zeros(rows, dtype=torch.bool, device=device))

    def record(self, token: torch.Tensor, column: torch.Tensor, stop_token_ids: torch.Tensor, pad_token_id: int,
               logits: torch.Tensor) -> None:
        """Keep ``token`` in ``column`` ([1], a device index) for rows still running; a stop token ends its
        row without being kept. ``logits`` are the LM's for this position (the kept token's log-probability is
        summed); a row whose logits are not finite (its log-probability is then NaN or inf) ends there too,
        flagged ``nonfinite``, rather than keep a token drawn from garbage. In place, no host synchronisation."""
        logprob = token_logprob(logits, token)
        broken = ~torch.isfinite(logprob)
        is_stop = torch.isin(token, stop_token_ids) & ~broken
        keep = ~self.finished & ~is_stop & ~broken
        self.generated.index_copy_(1, column, token.masked_fill(~keep, pad_token_id).unsqueeze(1))
        self.lengths += keep
        self.logprob_sums += logprob.masked_fill(~keep, 0.0)
        self.stopped |= ~self.finished & is_stop
        self.nonfinite |= ~self.finished & broken
        self.finished |= is_stop | broken



@dataclass(eq=False)
class DecodeRun:
    """The device tensors of one generation that the loop and an engine's step share."""

    settings: DecodeSettings
    stops: torch.Tensor
    "the stop token ids of this run (none with ignore_eos)"
    state: DecodeState
    uniforms: torch.Tensor
    "[max_new_tokens, rows] one uniform number per row and step, drawn up front"
    step: torch.Tensor
    "[1] the step being chosen (index into uniforms and generated), on the device"
    input_ids: torch.Tensor
    "[rows, 1] the token fed to the next forward"
    truncated: torch.Tensor
    "[] row-steps whose fixed candidate space overflowed (GenerationResult.truncated_rows)"
    esamp: ESampStep | None
    "None runs plain sampling"


def choose_token(logits: torch.Tensor, sampling: SamplingParams, uniform: torch.Tensor, *,
                 esamp: ESampStep | None = None, source: torch.Tensor | None = None,
                 target: torch.Tensor | None = None, active: torch.Tensor | None = None, exact: bool = True,
                 truncated: torch.Tensor | None = None, observe: Callable[..., None] | None = None) -> torch.Tensor:
    """Filter, score (ESamp's scores when ``esamp`` is given, else the LM's logits) and sample one token per row.

    ``exact=False`` uses the candidate space sized from the configuration (fixed shapes, no host
    read) and adds the rows that filled it to ``truncated``; ``observe`` receives the step's
    prediction, candidates and scores (the eager loop's observer).
    """
    candidates = select_candidates(logits, sampling, exact=exact)
    if truncated is not None and candidates.partial:
        truncated += candidates.keep[:, -1].sum()
    scores = candidates.logits if esamp is None else esamp.scores(candidates, source, target, active)
    if observe is not None:
        observe(prediction=None if esamp is None else esamp.prediction, candidates=candidates, scores=scores)
    return sample_from_candidates(candidates, scores, sampling, uniform)


class DecodeLoop:
    """Generates n samples per prompt with plain sampling or ESamp, on any HF decoder-only LM.

    The outer loop and the shared pieces of a step; an engine subclass supplies ``_begin``,
    ``_decode_step`` and, where it differs, ``_end`` and ``_mode``.
    """

    fixed_candidates = False
    "True: the candidate space is sized from the configuration (fixed shapes, no host read; the static engine on\
 CUDA). False: it widens on demand with one host read per step. Same tokens"

    def __init__(self, model, *, sites: SitePair, stop_token_ids: list[int], pad_token_id: int) -> None:
        if not stop_token_ids:
            raise ValueError("at least one stop token id is needed (the tokenizer's EOS)")
        self.model = model
        self.sites = sites
        self.head = OutputHead(model)
        self.device = next(model.parameters()).device
        self.stop_token_ids = torch.tensor(sorted(set(stop_token_ids)), device=self.device)
        self.pad_token_id = pad_token_id

    # -- what an engine supplies -----------------------------------------------------------------------------

    def _begin(self, capture: SiteCapture, prompt_ids: list[list[int]], settings: DecodeSettings,
               initial_state: dict[str, torch.Tensor] | None, stops: torch.Tensor,
               observer) -> tuple[DecodeRun, torch.Tensor]:
        """Prefill and set up the run's buffers; returns the run and the prefill's logits per row."""
        raise NotImplementedError

    def _decode_step(self, run: DecodeRun, capture: SiteCapture) -> None:
        """One decode step: forward on ``run.input_ids``, then ``_sample`` with ESamp, then the update."""
        raise NotImplementedError

    def _end(self, run: DecodeRun) -> None:
        """After the last step (also on an error): apply the last update, release the updater."""
        if run.esamp is not None:
            run.esamp.close()

    def _mode(self, run: DecodeRun) -> str:
        raise NotImplementedError

    # -- the loop --------------------------------------------------------------------------------------------

    def _loop(self, prompt_ids: list[list[int]], settings: DecodeSettings,
              initial_state: dict[str, torch.Tensor] | None,
              on_prompt_done: Callable[[PromptResult], None] | None, on_step: Callable[[int], None] | None,
              observer=None) -> GenerationResult:
        """Prefill -> first token -> decode steps -> finish; prompts are reported as they finish."""
        n, steps_max = settings.n, settings.max_new_tokens
        num_prompts = len(prompt_ids)
        start = time.perf_counter()
        with SiteCapture(self.model, self.sites) as capture:
            run, logits = self._begin(capture, prompt_ids, settings, initial_state, self._stop_ids(settings),
                                      observer)
            # After the prefill: the Distiller's prediction may start inside each decode forward (CPU worker).
            capture.on_source = run.esamp.source_hook if run.esamp is not None else None
            reported = [False] * num_prompts
            results: list[PromptResult | None] = [None] * num_prompts
            steps_run = 0
            try:
                self._sample(run, logits, None)  # the prefill's token: plain sampling (spec)
                for step in range(steps_max):
                    if step > 0:
                        self._decode_step(run, capture)
                        steps_run += 1
                    if step == steps_max - 1:
                        run.state.finished.fill_(True)
                    if on_step is not None:
                        on_step(step)
                    if (step + 1) % settings.check_every == 0 or step == steps_max - 1:
                        if self._report(run.state, n, reported, results, on_prompt_done):
                            break
            finally:
                self._end(run)
        elapsed = time.perf_counter() - start
        esamp = run.esamp
        return GenerationResult(prompts=[r for r in results if r is not None],
                                tokens_generated=int(run.state.lengths.sum()), decode_seconds=elapsed,
                                steps=steps_run, adapter_stats=esamp.stats() if esamp is not None else None,
                                truncated_rows=int(run.truncated), nonfinite_rows=int(run.state.nonfinite.sum()),
                                mode=self._mode(run), kl_budget=esamp.kl_stats() if esamp is not None else None)

    # -- shared pieces of a step -----------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _sample(self, run: DecodeRun, logits: torch.Tensor, esamp: ESampStep | None,
                source: torch.Tensor | None = None, target: torch.Tensor | None = None,
                active: torch.Tensor | None = None, observe: Callable[..., None] | None = None) -> None:
        """Choose step ``run.step``'s token per row, feed it to the next forward, keep it; advance the step."""
        uniform = run.uniforms.index_select(0, run.step).squeeze(0)
        token = choose_token(logits, run.settings.sampling, uniform, esamp=esamp, source=source, target=target,
                             active=active, exact=not self.fixed_candidates, truncated=run.truncated,
                             observe=observe)
        run.input_ids.copy_(token.unsqueeze(-1))
        run.state.record(token, run.step, run.stops, self.pad_token_id, logits)
        run.step += 1

    def _uniforms(self, settings: DecodeSettings, rows: int) -> torch.Tensor:
        """One uniform number per row and step, drawn up front ([max_new_tokens, rows]).

        The sampler has its own random stream: the Distiller's init must not shift its numbers, so
        that beta = 0 reproduces plain sampling token for token.
        """
        sample_rng = torch.Generator(device=self.device).manual_seed(settings.seed)
        return torch.rand(settings.max_new_tokens, rows, generator=sample_rng, device=self.device)

    def _esamp_step(self, settings: DecodeSettings, num_prompts: int, initial_state: dict[str, torch.Tensor] | None,
                    *, cuda_graphs: bool = False) -> ESampStep | None:
        if settings.esamp is None:
            return None
        return ESampStep(settings.esamp, settings.sampling, self.head, num_prompts=num_prompts,
                         samples_per_prompt=settings.n, max_steps=settings.max_new_tokens, seed=settings.seed,
                         device=self.device, initial_state=initial_state, cuda_graphs=cuda_graphs,
                         compact_projection=not self.fixed_candidates)

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
            nonfinite_host = state.nonfinite.tolist()
            logprob_sums_host = state.logprob_sums.tolist()
            for p in pending:
                samples = []
                for row in range(p * n, (p + 1) * n):
                    ids = generated[row, :lengths_host[row]].tolist()
                    reason = "nonfinite" if nonfinite_host[row] else "stop" if stopped_host[row] else "length"
                    samples.append(SampleResult(ids, reason, logprob_sums_host[row]))
                results[p] = PromptResult(p, samples)
                reported[p] = True
                if on_prompt_done is not None:
                    on_prompt_done(results[p])
        return all(prompt_done)
