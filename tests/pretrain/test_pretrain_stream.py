"""The pre-training data module streams the pair cache: same split as before, never the whole cache in memory."""

import json
import math

import pytest
import torch

from esamp_pl.models import ModelSpec, load_model
from esamp_pl.pretrain.corpus import DataSpec, pack_documents
from esamp_pl.pretrain.datamodule import PairDataModule
from esamp_pl.pretrain.pairs import PairCache, build_pair_cache
from esamp_pl.sites import SitePair
from tests.pretrain.conftest import TEXT


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    from esamp_pl.pretrain import pairs as pairs_lib

    loaded = load_model(ModelSpec(name="tiny", name_or_path=str(tiny_model_dir), chat_template=False))
    spec = DataSpec(source="files", paths=("x",), window=16)
    corpus = pack_documents(loaded.tokenizer, TEXT.split("\n\n")[:6], spec)
    shard_rows = pairs_lib.SHARD_ROWS
    pairs_lib.SHARD_ROWS = 40  # several shards
    try:
        built, _ = build_pair_cache(loaded, SitePair("paper"), corpus, cache_dtype="float32", batch_size=3,
                                    device="cpu", root=tmp_path_factory.mktemp("pairs"))
    finally:
        pairs_lib.SHARD_ROWS = shard_rows
    return built


def test_the_stream_holds_out_the_last_windows_and_covers_the_rest(cache, tmp_path, monkeypatch):
    assert len(cache.manifest["shards"]) > 2
    source, target, window = cache.load()  # the reference: the whole cache in memory
    spec = DataSpec(source="files", paths=("x",), window=16, batch_size=32, val_fraction=0.2, max_val_rows=30)
    (tmp_path / "pairs.json").write_text(json.dumps({"folder": str(cache.folder), "key": cache.manifest["key"]}))
    module = PairDataModule(lambda: cache, spec, tmp_path)
    monkeypatch.setattr(PairCache, "load", lambda self: pytest.fail("setup must not load the whole cache"))
    module.setup("fit")
    windows = cache.manifest["corpus"]["windows"]
    is_val = window >= windows - math.ceil(windows * 0.2)
    assert module.train_rows.rows == int((~is_val).sum()) and module.val_rows.rows == min(30, int(is_val.sum()))

    train = list(module.train_dataloader())
    assert all(len(s) == 32 for s, _ in train)  # drop_last: full batches only
    got = torch.cat([s for s, _ in train])
    expected = source[~is_val]
    assert len(got) == len(expected) // 32 * 32
    # The streamed rows are a sub-multiset of the training rows (the text repeats: equal rows exist).
    keys, counts = torch.unique(got, dim=0, return_counts=True)
    match = (keys[:, None, :] == expected[None, :, :]).all(-1)
    assert (match.sum(1) >= counts).all() and match.any(1).all()
    val_source, val_target = (torch.cat(x) for x in zip(*module.val_dataloader()))
    torch.testing.assert_close(val_source, source[is_val][:30])
    torch.testing.assert_close(val_target, target[is_val][:30])


def test_throughput_counts_the_pairs_of_every_training_batch():
    from esamp_pl.pretrain.throughput import PairThroughput

    logged = []

    class Module:
        def log(self, name, value, batch_size):
            logged.append((name, value, batch_size))

    meter = PairThroughput()
    for rows in (32, 32, 7):
        batch = (torch.zeros(rows, 4), torch.zeros(rows, 4))
        meter.on_train_batch_start(None, Module(), batch, 0)
        meter.on_train_batch_end(None, Module(), None, batch, 0)
    assert meter.pairs == 71 and meter.seconds > 0
    assert [(n, b) for n, _, b in logged] == [("train/pairs_per_s", 32), ("train/pairs_per_s", 32),
                                              ("train/pairs_per_s", 7)]
    assert all(v > 0 for _, v, _ in logged)
