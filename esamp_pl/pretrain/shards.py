"""Rows of tensors on disk as safetensors shards plus a JSON index, written and read with bounded memory.

Pre-training data grows with the corpus (two hidden states per token: ~16 GB per million tokens for
an 8B model in float16), so nothing here ever holds more than a shard or two:

* :class:`ShardWriter` buffers rows and writes a shard every ``shard_rows`` rows, into a temporary
  folder that is renamed when the index is written, so a crash never leaves a store that looks complete;
* :class:`ShardStore` reads any row range lazily (``safe_open`` slices), so an episode or a
  validation tail costs its own size only;
* :class:`StreamingPairs` is the training stream: shards in a seeded order, rows shuffled within a
  shard (left-over rows carried into the next), split across DDP ranks and DataLoader workers so
  every consumer gets the same number of batches.

The pair cache of :mod:`esamp_pl.pretrain.pairs` has the same layout (``{"shards": [{"file",
"rows"}]}`` in its manifest), so :class:`StreamingPairs` streams it as it is.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import IterableDataset, get_worker_info

FORMAT = "esamp_pl.shards/1"
INDEX = "index.json"


class ShardWriter:
    """Appends rows (equal-length tensors per column) and writes them as shards of ``shard_rows`` rows."""

    def __init__(self, folder: str | Path, *, shard_rows: int = 65536) -> None:
        if shard_rows < 1:
            raise ValueError(f"shard_rows must be a positive integer, but is {shard_rows}")
        self.folder = Path(folder)
        self.shard_rows = shard_rows
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.folder.name}-", dir=self.folder.parent))
        self._buffer: list[dict[str, torch.Tensor]] = []
        self._buffered = 0
        self.shards: list[dict[str, Any]] = []
        self.rows = 0
        "rows written to shards so far"
        self.added = 0
        "rows added so far (written or still buffered): the row number the next ``add`` starts at"

    def add(self, **columns: torch.Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"every column needs the same number of rows, but got {sorted(lengths)}")
        self._buffer.append({name: value.detach().cpu() for name, value in columns.items()})
        rows = lengths.pop()
        self._buffered += rows
        self.added += rows
        if self._buffered >= self.shard_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        tensors = {name: torch.cat([part[name] for part in self._buffer]).contiguous() for name in self._buffer[0]}
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(tensors, str(self._tmp / name))
        rows = len(next(iter(tensors.values())))
        self.shards.append({"file": name, "rows": rows})
        self.rows += rows
        self._buffer, self._buffered = [], 0

    def close(self, meta: dict[str, Any], *, replace: bool = False) -> "ShardStore":
        """Write the last shard and the index, then move the store into place.

        ``replace`` allows replacing an existing folder (a cache under the same key); otherwise an
        existing folder is an error and stays as it was.
        """
        self._flush()
        index = {**meta, "format": FORMAT, "rows": self.rows, "shards": self.shards}
        (self._tmp / INDEX).write_text(json.dumps(index, indent=2))
        if self.folder.exists():
            if not replace:
                self.abort()
                raise FileExistsError(f"{self.folder} already exists; choose another folder or remove it")
            shutil.rmtree(self.folder)
        os.rename(self._tmp, self.folder)
        return ShardStore(self.folder, index)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, *_exc) -> None:
        if kind is not None:
            self.abort()


class ShardStore:
    """A complete store: read row ranges of any columns without loading whole shards."""

    def __init__(self, folder: str | Path, index: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.index = index
        self.starts = [0]
        for shard in index["shards"]:
            self.starts.append(self.starts[-1] + int(shard["rows"]))

    @classmethod
    def open(cls, folder: str | Path) -> "ShardStore | None":
        """The store in ``folder`` if its index and every shard are there, else None."""
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX).read_text())
        except (OSError, ValueError):
            return None
        if index.get("format") != FORMAT or not all((folder / s["file"]).is_file() for s in index["shards"]):
            return None
        return cls(folder, index)

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def read(self, start: int, stop: int, columns: Sequence[str]) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` of ``columns``, across shard boundaries."""
        if not 0 <= start <= stop <= self.rows:
            raise IndexError(f"rows [{start}, {stop}) lie outside the store's {self.rows} rows")
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in columns}
        for number, shard in enumerate(self.index["shards"]):
            low, high = max(start, self.starts[number]), min(stop, self.starts[number + 1])
            if low >= high:
                continue
            offset = self.starts[number]
            with safe_open(str(self.folder / shard["file"]), framework="pt") as handle:
                for name in columns:
                    parts[name].append(handle.get_slice(name)[low - offset:high - offset])
        return {name: torch.cat(values) if values else torch.empty(0) for name, values in parts.items()}


def read_shard(folder: Path, shard: dict[str, Any], columns: Sequence[str]) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / shard["file"]), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in columns}


def _consumer() -> tuple[int, int]:
    """(index, count) of this stream's consumer among DDP ranks x DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    worker = get_worker_info()
    workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
    return rank * workers + worker_id, world * workers


class StreamingPairs(IterableDataset):
    """Batches ``(source [b, d], target [b, d])`` streamed from shards, one or two shards in memory.

    ``window_range`` keeps only rows whose ``window`` column lies in ``[low, high)`` (train /
    validation split of the pair cache); ``max_rows`` stops after that many rows. With ``shuffle``
    the shard order and the rows within a shard follow ``seed`` and the epoch (counted per ``iter``).
    """

    def __init__(self, folder: str | Path, shards: Sequence[dict[str, Any]], batch_size: int, *,
                 shuffle: bool, seed: int = 0, drop_last: bool = False,
                 window_range: tuple[int, int] | None = None, max_rows: int | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.shards = list(shards)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.window_range = window_range
        self.max_rows = max_rows
        self.epoch = 0
        self.rows = self._count_rows()
        "rows the stream covers per epoch (after the window filter and max_rows)"

    def _keep(self, window: torch.Tensor) -> torch.Tensor:
        low, high = self.window_range
        return (window >= low) & (window < high)

    def _count_rows(self) -> int:
        if self.window_range is None:
            rows = sum(int(s["rows"]) for s in self.shards)
        else:  # one shard's window column at a time
            rows = sum(int(self._keep(read_shard(self.folder, s, ["window"])["window"]).sum()) for s in self.shards)
        return rows if self.max_rows is None else min(rows, self.max_rows)

    def _rows(self, generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.shards), generator=generator).tolist() if generator else range(len(self.shards))
        columns = ["source", "target"] + (["window"] if self.window_range is not None else [])
        for number in order:
            tensors = read_shard(self.folder, self.shards[number], columns)
            source, target = tensors["source"], tensors["target"]
            if self.window_range is not None:
                keep = self._keep(tensors["window"])
                source, target = source[keep], target[keep]
            if generator is not None:
                perm = torch.randperm(len(source), generator=generator)
                source, target = source[perm], target[perm]
            yield source, target

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch) if self.shuffle else None
        carry: tuple[torch.Tensor, torch.Tensor] | None = None
        left = self.max_rows if self.max_rows is not None else math.inf
        for source, target in self._rows(generator):
            if carry is not None:
                source, target = torch.cat([carry[0], source]), torch.cat([carry[1], target])
            full = len(source) // self.batch_size * self.batch_size
            for start in range(0, full, self.batch_size):
                take = int(min(self.batch_size, left))
                yield source[start:start + take], target[start:start + take]
                left -= take
                if left <= 0:
                    return
            carry = (source[full:], target[full:])
        if carry is not None and len(carry[0]) and not self.drop_last:
            take = int(min(len(carry[0]), left))
            yield carry[0][:take], carry[1][:take]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        consumer, consumers = _consumer()
        self.epoch += 1
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for batch in self._batches():
            group.append(batch)
            if len(group) == consumers:  # only complete groups: every consumer yields as many batches
                yield group[consumer]
                group = []
