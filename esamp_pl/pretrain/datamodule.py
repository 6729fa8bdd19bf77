"""LightningDataModule over cached (source, target) pairs.

``prepare_data`` runs once per node, on its rank 0 (Lightning's contract): it builds or reuses the
pair cache (loading the LM only when it must) and writes the cache folder's path into
``<run_dir>/pairs.json``. ``setup`` runs on every rank and opens that folder, so no rank but the
first ever loads the LM. Training rows are shuffled single positions; validation holds out the
corpus's last windows (not random positions, so that neighbouring tokens of a validation window
were never trained on). Both stream from the cache's shards (:class:`StreamingPairs`): memory is a
shard or two, whatever the corpus size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from esamp_pl.files import write_json_atomic
from esamp_pl.pretrain.data_spec import DataSpec
from esamp_pl.pretrain.pairs import PairCache
from esamp_pl.pretrain.shards import StreamingPairs


class PairDataModule(LightningDataModule):
    """Serves pairs from the cache that ``prepare`` builds (or finds)."""

    def __init__(self, prepare: Callable[[], PairCache], spec: DataSpec, run_dir: str | Path) -> None:
        super().__init__()
        self.prepare = prepare
        self.spec = spec
        self.pointer = Path(run_dir) / "pairs.json"
        self.cache: PairCache | None = None
        self._prepared = False  # fit then validate: prepare once per process
        self.train_rows: StreamingPairs | None = None
        self.val_rows: StreamingPairs | None = None

    def prepare_data(self) -> None:
        if self._prepared:
            return
        cache = self.prepare()
        write_json_atomic(self.pointer, {"folder": str(cache.folder), "key": cache.manifest["key"]})
        self._prepared = True

    def setup(self, stage: str | None = None) -> None:
        if self.cache is not None:
            return
        pointer = json.loads(self.pointer.read_text())
        cache = PairCache.open(pointer["folder"], pointer["key"])
        if cache is None:
            raise RuntimeError(f"the pair cache {pointer['folder']} named in {self.pointer} is missing or incomplete; "
                               "run again to rebuild it")
        windows = int(cache.manifest["corpus"]["windows"])
        val_windows = max(1, math.ceil(windows * self.spec.val_fraction))
        shards, batch = cache.manifest["shards"], self.spec.batch_size
        self.train_rows = StreamingPairs(cache.folder, shards, batch, shuffle=True, seed=self.spec.seed,
                                         window_range=(0, windows - val_windows))
        self.train_rows.drop_last = self.train_rows.rows >= batch
        self.val_rows = StreamingPairs(cache.folder, shards, batch, shuffle=False,
                                       window_range=(windows - val_windows, windows), max_rows=self.spec.max_val_rows)
        if self.train_rows.rows == 0 or self.val_rows.rows == 0:
            raise RuntimeError(f"the corpus has {windows} windows, too few to hold out {val_windows} for "
                               "validation. Fix: add text or lower data.window")
        self.cache = cache

    def _loader(self, rows: StreamingPairs) -> DataLoader:
        return DataLoader(rows, batch_size=None, num_workers=self.spec.num_workers,
                          persistent_workers=self.spec.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_rows)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows)
