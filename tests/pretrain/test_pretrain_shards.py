"""The sharded store: row ranges across shards, crash safety, and a training stream that covers every row."""

import pytest
import torch

from esamp_pl.pretrain import shards as shards_lib
from esamp_pl.pretrain.shards import ShardStore, ShardWriter, StreamingPairs


def write(folder, rows=50, shard_rows=16, hidden=4):
    source = torch.arange(rows * hidden, dtype=torch.float32).view(rows, hidden)
    window = torch.arange(rows, dtype=torch.int32) // 5  # 10 windows of 5 rows
    with ShardWriter(folder, shard_rows=shard_rows) as writer:
        for start in range(0, rows, 7):  # uneven pieces
            writer.add(source=source[start:start + 7], target=-source[start:start + 7], window=window[start:start + 7])
        store = writer.close({"hidden_size": hidden})
    return store, source, window


def test_rows_read_back_across_shard_boundaries(tmp_path):
    store, source, _ = write(tmp_path / "store")
    assert len(store.index["shards"]) > 2 and store.rows == 50
    reopened = ShardStore.open(tmp_path / "store")
    got = reopened.read(10, 41, ["source", "target"])
    assert torch.equal(got["source"], source[10:41]) and torch.equal(got["target"], -source[10:41])
    with pytest.raises(IndexError, match="outside the store's 50 rows"):
        reopened.read(40, 51, ["source"])


def test_a_failed_write_leaves_nothing_and_an_existing_store_is_kept(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path / "store", shard_rows=4) as writer:
            writer.add(source=torch.zeros(9, 2))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no temporary folder, no store
    write(tmp_path / "store")
    writer = ShardWriter(tmp_path / "store")
    writer.add(source=torch.zeros(3, 2))
    with pytest.raises(FileExistsError, match="already exists"):
        writer.close({})
    assert ShardStore.open(tmp_path / "store").rows == 50
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


def rows_of(batches):
    return torch.cat([s for s, _ in batches])[:, 0].long().div(4, rounding_mode="floor").tolist()


def test_a_shuffled_epoch_covers_every_row_once_in_full_batches(tmp_path):
    store, _, _ = write(tmp_path / "store")
    stream = StreamingPairs(store.folder, store.index["shards"], batch_size=8, shuffle=True, seed=3)
    first = list(stream)
    assert all(len(s) == 8 for s, _ in first[:-1]) and len(first[-1][0]) == 50 - 8 * 6
    assert sorted(rows_of(first)) == list(range(50)) and rows_of(first) != list(range(50))
    assert all(torch.equal(t, -s) for s, t in first)  # pairs stay together
    assert rows_of(list(stream)) != rows_of(first)  # a new order each epoch
    assert stream.rows == 50


def test_window_filter_and_row_cap(tmp_path):
    store, _, window = write(tmp_path / "store")
    val = StreamingPairs(store.folder, store.index["shards"], batch_size=4, shuffle=False, window_range=(8, 10))
    assert rows_of(list(val)) == list(range(40, 50)) and val.rows == 10
    capped = StreamingPairs(store.folder, store.index["shards"], batch_size=4, shuffle=False, max_rows=6)
    assert rows_of(list(capped)) == list(range(6)) and capped.rows == 6


def test_consumers_get_disjoint_equal_shares(tmp_path, monkeypatch):
    store, _, _ = write(tmp_path / "store")
    shares = []
    for consumer in range(3):
        monkeypatch.setattr(shards_lib, "_consumer", lambda c=consumer: (c, 3))
        stream = StreamingPairs(store.folder, store.index["shards"], batch_size=4, shuffle=True, seed=1)
        shares.append(rows_of(list(stream)))
    assert len({len(s) for s in shares}) == 1  # DDP needs the same number of batches on every rank
    seen = [r for share in shares for r in share]
    assert len(seen) == len(set(seen)) == 4 * 3 * (13 // 3)  # 13 batches: the incomplete group is dropped
