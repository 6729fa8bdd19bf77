"""The test-time adapter: a bank of Distillers that learns online while the LM decodes.

Per decode step (spec, "Per decode step"): :meth:`TestTimeAdapter.predict` maps this step's
source states to predicted targets with the parameters learned up to the previous step; after
the token is sampled, :meth:`TestTimeAdapter.update` takes one optimizer step per Distiller on
this step's (source, target) pairs, so the update first affects the next step (Alg. 1).

The prediction's autograd graph is kept and reused by the update: both use the same parameters
and the same sources, so the loss needs no second Distiller forward.

All counters live on the device and are read once at the end, so a step never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esamp_pl.distiller import DistillerBank, DistillerSpec
from esamp_pl.optim import AdamSpec, BankAdam

SCOPES = ("per_prompt", "shared")
TRAINED_ROWS = ("all", "first")


@dataclass(frozen=True)
class AdapterSpec:
    """How the online Distillers are organised and trained."""

    distiller: DistillerSpec
    optimizer: AdamSpec = field(default_factory=AdamSpec)
    scope: str = "per_prompt"
    "per_prompt: one Distiller shared by a prompt's n samples (paper); shared: one for the whole batch"
    rows_trained: str = "all"
    "all: every unfinished sample trains its prompt's Distiller; first: only sample 0 (reference fast mode)"
    learn: bool = True
    "False freezes the Distillers (a control that isolates online learning)"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"esamp.scope must be one of {SCOPES}, but is {self.scope!r}")
        if self.rows_trained not in TRAINED_ROWS:
            raise ValueError(f"esamp.rows_trained must be one of {TRAINED_ROWS}, but is {self.rows_trained!r}")


@dataclass
class AdapterStats:
    """What the adapter did, read back from the device once."""

    updates: int
    "Distiller optimizer steps performed (one per Distiller per step it had rows to learn from)"
    skipped_nonfinite: int
    "Distiller steps skipped because a loss or hidden state was not finite"
    loss_per_step: list[float]
    "mean ||h - f(s)||^2 over the trained rows, per decode step (before that step's update)"
    relative_error_per_step: list[float]
    "sum ||h - f(s)||^2 / sum ||h||^2 over the trained rows, per decode step"


class TestTimeAdapter:
    """A bank of Distillers (one per prompt, or one shared) with its online optimizer."""

    __test__ = False  # not a pytest class

    def __init__(self, spec: AdapterSpec, num_prompts: int, samples_per_prompt: int, *,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> None:
        self.spec = spec
        self.num_prompts = num_prompts
        self.samples_per_prompt = samples_per_prompt
        self.rows = num_prompts * samples_per_prompt
        num_distillers = num_prompts if spec.scope == "per_prompt" else 1
        self.bank = DistillerBank(spec.distiller, num_distillers, device=device, generator=generator)
        self.optimizer = BankAdam(list(self.bank.parameters()), spec.optimizer)
        sample_index = torch.arange(self.rows, device=device) % samples_per_prompt
        self.trainable_rows = sample_index == 0 if spec.rows_trained == "first" else torch.ones_like(
            sample_index, dtype=torch.bool)
        self._prediction: torch.Tensor | None = None
        self._source: torch.Tensor | None = None
        self._finite_source: torch.Tensor | None = None
        self.updates = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self._loss_history: list[torch.Tensor] = []
        self._relative_history: list[torch.Tensor] = []

    def _grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [num_distillers, rows per Distiller, ...] (rows are prompt-major)."""
        return rows.reshape(self.bank.num_distillers, -1, *rows.shape[1:])

    def load_initial_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy one Distiller (warm start or svd init) into every slot, with a fresh optimizer."""
        self.bank.load_single(state)
        self.optimizer.reset()

    def predict(self, source: torch.Tensor) -> torch.Tensor:
        """Predicted targets ``[rows, hidden]`` for this step's ``source`` ``[rows, hidden]``."""
        source = source.float()
        # A non-finite source row is zeroed for the bank (so it cannot poison the gradients of the
        # other rows of its Distiller) and its prediction is reported as NaN, which fusion ignores.
        finite_source = torch.isfinite(source).all(-1, keepdim=True)
        source = torch.where(finite_source, source, torch.zeros_like(source))
        with torch.set_grad_enabled(self.spec.learn):
            prediction = self.bank(self._grouped(source)).reshape(self.rows, -1)
        self._prediction = prediction if self.spec.learn else None
        self._source = source
        self._finite_source = finite_source.squeeze(-1)
        return torch.where(finite_source, prediction.detach(), torch.full_like(prediction, float("nan")))

    def update(self, target: torch.Tensor, active_rows: torch.Tensor) -> None:
        """One optimizer step per Distiller on this step's pairs of ``active_rows`` ([rows] bool)."""
        with torch.enable_grad():
            self._update(target, active_rows)

    def _update(self, target: torch.Tensor, active_rows: torch.Tensor) -> None:
        if self._source is None:
            raise RuntimeError("update() needs the prediction of the same step: call predict() first")
        prediction, source, finite_source = self._prediction, self._source, self._finite_source
        self._prediction = self._source = self._finite_source = None
        target = target.float()
        rows = active_rows & self.trainable_rows
        finite_row = torch.isfinite(target).all(-1) & finite_source
        target = torch.where(finite_row.unsqueeze(-1), target, torch.zeros_like(target))
        if prediction is None:  # frozen: measure only
            with torch.no_grad():
                prediction = self.bank(self._grouped(source)).reshape(self.rows, -1)
        sq_error = (target - prediction).pow(2).sum(-1)
        finite_row &= torch.isfinite(sq_error)
        weight = rows.float()
        safe_error = torch.where(rows & finite_row, sq_error, torch.zeros_like(sq_error))
        rows_per_distiller = self._grouped(weight).sum(-1)
        loss_per_distiller = self._grouped(safe_error).sum(-1) / rows_per_distiller.clamp(min=1.0)
        has_rows = rows_per_distiller > 0
        all_finite = self._grouped((finite_row | ~rows).float()).prod(-1) > 0
        learn_mask = has_rows & all_finite

        with torch.no_grad():
            total_rows = weight.sum().clamp(min=1.0)
            valid = rows & finite_row
            self._loss_history.append(torch.where(valid, sq_error, 0.0).sum().detach() / total_rows)
            target_norm = torch.where(valid, target.pow(2).sum(-1), 0.0).sum().clamp(min=1e-12)
            self._relative_history.append(torch.where(valid, sq_error, 0.0).sum().detach() / target_norm)
            self.skipped += (has_rows & ~all_finite).sum()

        if not self.spec.learn:
            return
        params = list(self.bank.parameters())
        grads = torch.autograd.grad(loss_per_distiller.sum(), params)
        grads = [torch.where(torch.isfinite(g), g, torch.zeros_like(g)) for g in grads]
        self.optimizer.step(grads, learn_mask)
        self.updates += learn_mask.sum()

    def stats(self) -> AdapterStats:
        """Counters and curves, read from the device (one synchronisation, at the end)."""
        loss = torch.stack(self._loss_history).tolist() if self._loss_history else []
        relative = torch.stack(self._relative_history).tolist() if self._relative_history else []
        return AdapterStats(updates=int(self.updates), skipped_nonfinite=int(self.skipped),
                            loss_per_step=loss, relative_error_per_step=relative)
