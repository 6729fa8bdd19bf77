"""Exploration spent by a KL budget: per row and step, the beta whose tilt costs ``esamp.kl_budget`` nats.

The paper's Eq. 1 is a KL-regularised objective with multiplier alpha = 1 / beta. Fixing the KL
instead of its multiplier is the constrained form of the same problem, and a fair way to compare
Distillers whose errors differ in size: a better predictor errs less, so at equal beta it tilts less.

On the candidate set C, with LM logits l, Distiller logits d and temperature T, ESamp samples from
``pi_beta ∝ exp((l + beta (l - d)) / T)``: an exponential tilt of ``pi_ref = softmax(l / T)`` along
``a = (l - d) / T`` (``d = 0`` for the sharpen-only control). Then

    KL(beta) = KL(pi_beta || pi_ref) = beta E_beta[a] - log E_ref[exp(beta a)]
    dKL/dbeta = beta Var_beta(a) >= 0

so KL is non-decreasing in beta >= 0 (strictly increasing unless ``a`` is constant on C), KL(0) = 0,
and the beta that meets a budget B is unique where it exists. :func:`solve_beta` finds it with a
fixed number of safeguarded Newton steps inside a shrinking bracket [lo, hi] of [0, beta_max]:
only tensor ops on fixed shapes, no host synchronisation, so it runs inside the static engine and
its CUDA graphs. Rows whose KL at beta_max is below the budget take beta_max; rows whose Distiller
logits are not finite take 0 (fusion ignores them anyway).

:class:`BetaRecorder` keeps the realised beta and KL of every row and step in fixed device buffers;
:meth:`BetaRecorder.stats` reads them back once, at the end of a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SOLVER_ITERATIONS = 12
"safeguarded Newton steps per solve; from the quadratic first guess, 4-6 already reach float32 precision"


def _log_probs(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(scores.masked_fill(~keep, -math.inf), dim=-1)


def candidate_kl(new_scores: torch.Tensor, lm_logits: torch.Tensor, keep: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(new / T) || softmax(l / T)) over each row's candidates ``keep`` ([rows, k] -> [rows])."""
    log_new = _log_probs(new_scores.float() / temperature, keep)
    log_ref = _log_probs(lm_logits.float() / temperature, keep)
    return torch.where(keep, log_new.exp() * (log_new - log_ref), 0.0).sum(-1)


def _tilt(log_ref: torch.Tensor, direction: torch.Tensor, keep: torch.Tensor,
          beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(pi_beta || pi_ref), dKL/dbeta = beta Var_beta(a)) per row, for ``beta`` of shape [rows]."""
    log_new = _log_probs(log_ref + beta.unsqueeze(-1) * direction, keep)
    p = log_new.exp()
    kl = torch.where(keep, p * (log_new - log_ref), 0.0).sum(-1).clamp(min=0.0)  # rounding can dip below 0
    mean = (p * direction).sum(-1, keepdim=True)
    variance = (p * (direction - mean).pow(2)).sum(-1)
    return kl, beta * variance


def solve_beta(lm_logits: torch.Tensor, distiller_logits: torch.Tensor, keep: torch.Tensor, *, budget: float,
               beta_max: float, temperature: float = 1.0,
               iterations: int = SOLVER_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, beta in [0, beta_max] with KL(pi_beta || pi_ref) = ``budget`` on the candidates.

    ``lm_logits``, ``distiller_logits`` and ``keep`` are [rows, k] (the candidate space); pass zeros
    as ``distiller_logits`` for the sharpen-only tilt ``(1 + beta) l``. Returns (beta, realised KL),
    both [rows] float32. ``budget = 0`` gives beta = 0 exactly. The solution is unique because KL is
    monotone in beta: dKL/dbeta = beta Var_beta(a) >= 0 for the tilt pi_beta ∝ pi_ref exp(beta a).
    """
    lm = lm_logits.float()
    direction = torch.where(keep, lm - distiller_logits.float(), 0.0) / temperature
    usable = torch.isfinite(direction).all(-1)
    direction = torch.where(usable.unsqueeze(-1), direction, 0.0)
    log_ref = _log_probs(lm / temperature, keep)

    p_ref = log_ref.exp()
    mean_ref = (p_ref * direction).sum(-1, keepdim=True)
    var_ref = (p_ref * (direction - mean_ref).pow(2)).sum(-1)
    # KL(beta) ~ beta^2 Var_ref(a) / 2 near 0: the first guess; Newton refines it.
    guess = torch.sqrt(2.0 * budget / var_ref.clamp(min=1e-30))
    beta = guess.clamp(max=beta_max)
    lo = torch.zeros_like(beta)
    hi = torch.full_like(beta, beta_max)
    for _ in range(iterations):
        kl, slope = _tilt(log_ref, direction, keep, beta)
        gap = kl - budget
        below = gap < 0
        lo = torch.where(below, beta, lo)
        hi = torch.where(below, hi, beta)
        newton = beta - gap / slope
        inside = torch.isfinite(newton) & (newton >= lo) & (newton <= hi)
        beta = torch.where(inside, newton, (lo + hi) / 2)
    kl_max, _ = _tilt(log_ref, direction, keep, torch.full_like(beta, beta_max))
    beta = torch.where(kl_max < budget, beta_max, beta)
    beta = torch.where(usable, beta, 0.0)
    kl, _ = _tilt(log_ref, direction, keep, beta)
    return beta, kl


@dataclass(frozen=True)
class KLBudgetStats:
    """Realised beta and KL over the row-steps a tilt could change (active rows with >= 2 candidates)."""

    budget: float
    "esamp.kl_budget (nats per step)"
    beta_max: float
    row_steps: int
    "row-steps counted"
    beta_mean: float
    beta_quantiles: dict[str, float]
    "q10 / q50 / q90 of the realised beta"
    at_beta_max: float
    "share of the counted row-steps whose KL at beta_max stayed below the budget"
    kl_mean: float
    "mean realised KL(pi_new || pi_ref) per row-step, nats"

    def as_dict(self) -> dict:
        """JSON-ready (rounded; None where nothing was counted)."""
        values = {"budget": self.budget, "beta_max": self.beta_max, "row_steps": self.row_steps,
                  "beta_mean": self.beta_mean, **{f"beta_{k}": v for k, v in self.beta_quantiles.items()},
                  "at_beta_max": self.at_beta_max, "kl_mean": self.kl_mean}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else
                round(v, 6) if isinstance(v, float) else v for k, v in values.items()}


class BetaRecorder:
    """Fixed device buffers [max_steps, rows] of the realised beta and KL; one write per decode step.

    The write position is a device counter (like the adapter's loss curve), so recording is
    CUDA-graph safe; :meth:`reset` starts over in place (the same tensors, so captured graphs stay valid).
    """

    def __init__(self, rows: int, max_steps: int, *, budget: float, beta_max: float,
                 device: torch.device | str = "cpu") -> None:
        self.budget, self.beta_max, self.max_steps = budget, beta_max, max_steps
        self.beta = torch.zeros(max_steps, rows, device=device)
        self.kl = torch.zeros(max_steps, rows, device=device)
        self.counted = torch.zeros(max_steps, rows, dtype=torch.bool, device=device)
        self._position = torch.zeros(1, dtype=torch.long, device=device)

    def reset(self) -> None:
        self.counted.zero_()
        self._position.zero_()

    def record(self, beta: torch.Tensor, kl: torch.Tensor, counted: torch.Tensor) -> None:
        """This step's [rows] beta, KL and which rows count (in place, no host synchronisation)."""
        position = self._position.clamp(max=self.max_steps - 1)
        self.beta.index_copy_(0, position, beta.float().unsqueeze(0))
        self.kl.index_copy_(0, position, kl.float().unsqueeze(0))
        self.counted.index_copy_(0, position, counted.unsqueeze(0))
        self._position += 1

    def stats(self) -> KLBudgetStats:
        """Summary over the counted row-steps (one host synchronisation)."""
        mask = self.counted
        beta, kl = self.beta[mask].double(), self.kl[mask].double()
        count = int(beta.numel())
        if count == 0:
            nan = math.nan
            return KLBudgetStats(self.budget, self.beta_max, 0, nan, {"q10": nan, "q50": nan, "q90": nan}, nan, nan)
        quantiles = torch.quantile(beta, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, device=beta.device))
        return KLBudgetStats(
            budget=self.budget, beta_max=self.beta_max, row_steps=count, beta_mean=float(beta.mean()),
            beta_quantiles=dict(zip(("q10", "q50", "q90"), (float(q) for q in quantiles))),
            at_beta_max=float((beta >= self.beta_max).double().mean()), kl_mean=float(kl.mean()))
