"""ESamp inside a decode step: the fused scores of the candidates, and the Distiller update after sampling.

:class:`ESampStep` is the one place the ESamp formula lives (spec Eq. 7 and its variants): the
fusion ``(1 + beta) l - beta d`` with ``d`` the LM head applied to the Distiller's prediction, the
sharpen-only control ``(1 + beta) l`` (no Distiller), beta fixed or solved per row for a KL budget
(:mod:`esamp_pl.kl_budget`), and the error the tilt follows (:mod:`esamp_pl.error_signal`). It owns
the test-time adapter (the Distillers), the updater (where their update runs) and the LM head, so
a decode engine only calls, per step::

    before_prediction()                            # the previous step's update is applied
    scores(candidates, source, target, active)     # the scores to sample from
    after_sampling(source, target, active)         # stage this step's pairs, launch the update

(a CUDA-graphed engine calls ``stage`` inside its captured half and ``launch`` after it), and hands
:attr:`ESampStep.source_hook` to its site capture, so that on a CPU worker the prediction starts as
soon as the source state exists, beside the rest of the forward. Whether
the prediction keeps its activations for the update is the updater's business
(:mod:`esamp_pl.async_update`), not the engine's. No host synchronisation anywhere in a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from esamp_pl.adapter import AdapterSpec, AdapterStats, TestTimeAdapter
from esamp_pl.async_update import StreamUpdater, make_updater
from esamp_pl.error_signal import ERROR_KINDS, prediction_for_fusion
from esamp_pl.kl_budget import BetaRecorder, KLBudgetStats, solve_beta
from esamp_pl.sampling import CandidateSet, SamplingParams, fuse
from esamp_pl.sites import OutputHead

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


class ESampStep:
    """ESamp for one generation: scores for the candidates, and the Distiller update after sampling.

    Rows are prompt-major (``samples_per_prompt`` per prompt). ``max_steps`` sizes the device
    buffers (loss curves, realised betas) so that a step writes into fixed memory; ``cuda_graphs``
    asks for an updater whose update can be captured (CUDA); ``compact_projection`` projects the
    Distiller's prediction on the kept candidates only (the widening candidate path; the scores
    outside the candidate set are then not meaningful, and the sampler masks them).
    """

    def __init__(self, settings: ESampSettings, sampling: SamplingParams, head: OutputHead, *, num_prompts: int,
                 samples_per_prompt: int, max_steps: int, seed: int, device: torch.device,
                 initial_state: dict[str, torch.Tensor] | None = None, cuda_graphs: bool = False,
                 compact_projection: bool = False) -> None:
        self.settings = settings
        self.head = head
        self.compact_projection = compact_projection
        "project only the union of the kept candidates (OutputHead.logits_in_set; dynamic shapes: not for CUDA graphs)"
        self.temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        self.adapter: TestTimeAdapter | None = None
        self.updater = None
        if settings.uses_distiller:
            self.adapter = TestTimeAdapter(settings.adapter, num_prompts, samples_per_prompt, device=device,
                                           generator=_init_generator(seed), max_steps=max_steps)
            if initial_state is not None:
                self.adapter.load_initial_state(initial_state)
            self.updater = make_updater(self.adapter, settings.adapter.update_mode, device=device,
                                        cuda_graphs=cuda_graphs)
        self.betas = None if settings.kl_budget is None else BetaRecorder(
            num_prompts * samples_per_prompt, max_steps, budget=settings.kl_budget, beta_max=settings.beta_max,
            device=device)
        self.prediction: torch.Tensor | None = None
        "f(s) of the latest :meth:`scores` call (for observers); None without a Distiller"

    # -- one decode step -------------------------------------------------------------------------------------

    def before_prediction(self) -> None:
        """Wait for the update launched on the previous step (the prediction must see it: lag 0)."""
        if self.updater is not None:
            self.updater.wait()

    def scores(self, candidates: CandidateSet, source: torch.Tensor | None, target: torch.Tensor | None,
               active: torch.Tensor | None) -> torch.Tensor:
        """The scores ``[rows, k]`` to sample the candidates from (temperature applied by the sampler).

        ``source`` and ``target`` are this step's states ``[rows, d]`` (the Distiller's input and the
        state it predicts), ``active`` ``[rows]`` the unfinished rows: they train, count towards the
        realised beta and the relative error's mean.
        """
        settings = self.settings
        self.prediction = None
        if self.adapter is None:  # sharpen-only: d = 0
            return (1.0 + self._beta(candidates, None, active)) * candidates.logits.float()
        early = self.updater.take_prediction()
        self.prediction = self.adapter.predict(source) if early is None else early
        if not settings.tilts:
            return candidates.logits
        tilted = prediction_for_fusion(self.prediction, target, active, self.adapter.samples_per_prompt,
                                       settings.error)
        distiller_logits = candidate_logits(self.head, tilted, candidates, compact=self.compact_projection).float()
        return fuse(candidates.logits.float(), distiller_logits, self._beta(candidates, distiller_logits, active))

    def _beta(self, candidates: CandidateSet, distiller_logits: torch.Tensor | None,
              active: torch.Tensor | None) -> float | torch.Tensor:
        """``esamp.beta``, or with ``esamp.kl_budget`` the per-row beta ([rows, 1]) that spends the budget.

        ``distiller_logits`` None is the sharpen-only tilt (d = 0)."""
        settings = self.settings
        if settings.kl_budget is None:
            return settings.beta
        if distiller_logits is None:
            distiller_logits = torch.zeros_like(candidates.logits, dtype=torch.float32)
        beta, kl = solve_beta(candidates.logits, distiller_logits, candidates.keep, budget=settings.kl_budget,
                              beta_max=settings.beta_max, temperature=self.temperature)
        tiltable = candidates.size > 1  # beta can change the distribution
        self.betas.record(beta, kl, tiltable if active is None else tiltable & active)
        return beta.unsqueeze(-1)

    @property
    def source_hook(self) -> Callable[[torch.Tensor], None] | None:
        """What the engine's :class:`SiteCapture` calls with a decode step's source state, so that the
        prediction starts beside the rest of the forward (a CPU worker); None where it runs in the step."""
        if self.updater is not None and self.updater.predicts_early:
            return self.updater.predict_early
        return None

    def stage(self, source: torch.Tensor, target: torch.Tensor, active: torch.Tensor) -> None:
        """Hand this step's pairs to the updater (device copies only: capturable in a CUDA graph)."""
        if self.updater is not None:
            self.updater.stage(source, target, active)

    def launch(self) -> None:
        """Start the update on the staged pairs (inline, worker thread or side stream)."""
        if self.updater is not None:
            self.updater.launch()

    def after_sampling(self, source: torch.Tensor, target: torch.Tensor, active: torch.Tensor) -> None:
        """The update on this step's pairs of ``active`` rows; it first affects the next step's prediction."""
        self.stage(source, target, active)
        self.launch()

    # -- life cycle ------------------------------------------------------------------------------------------

    def restart(self, seed: int, initial_state: dict[str, torch.Tensor] | None) -> None:
        """Start a new generation in place (same tensors, so captured CUDA graphs stay valid)."""
        if self.betas is not None:
            self.betas.reset()
        if self.adapter is not None:
            self.adapter.restart(_init_generator(seed), initial_state)

    def capture_update(self) -> None:
        """Capture the update as a CUDA graph on its side stream (CUDA updaters only)."""
        if isinstance(self.updater, StreamUpdater):
            self.updater.capture()  # its own pool: it may run concurrently with the forward graph

    def drop_update_graph(self) -> None:
        if isinstance(self.updater, StreamUpdater):
            self.updater.drop_graph()

    def close(self) -> None:
        """Apply the last update and release the updater's worker."""
        if self.updater is not None:
            self.updater.close()

    @property
    def update_label(self) -> str:
        """For ``GenerationResult.mode``: where the update runs, or '' without a Distiller."""
        return f", {self.settings.adapter.update_mode} update" if self.adapter is not None else ""

    def stats(self) -> AdapterStats | None:
        """The adapter's counters and curves (one host read), None without a Distiller."""
        return self.adapter.stats() if self.adapter is not None else None

    def kl_stats(self) -> KLBudgetStats | None:
        """Realised beta and KL (one host read), None without a KL budget."""
        return self.betas.stats() if self.betas is not None else None


def candidate_logits(head: OutputHead, hidden: torch.Tensor, candidates: CandidateSet, *,
                     compact: bool) -> torch.Tensor:
    """The head's logits of ``hidden`` [rows, d] at the candidates ([rows, k]): with ``compact`` only the union of
    the kept ones is projected (dynamic shapes: the widening path), else every candidate (fixed shapes: CUDA
    graphs); outside the candidate set the values are not meaningful (the sampler masks them)."""
    if compact:
        return head.logits_in_set(hidden, candidates.token_ids, candidates.keep)
    return head.logits_at(hidden, candidates.token_ids)


def _init_generator(seed: int) -> torch.Generator:
    # The Distillers' init has its own stream (seed + 1): the sampler's uniforms must not shift with it.
    return torch.Generator().manual_seed(seed + 1)
