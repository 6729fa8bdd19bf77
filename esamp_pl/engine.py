"""The decode loop: batched prompts x n samples, KV cache, ESamp inside every decode step.

Rows are prompt-major: row ``p * n + j`` is sample ``j`` of prompt ``p``, so a prompt's rows are
contiguous and map onto its Distiller by a reshape. Each prompt is prefilled once and its KV cache
repeated n times. The first token comes from the prefill's logits and is sampled plainly: ESamp
neither trains on nor re-weights prefill positions (spec).

One decode step (``_decode_step``) is: model forward on the last tokens, capture of the source and
target states by hooks, Distiller prediction, candidate filtering, fusion, sampling, Distiller
update. It makes no host synchronisation of its own; the loop only looks at the host every
``check_every`` steps to hand finished prompts to the caller and to stop early.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from esamp_pl.adapter import AdapterSpec, AdapterStats, TestTimeAdapter
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

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0 and self.beta == self.beta):
            raise ValueError(f"esamp.beta must be a float >= 0 (paper default 0.25), but is {self.beta}")
        if self.mode not in FUSION_MODES:
            raise ValueError(f"esamp.mode must be one of {FUSION_MODES}, but is {self.mode!r}")

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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_generated / max(self.decode_seconds, 1e-9)


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
                sampling: SamplingParams, uniform: torch.Tensor) -> torch.Tensor:
        """Filter, fuse (when ESamp is on) and sample one token per row."""
        candidates = select_candidates(logits, sampling)
        scores = candidates.logits
        if esamp is not None and not esamp.uses_distiller:
            scores = (1.0 + esamp.beta) * candidates.logits.float()
        if adapter is not None:
            prediction = adapter.predict(source)
            if esamp.beta > 0:
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
        # Separate random streams: the Distiller's init must not shift the sampler's numbers, so that
        # beta = 0 reproduces plain sampling token for token.
        sample_rng = torch.Generator(device=device).manual_seed(settings.seed)
        adapter = None
        if esamp is not None and esamp.uses_distiller:
            init_rng = torch.Generator().manual_seed(settings.seed + 1)
            adapter = TestTimeAdapter(esamp.adapter, num_prompts, n, device=device, generator=init_rng)
            if initial_state is not None:
                adapter.load_initial_state(initial_state)

        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id, device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        start = time.perf_counter()
        with SiteCapture(self.model, self.sites) as capture:
            logits = self._forward(input_ids, attention_mask, positions, cache)
            capture.pop()  # prefill states: neither trained on nor used
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            attention_mask = attention_mask.repeat_interleave(n, dim=0)
            next_position = positions[:, -1:].repeat_interleave(n, dim=0) + 1

            generated = torch.full((rows, steps_max), self.pad_token_id, dtype=torch.long, device=device)
            lengths = torch.zeros(rows, dtype=torch.long, device=device)
            stopped = torch.zeros(rows, dtype=torch.bool, device=device)
            finished = torch.zeros(rows, dtype=torch.bool, device=device)
            reported = [False] * num_prompts
            results: list[PromptResult | None] = [None] * num_prompts

            uniform = torch.rand(rows, generator=sample_rng, device=device)
            token = self._choose(logits, None, None, None, sampling, uniform)
            steps_run = 0
            for step in range(steps_max):
                if step > 0:
                    active = ~finished
                    attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
                    logits = self._forward(token.unsqueeze(-1), attention_mask, next_position, cache)
                    next_position = next_position + 1
                    source, target = capture.pop()
                    uniform = torch.rand(rows, generator=sample_rng, device=device)
                    token = self._choose(logits, esamp, adapter, source, sampling, uniform)
                    if adapter is not None:
                        adapter.update(target, active)
                    steps_run += 1
                # Record the token for rows still running; a stop token ends the row without being kept.
                is_stop = torch.isin(token, self.stop_token_ids)
                keep = ~finished & ~is_stop
                generated[:, step] = torch.where(keep, token, generated[:, step])
                lengths += keep.long()
                stopped |= ~finished & is_stop
                finished |= is_stop
                if step == steps_max - 1:
                    finished[:] = True
                if on_step is not None:
                    on_step(step)
                if (step + 1) % settings.check_every == 0 or step == steps_max - 1:
                    if self._report(finished, generated, lengths, stopped, n, reported, results, on_prompt_done):
                        break
        elapsed = time.perf_counter() - start
        done = [r for r in results if r is not None]
        return GenerationResult(prompts=done, tokens_generated=int(lengths.sum()), decode_seconds=elapsed,
                                steps=steps_run, adapter_stats=adapter.stats() if adapter is not None else None)

    @staticmethod
    def _report(finished, generated, lengths, stopped, n, reported, results, on_prompt_done) -> bool:
        """Hand newly finished prompts to the caller (one host sync); True when all are done."""
        prompt_done = finished.view(-1, n).all(dim=1).tolist()
        pending = [p for p, done in enumerate(prompt_done) if done and not reported[p]]
        if pending:
            lengths_host = lengths.tolist()
            stopped_host = stopped.tolist()
            for p in pending:
                samples = []
                for row in range(p * n, (p + 1) * n):
                    ids = generated[row, :lengths_host[row]].tolist()
                    samples.append(SampleResult(ids, "stop" if stopped_host[row] else "length"))
                results[p] = PromptResult(p, samples)
                reported[p] = True
                if on_prompt_done is not None:
                    on_prompt_done(results[p])
        return all(prompt_done)
