"""The test-time adapter: a bank of Distillers that learns online while the LM decodes.

Per decode step (spec, "Per decode step"): :meth:`TestTimeAdapter.predict` maps this step's
source states to predicted targets with the parameters learned up to the previous step; after
the token is sampled, :meth:`TestTimeAdapter.update` takes one optimizer step per Distiller on
this step's (source, target) pairs, so the update first affects the next step (Alg. 1).

The prediction's activations are kept and reused by the update: both use the same parameters
and the same sources, so the loss needs no second Distiller forward. The gradient is written out
by hand (:mod:`esamp_pl.distiller_grad`, checked against autograd): for a network this small,
autograd's bookkeeping would cost more than the arithmetic.

All counters live on the device and are read once at the end, so a step never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esamp_pl.distiller import DistillerBank, DistillerSpec, relative_error, squared_error
from esamp_pl.distiller_grad import DistillerGrad
from esamp_pl.optim import AdamSpec, BankAdam
from esamp_pl.pair_ring import PairRing

SCOPES = ("per_prompt", "shared")
TRAINED_ROWS = ("all", "first")
UPDATE_MODES = ("sync", "async")


@dataclass(frozen=True)
class AdapterSpec:
    """How the online Distillers are organised and trained."""

    distiller: DistillerSpec
    optimizer: AdamSpec = field(default_factory=AdamSpec)
    scope: str = "per_prompt"
    "per_prompt: one Distiller shared by a prompt's n samples (paper); shared: one for the whole batch"
    rows_trained: str = "all"
    "all: every unfinished sample trains its prompt's Distiller; first: only the first unfinished sample of each\
 prompt (the reference code's fast mode)"
    learn: bool = True
    "False freezes the Distillers (a control that isolates online learning)"
    update_mode: str = "async"
    "async: the update overlaps the next forward (worker thread / CUDA side stream); sync: inline. Same tokens"
    update_every: int = 1
    "k: one update every k decode steps on the pairs of those k steps (pair_ring.py); 1 = every step (paper)"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"esamp.scope must be one of {SCOPES}, but is {self.scope!r}")
        if self.rows_trained not in TRAINED_ROWS:
            raise ValueError(f"esamp.rows_trained must be one of {TRAINED_ROWS}, but is {self.rows_trained!r}")
        if self.update_mode not in UPDATE_MODES:
            raise ValueError(f"esamp.update_mode must be one of {UPDATE_MODES}, but is {self.update_mode!r}")
        if isinstance(self.update_every, bool) or not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"esamp.update_every must be an integer >= 1 (1 = update every step, the paper), "
                             f"but is {self.update_every!r}")


@dataclass
class AdapterStats:
    """What the adapter did, read back from the device once."""

    updates: int
    "Distiller optimizer steps performed (one per Distiller per step it had rows to learn from)"
    skipped_nonfinite: int
    "Distiller steps skipped because none of its rows had finite states, or its gradient was not finite"
    loss_per_step: list[float]
    "mean ||h - f(s)||^2 over the trained finite rows, per update that had rows to train (before it; one per\
 decode step unless update_every > 1); NaN for an update whose rows were all non-finite (nothing was measured)"
    relative_error_per_step: list[float]
    "sum ||h - f(s)||^2 / sum ||h||^2 over the trained finite rows, per update; NaN as above"


class TestTimeAdapter:
    """A bank of Distillers (one per prompt, or one shared) with its online optimizer."""

    __test__ = False  # not a pytest class

    def __init__(self, spec: AdapterSpec, num_prompts: int, samples_per_prompt: int, *,
                 device: torch.device | str = "cpu", generator: torch.Generator | None = None,
                 max_steps: int | None = None) -> None:
        """``max_steps`` (the decode steps to come) pre-allocates the loss curves on the device, so that an
        update writes into fixed memory (CUDA-graph friendly); None grows them as Python lists."""
        self.spec = spec
        self.num_prompts = num_prompts
        self.samples_per_prompt = samples_per_prompt
        self.rows = num_prompts * samples_per_prompt
        num_distillers = num_prompts if spec.scope == "per_prompt" else 1
        self.bank = DistillerBank(spec.distiller, num_distillers, device=device, generator=generator)
        self.optimizer = BankAdam(list(self.bank.parameters()), spec.optimizer)
        self._grad = DistillerGrad(self.bank)
        self._pending: tuple[torch.Tensor, tuple | None, torch.Tensor] | None = None
        self.updates = torch.zeros((), dtype=torch.long, device=device)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        # Per step: (mean squared error, relative error) of the trained rows, and whether any row trained.
        self._history: list[torch.Tensor] = []
        self._history_buffer = None if max_steps is None else torch.zeros(max_steps, 3, device=device)
        self._history_len = torch.zeros(1, dtype=torch.long, device=device)
        self.ring = PairRing(spec.update_every, num_distillers) if spec.update_every > 1 else None
        "esamp.update_every > 1: the pairs of the current block (the updater writes and trains on it)"
        self.keeps_activations = True
        "predict() keeps the activations update() reuses; an updater that recomputes the forward turns it off"

    def _trained_rows(self, active_rows: torch.Tensor) -> torch.Tensor:
        """The rows that train this step: every active row, or (``first``) each prompt's first active one."""
        if self.spec.rows_trained == "all":
            return active_rows
        # Groups of one prompt's samples at one step: [rows] of a step, or a block's [k * rows] (pair_ring.py).
        per_prompt = active_rows.view(-1, self.samples_per_prompt)
        return (per_prompt & (per_prompt.cumsum(-1) == 1)).view(-1)

    def _grouped(self, rows: torch.Tensor) -> torch.Tensor:
        """[rows, ...] -> [num_distillers, rows per Distiller, ...] (rows are prompt-major)."""
        return rows.reshape(self.bank.num_distillers, -1, *rows.shape[1:])

    def load_initial_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy one Distiller (warm start or svd init) into every slot, with a fresh optimizer."""
        self.bank.load_single(state)
        self.optimizer.reset()

    def restart(self, generator: torch.Generator | None = None,
                initial_state: dict[str, torch.Tensor] | None = None) -> None:
        """Start over in place (same tensors, so captured CUDA graphs stay valid): fresh Distillers drawn
        from ``generator`` exactly as a new adapter would, or ``initial_state``; zeroed moments and counters."""
        self.bank.reset_parameters(generator)
        if initial_state is not None:
            self.bank.load_single(initial_state)
        self.optimizer.reset()
        for counter in (self.updates, self.skipped, self._history_len):
            counter.zero_()
        self._history.clear()
        self._pending = None
        if self.ring is not None:
            self.ring.reset()

    @staticmethod
    def _clean(source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A non-finite source row is zeroed for the bank (so it cannot poison the gradients of the
        # other rows of its Distiller); the caller reports its prediction as NaN, which fusion ignores.
        source = source.float()
        finite = _finite_rows(source)
        return _zero_rows(source, finite), finite

    def predict(self, source: torch.Tensor, *, for_update: bool | None = None) -> torch.Tensor:
        """Predicted targets ``[rows, hidden]`` for this step's ``source`` ``[rows, hidden]``.

        It keeps what :meth:`update` needs (the prediction's activations) when ``for_update`` says so,
        by default when :attr:`keeps_activations` does (the updater sets it); without them the
        prediction is a plain forward and the step's update must go through :meth:`update_on`.
        """
        keep = self.keeps_activations if for_update is None else for_update
        source, finite = self._clean(source)
        prediction, saved = self._forward(source, keep=keep)
        self._pending = (prediction, saved, finite) if keep else None
        return prediction + torch.where(finite, 0.0, float("nan")).unsqueeze(-1)  # NaN rows where not finite

    def _forward(self, source: torch.Tensor, *, keep: bool) -> tuple[torch.Tensor, tuple | None]:
        prediction, saved = self._grad.forward(self._grouped(source), keep=keep and self.spec.learn)
        return prediction.reshape(-1, prediction.shape[-1]), saved

    def update(self, target: torch.Tensor, active_rows: torch.Tensor) -> None:
        """One optimizer step per Distiller on this step's pairs of ``active_rows`` ([rows] bool)."""
        if self._pending is None:
            raise RuntimeError("update() needs the prediction of the same step: call predict() first")
        prediction, saved, finite = self._pending
        self._pending = None
        self._update(prediction, saved, finite, target, active_rows)

    def update_on(self, source: torch.Tensor, target: torch.Tensor, active_rows: torch.Tensor) -> None:
        """The same step as ``predict(source)`` then ``update(target, active_rows)``, from the pair alone.

        It recomputes the (cheap) Distiller forward, for callers whose prediction ran elsewhere: a
        captured CUDA graph, or another stream.
        """
        source, finite = self._clean(source)
        self._update(*self._forward(source, keep=True), finite, target, active_rows)

    def update_block(self) -> None:
        """One optimizer step per Distiller on the pairs of the ring's last k steps (``update_every`` = k):
        its loss is the mean over those steps' trained rows, as if they were one step of k times the rows."""
        source, target, active = self.ring.block()
        source, finite = self._clean(source)
        self._update(*self._forward(source, keep=True), finite, target, active)

    @torch.no_grad()
    def _update(self, prediction, saved, finite_source, target, active_rows) -> None:
        # A row whose states (or error) are not finite is dropped; its Distiller learns from its other rows.
        target = target.float()
        rows = self._trained_rows(active_rows)
        finite_row = _finite_rows(target) & finite_source
        target = _zero_rows(target, finite_row)
        error = prediction - target
        sq_error = squared_error(prediction, target)
        valid = rows & finite_row & torch.isfinite(sq_error)
        error = _zero_rows(error, valid)
        safe_error = torch.where(valid, sq_error, 0.0)
        valid_per_distiller = self._grouped(valid).sum(-1)
        has_rows = self._grouped(rows).any(-1)
        learn_mask = valid_per_distiller > 0

        # Rows to train but none finite: NaN, never 0.0 (which would read as a perfect Distiller). A step with
        # no row to train at all (every sample finished) is left out of the curves.
        count = valid.sum()
        total_error = safe_error.sum()
        target_norm = torch.where(valid, target.pow(2).sum(-1), 0.0).sum()
        measured = torch.stack([total_error / count.clamp(min=1), relative_error(total_error, target_norm)])
        measured = torch.where(count > 0, measured, torch.full_like(measured, float("nan")))
        self._record(torch.cat([measured, rows.any().to(measured.dtype).unsqueeze(0)]))

        if not self.spec.learn:
            self.skipped += (has_rows & ~learn_mask).sum()
            return
        # d(sum over Distillers of their mean squared error) / d prediction: 2 (f(s) - h) / rows, on valid rows.
        row_weight = self._grouped(valid) * (2.0 / valid_per_distiller.clamp(min=1)).unsqueeze(-1)
        grads = self._grad.backward(saved, self._grouped(error) * row_weight.unsqueeze(-1))
        stepped = self.optimizer.step(grads, learn_mask)
        self.updates += stepped.sum()
        self.skipped += (has_rows & ~stepped).sum()  # no finite row, or a non-finite gradient

    def _record(self, values: torch.Tensor) -> None:
        if self._history_buffer is None:
            self._history.append(values)
        else:
            self._history_buffer.index_copy_(0, self._history_len, values.unsqueeze(0))
            self._history_len += 1

    def stats(self) -> AdapterStats:
        """Counters and curves, read from the device (one synchronisation, at the end)."""
        if self._history_buffer is None:
            curves = torch.stack(self._history).tolist() if self._history else []
        else:
            curves = self._history_buffer[:int(self._history_len)].tolist()
        curves = [c for c in curves if c[2] > 0]
        return AdapterStats(updates=int(self.updates), skipped_nonfinite=int(self.skipped),
                            loss_per_step=[c[0] for c in curves], relative_error_per_step=[c[1] for c in curves])


# Row masks written for speed on tiny CPU tensors (the online step is a hundred of them, each of whose fixed cost
# counts): isfinite(...).all(-1) and masked_fill cost ~5x these on a [32, 576] tensor.

def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[rows] bool: the rows of ``x`` [rows, d] whose entries are all finite (a non-finite entry makes the
    row's sum non-finite; so does a sum that overflows, and such a row is treated as non-finite too)."""
    return x.sum(-1).isfinite()


def _zero_rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, d] with the rows outside ``keep`` [rows] set to 0, NaN and inf included."""
    return x.nan_to_num(0.0, 0.0, 0.0) * keep.unsqueeze(-1)
