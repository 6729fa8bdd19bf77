"""Pairs per second through pre-training: a Lightning callback that logs and prints the training rate.

The rate is what tells whether a corpus of a given size fits a budget; it is measured over the
training batches only (validation and checkpoint writing excluded) and printed once at the end.
"""

from __future__ import annotations

import logging
import time

from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class PairThroughput(Callback):
    """Logs ``train/pairs_per_s`` per batch and prints the run's mean rate when training ends."""

    def __init__(self) -> None:
        self.pairs = 0
        self.seconds = 0.0
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._started is None:
            return
        seconds = time.perf_counter() - self._started
        pairs = len(batch[0])
        self.pairs += pairs
        self.seconds += seconds
        pl_module.log("train/pairs_per_s", pairs / max(seconds, 1e-9), batch_size=pairs)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.pairs:
            log.info("trained on %d pairs in %.1f s of training steps: %.0f pairs/s", self.pairs, self.seconds,
                     self.pairs / max(self.seconds, 1e-9))
