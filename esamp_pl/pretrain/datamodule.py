"""LightningDataModule over cached (source, target) pairs.

``prepare_data`` runs once per node, on its rank 0 (Lightning's contract): it builds or reuses the
pair cache (loading the LM only when it must) and writes the cache folder's path into
``<run_dir>/pairs.json``. ``setup`` runs on every rank and reads the rows from that folder, so no
rank but the first ever loads the LM. Training rows are shuffled single positions; validation
holds out the corpus's last windows (not random positions, so that neighbouring tokens of a
validation window were never trained on).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from esamp_pl.files import write_json_atomic
from esamp_pl.pretrain.data_spec import DataSpec
from esamp_pl.pretrain.pairs import PairCache


class PairRows(Dataset):
    """Rows of (source, target); batched indexing (``__getitems__``) gathers a batch in one call."""

    def __init__(self, source: torch.Tensor, target: torch.Tensor) -> None:
        self.source, self.target = source, target

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source[index], self.target[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.source[index], self.target[index]


def _keep_batch(batch):
    """The dataset already returns a stacked batch."""
    return batch


class PairDataModule(LightningDataModule):
    """Serves pairs from the cache that ``prepare`` builds (or finds)."""

    def __init__(self, prepare: Callable[[], PairCache], spec: DataSpec, run_dir: str | Path) -> None:
        super().__init__()
        self.prepare = prepare
        self.spec = spec
        self.pointer = Path(run_dir) / "pairs.json"
        self.cache: PairCache | None = None
        self._prepared = False  # fit then validate: prepare once per process
        self.train_rows: PairRows | None = None
        self.val_rows: PairRows | None = None

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
        source, target, window = cache.load()
        windows = int(cache.manifest["corpus"]["windows"])
        val_windows = max(1, math.ceil(windows * self.spec.val_fraction))
        is_val = window >= windows - val_windows
        val_index = is_val.nonzero().squeeze(-1)[:self.spec.max_val_rows]
        train_index = (~is_val).nonzero().squeeze(-1)
        if len(train_index) == 0 or len(val_index) == 0:
            raise RuntimeError(f"the corpus has {windows} windows, too few to hold out {val_windows} for "
                               "validation. Fix: add text or lower data.window")
        self.train_rows = PairRows(source[train_index], target[train_index])
        self.val_rows = PairRows(source[val_index], target[val_index])
        self.cache = cache

    def _loader(self, rows: PairRows, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(rows, batch_size=self.spec.batch_size, shuffle=shuffle, drop_last=drop_last,
                          collate_fn=_keep_batch, num_workers=self.spec.num_workers,
                          persistent_workers=self.spec.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        drop_last = len(self.train_rows) >= self.spec.batch_size
        return self._loader(self.train_rows, shuffle=True, drop_last=drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, shuffle=False, drop_last=False)
