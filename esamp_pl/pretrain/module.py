"""LightningModule that pre-trains one Distiller on corpus hidden states.

It trains the very network generation uses (a :class:`DistillerBank` of one) with the online loss:
mean over rows of ||h - f(s)||^2, summed over hidden dims. Validation reports that loss
(``val/mse``), the relative error sum ||h - f(s)||^2 / sum ||h||^2 (what the engine records per
decode step), and how often the LM head's top-1 token under the prediction equals the one under
the real target (``val/top1_agreement``), each also for the untrained random Distiller
(``*_random``), the init that a warm start replaces.

The network needs the hidden size, and the metric needs the LM head; both come from the data
module's cache in :meth:`setup`, so the module can be built before the data exists.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule

from esamp_pl.distiller import (DistillerBank, DistillerSpec, distiller_loss, relative_error,
                                squared_error)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class DistillerModule(LightningModule):
    """One Distiller, its AdamW optimizer, and the validation metrics."""

    def __init__(self, distiller: dict[str, Any], optimizer: dict[str, Any], warmup_steps: int = 100,
                 min_lr_ratio: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        # Plain dicts only: the Lightning checkpoint then loads with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.spec: DistillerSpec | None = None
        self.bank: DistillerBank | None = None
        self._random: DistillerBank | None = None  # the random init, for comparison; not trained or saved
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._fixed: dict[int, tuple[torch.Tensor, ...]] = {}
        self._sums: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        cache = self.trainer.datamodule.cache
        spec = DistillerSpec(**{**self.hparams.distiller, "hidden_size": cache.hidden_size})
        if self.spec is not None and self.spec != spec:
            raise RuntimeError(f"the data changed hidden size: {self.spec} vs {spec}")
        self.spec = spec
        weight, bias, _softcap = cache.head()  # softcap is monotone: top-1 does not depend on it
        self._head = (weight.float(), bias.float() if bias is not None else None)
        self._build()

    def configure_model(self) -> None:
        self._build()

    def _build(self) -> None:
        if self.bank is not None or self.spec is None:
            return
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.bank = DistillerBank(self.spec, 1, generator=generator)
        self._random = DistillerBank(self.spec, 1, generator=torch.Generator().manual_seed(self.hparams.seed))
        self._random.requires_grad_(False)

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        return self.bank(source.unsqueeze(0)).squeeze(0)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        source, target = batch
        loss = distiller_loss(self(source.float()), target)
        self.log("train/mse", loss, prog_bar=True, batch_size=len(source))
        return loss

    def _top1(self, hidden: torch.Tensor) -> torch.Tensor:
        weight, bias = self._head
        if weight.device != hidden.device:
            weight = weight.to(hidden.device)
            bias = bias.to(hidden.device) if bias is not None else None
            self._head = (weight, bias)
        logits = hidden.float() @ weight.T
        if bias is not None:
            logits = logits + bias
        return logits.argmax(-1)

    def on_validation_epoch_start(self) -> None:
        # sums of: sq error, sq error (random), ||h||^2, top-1 agreements, agreements (random), rows
        self._sums = torch.zeros(6, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        source, target = batch
        source, target = source.float(), target.float()
        if batch_idx not in self._fixed:  # the target's top-1 and the random Distiller's scores never change
            self._random.to(source.device)
            with torch.no_grad():
                random_pred = self._random(source.unsqueeze(0)).squeeze(0).float()
            true_top1 = self._top1(target)
            self._fixed[batch_idx] = (true_top1, squared_error(random_pred, target).sum(),
                                      (self._top1(random_pred) == true_top1).sum())
        true_top1, random_sq, random_agree = self._fixed[batch_idx]
        prediction = self(source).float()
        self._sums += torch.stack([
            squared_error(prediction, target).sum(), random_sq, target.pow(2).sum(),
            (self._top1(prediction) == true_top1).sum(), random_agree,
            torch.tensor(float(len(source)), device=self.device)]).to(self._sums)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._sums, reduce_op="sum")
        sq, sq_random, norm, agree, agree_random, rows = sums.tolist()
        rows = max(rows, 1.0)
        metrics = {"val/mse": sq / rows, "val/mse_random": sq_random / rows,
                   "val/relative_error": relative_error(sq, norm), "val/relative_error_random": relative_error(sq_random, norm),
                   "val/top1_agreement": agree / rows, "val/top1_agreement_random": agree_random / rows}
        # Already summed over ranks; sync_dist only keeps Lightning's bookkeeping consistent.
        self.log_dict(metrics, sync_dist=True)
        self.log("val_mse", metrics["val/mse"], prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, _partial_=True, _convert_="all")(params=self.bank.parameters())
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10_000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(self.hparams.warmup_steps, total, self.hparams.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
