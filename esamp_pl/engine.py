"""The eager decode engine: the reference path, one DynamicCache that grows by a column each step.

It supplies the decode step to the shared loop (:class:`esamp_pl.decode_loop.DecodeLoop`): model
forward on the last tokens (the hooks capture the source and target states), wait for the previous
update, candidates and ESamp's scores and sampling (``DecodeLoop._sample``), then this step's update.
An ``observer`` sees every step's tensors (diagnostics, :mod:`esamp_pl.novelty`).

The names of the decode interface (settings, results) are re-exported here, where callers import them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache

from esamp_pl.decode_loop import (DecodeLoop, DecodeRun, DecodeSettings, DecodeState, GenerationResult,
                                  PromptResult, SampleResult, choose_token, left_pad, token_logprob)
from esamp_pl.esamp import FUSION_MODES, ESampSettings
from esamp_pl.sampling import CandidateSet
from esamp_pl.sites import SiteCapture

__all__ = ["FUSION_MODES", "DecodeEngine", "DecodeSettings", "DecodeState", "ESampSettings", "GenerationResult",
           "PromptResult", "SampleResult", "StepObservation", "choose_token", "left_pad", "token_logprob"]


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


@dataclass(eq=False)
class _EagerRun(DecodeRun):
    cache: DynamicCache
    attention_mask: torch.Tensor
    "[rows, positions so far]"
    next_position: torch.Tensor
    "[rows, 1]"
    observer: Callable[[StepObservation], None] | None
    decode_steps: int = 0


class DecodeEngine(DecodeLoop):
    """Generates n samples per prompt with plain sampling or ESamp, on any HF decoder-only LM."""

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
        return self._loop(prompt_ids, settings, initial_state, on_prompt_done, on_step, observer)

    def _begin(self, capture, prompt_ids, settings, initial_state, stops, observer) -> tuple[_EagerRun, torch.Tensor]:
        rows, long = len(prompt_ids) * settings.n, dict(dtype=torch.long, device=self.device)
        cache, logits, attention_mask, next_position = self._prefill(capture, prompt_ids, settings.n)
        cache.batch_repeat_interleave(settings.n)
        run = _EagerRun(settings=settings, stops=stops,
                        state=DecodeState.empty(rows, settings.max_new_tokens, self.pad_token_id, self.device),
                        uniforms=self._uniforms(settings, rows), step=torch.zeros(1, **long),
                        input_ids=torch.zeros(rows, 1, **long), truncated=torch.zeros((), **long),
                        esamp=self._esamp_step(settings, len(prompt_ids), initial_state), cache=cache,
                        attention_mask=attention_mask, next_position=next_position, observer=observer)
        return run, logits

    def _decode_step(self, run: _EagerRun, capture: SiteCapture) -> None:
        active = ~run.state.finished
        run.attention_mask = torch.cat([run.attention_mask, torch.ones_like(run.attention_mask[:, :1])], dim=1)
        logits = self._forward(run.input_ids, run.attention_mask, run.next_position, run.cache)
        run.next_position = run.next_position + 1
        source, target = capture.pop()
        run.decode_steps += 1
        esamp = run.esamp
        if esamp is not None:
            esamp.before_prediction()
        observe = None if run.observer is None else partial(_observe, run.observer, run.decode_steps, source,
                                                            target, active)
        self._sample(run, logits, esamp, source, target, active, observe)
        if esamp is not None:
            esamp.after_sampling(source, target, active)

    def _mode(self, run: DecodeRun) -> str:
        return "eager" + (run.esamp.update_label if run.esamp is not None else "")


def _observe(observer: Callable[[StepObservation], None], step: int, source: torch.Tensor, target: torch.Tensor,
             active: torch.Tensor, **parts) -> None:
    observer(StepObservation(step=step, source=source, target=target, active=active, **parts))
