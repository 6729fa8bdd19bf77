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
from esamp_pl.kl_budget import BetaRecorder, KLBudgetStats, solve_beta
from esamp_pl.sampling import CandidateSet, SamplingParams, fuse, sample_from_candidates, select_candidates
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
    kl_budget: float | None = None
    "nats per row and step: beta is solved per row so that KL(pi_new || pi_ref) on the candidates meets it; None = fixed beta"
    beta_max: float = 2.0
    "the largest beta the KL budget may use (rows whose KL at beta_max stays below the budget take it)"
    error: str = "plain"
    "plain: tilt along e_i = h_i - f(s_i) (paper); relative: along e_i minus its prompt's mean (error_signal.py)"

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (
                math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"esamp.beta must be a float >= 0 and finite (0 = plain sampling, paper default 0.25), "
                             f"but is {self.beta!r}")
        if self.mode not in FUSION_MODES:
            raise ValueError(f"esamp.mode must be one of {FUSION_MODES}, but is {self.mode!r}")
        if self.kl_budget is not None and not (_is_number(self.kl_budget) and 0 <= self.kl_budget < math.inf):
            raise ValueError(f"esamp.kl_budget must be null (fixed beta) or a finite float >= 0 in nats per step "
                             f"(e.g. 0.05), but is {self.kl_budget!r}")
        if not (_is_number(self.beta_max) and 0 < self.beta_max < math.inf):
            raise ValueError(f"esamp.beta_max must be a finite float > 0 (the largest beta a KL budget may use, "
                             f"e.g. 2.0), but is {self.beta_max!r}")
        if self.error not in ERROR_KINDS:
            raise ValueError(f"esamp.error must be one of {ERROR_KINDS}, but is {self.error!r}")

    @property
    def uses_distiller(self) -> bool:
        return self.mode == "esamp"

    @property
    def tilts(self) -> bool:
        """Whether fusion can change anything (beta > 0, or a KL budget that solves for beta)."""
        return self.beta > 0 or self.kl_budget is not None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


# --- observer (diagnostics such as esamp_pl.novelty; eager engine only) -------------------------------------
@dataclass(frozen=True)
class StepObservation:
    """One decode step's tensors, handed to ``DecodeEngine.generate(observer=...)`` as the step is chosen."""

    step: int
    "decode step (1 = the first after the prefill's token)"
    source: torch.Tensor
    "[rows, d] the Distiller's input s"
    target: torch.Tensor
    "[rows, d] the state it predicts, h"
    prediction: torch.Tensor | None
    "[rows, d] f(s) before this step's update; None without a Distiller"
    candidates: CandidateSet
    "candidate token ids, the LM's logits on them and the candidate mask"
    scores: torch.Tensor
    "[rows, k] the scores sampled from (fused when ESamp tilts, else the LM's logits)"
    active: torch.Tensor
    "[rows] bool: rows still running (they are the ones trained this step)"
# --- end observer -------------------------------------------------------------------------------------------


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
                active: torch.Tensor | None = None, betas: BetaRecorder | None = None,
                observe: Callable[..., None] | None = None) -> torch.Tensor:
        """Filter, fuse (when ESamp is on) and sample one token per row.

        ``exact=False`` uses the candidate space sized from the configuration (fixed shapes, no host
        read) and adds the rows that filled it to ``truncated``; ``for_update`` is passed on to
        :meth:`TestTimeAdapter.predict`. ``target`` (this step's target states) and ``active``
        (unfinished rows) serve ``esamp.error=relative``. With ``esamp.kl_budget`` the realised beta of
        the ``active`` rows goes to ``betas``; ``observe`` receives the step's prediction, candidates and
        scores (the eager loop's observer).
        """
        candidates = select_candidates(logits, sampling, exact=exact)
        if truncated is not None and candidates.partial:
            truncated += candidates.keep[:, -1].sum()
        scores = candidates.logits
        prediction = None
        if esamp is not None and not esamp.uses_distiller:
            beta = self._beta(esamp, candidates, None, sampling, active, betas)
            scores = (1.0 + beta) * candidates.logits.float()
        if adapter is not None:
            prediction = adapter.predict(source, for_update=for_update)
            if esamp.tilts:
                # esamp.error: the error the tilt follows (plain: the prediction as is; see error_signal.py)
                tilted = prediction_for_fusion(prediction, target, active, adapter.samples_per_prompt,
                                               esamp.error)
                distiller_logits = self.head.logits_at(tilted, candidates.token_ids).float()
                beta = self._beta(esamp, candidates, distiller_logits, sampling, active, betas)
                scores = fuse(candidates.logits.float(), distiller_logits, beta)
        if observe is not None:
            observe(prediction=prediction, candidates=candidates, scores=scores)
        return sample_from_candidates(candidates, scores, sampling, uniform)

    @staticmethod
    def _beta(esamp: ESampSettings, candidates: CandidateSet, distiller_logits: torch.Tensor | None,
              sampling: SamplingParams, active: torch.Tensor | None,
              betas: BetaRecorder | None) -> float | torch.Tensor:
        """``esamp.beta``, or with ``esamp.kl_budget`` the per-row beta ([rows, 1]) that spends the budget.

        ``distiller_logits`` None is the sharpen-only tilt (d = 0)."""
        if esamp.kl_budget is None:
            return esamp.beta
        if distiller_logits is None:
            distiller_logits = torch.zeros_like(candidates.logits, dtype=torch.float32)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        beta, kl = solve_beta(candidates.logits, distiller_logits, candidates.keep, budget=esamp.kl_budget,
                              beta_max=esamp.beta_max, temperature=temperature)
        if betas is not None:
            tiltable = candidates.size > 1  # beta can change the distribution
            betas.record(beta, kl, tiltable if active is None else tiltable & active)
        return beta.unsqueeze(-1)

    @staticmethod
    def _beta_recorder(settings: DecodeSettings, rows: int, device) -> BetaRecorder | None:
        esamp = settings.esamp
        if esamp is None or esamp.kl_budget is None:
            return None
        return BetaRecorder(rows, settings.max_new_tokens, budget=esamp.kl_budget, beta_max=esamp.beta_max,
                            device=device)

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: DecodeSettings, *,
                 initial_state: dict[str, torch.Tensor] | None = None,
                 on_prompt_done: Callable[[PromptResult], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 observer: Callable[[StepObservation], None] | None = None) -> GenerationResult:
        """Run the decode loop; ``on_prompt_done`` receives each prompt's samples as soon as all finish.

        ``initial_state`` is one Distiller's weights (warm start or svd init) copied into every
        prompt's Distiller before the first decode step; None keeps the paper's random init.
        ``observer`` sees every decode step's tensors (:class:`StepObservation`) before its update;
        it may synchronise with the host (diagnostics), so it is an eager-engine feature.
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
        betas = self._beta_recorder(settings, rows, device)

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
                        observe = None if observer is None else (
                            lambda **parts: observer(StepObservation(step=step, source=source, target=target,
                                                                     active=active, **parts)))
                        token = self._choose(logits, esamp, adapter, source, sampling, uniforms[step],
                                             for_update=updater is None or updater.reuses_prediction,
                                             target=target, active=active, betas=betas, observe=observe)
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
                                nonfinite_rows=int(state.nonfinite.sum()), mode=mode,
                                kl_budget=betas.stats() if betas is not None else None)

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
