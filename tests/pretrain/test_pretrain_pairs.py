"""Hidden-state pairs: the same states generation captures, cached, reused and invalidated."""

import shutil

import pytest
import torch

from esamp_pl.models import ModelSpec, load_model
from esamp_pl.pretrain import pairs as pairs_lib
from esamp_pl.pretrain.corpus import DataSpec, pack_documents
from esamp_pl.pretrain.pairs import PairCache, build_pair_cache
from esamp_pl.sites import SitePair
from tests.pretrain.conftest import TEXT

SPEC = DataSpec(source="files", paths=("x",), window=16)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(ModelSpec(name="tiny", name_or_path=str(tiny_model_dir), chat_template=False))


@pytest.fixture
def corpus(loaded):
    return pack_documents(loaded.tokenizer, TEXT.split("\n\n")[:6], SPEC)


@pytest.fixture
def counted(monkeypatch):
    """Counts LM passes over the corpus (extractions)."""
    calls = []
    original = pairs_lib.extract_pairs

    def counting(*args, **kwargs):
        calls.append(1)
        yield from original(*args, **kwargs)

    monkeypatch.setattr(pairs_lib, "extract_pairs", counting)
    return calls


def build(loaded, corpus, root, sites="paper", dtype="float32"):
    return build_pair_cache(loaded, SitePair(sites), corpus, cache_dtype=dtype, batch_size=3, device="cpu", root=root)


def test_pairs_are_the_models_hidden_states_at_every_real_position(loaded, corpus, tmp_path):
    cache, reused = build(loaded, corpus, tmp_path)
    assert not reused
    source, target, window = cache.load()
    assert len(source) == cache.rows == int(corpus.train_mask.sum()) == corpus.meta["pairs"]
    with torch.no_grad():
        out = loaded.model(corpus.input_ids, attention_mask=corpus.mask.long(), output_hidden_states=True)
    keep = corpus.train_mask
    torch.testing.assert_close(source, out.hidden_states[1][keep])
    torch.testing.assert_close(target, out.hidden_states[-1][keep])
    rows_per_window = keep.sum(1)
    assert torch.equal(torch.bincount(window.long(), minlength=len(keep)), rows_per_window)
    weight, bias, _ = cache.head()
    assert torch.equal(weight, loaded.model.get_output_embeddings().weight) and bias is None
    assert cache.manifest["model_fingerprint"] == loaded.fingerprint and cache.hidden_size == 64


def test_cache_is_reused_when_it_matches_and_rebuilt_when_not(loaded, corpus, tmp_path, counted):
    first, _ = build(loaded, corpus, tmp_path)
    again, reused = build(loaded, corpus, tmp_path)
    assert reused and again.folder == first.folder and len(counted) == 1

    other_text = pack_documents(loaded.tokenizer, TEXT.split("\n\n")[:5], SPEC)
    changed, reused = build(loaded, other_text, tmp_path)
    assert not reused and changed.folder != first.folder and len(counted) == 2

    tllm, reused = build(loaded, corpus, tmp_path, sites="tllm")
    assert not reused and tllm.folder != first.folder and len(counted) == 3

    half, reused = build(loaded, corpus, tmp_path, dtype="float16")
    assert not reused and half.load()[0].dtype == torch.float16 and len(counted) == 4

    (first.folder / first.manifest["shards"][0]["file"]).unlink()  # damaged: rebuilt in place
    assert PairCache.open(first.folder) is None
    repaired, reused = build(loaded, corpus, tmp_path)
    assert not reused and repaired.folder == first.folder and len(counted) == 5
    assert not [p for p in repaired.folder.parent.iterdir() if p.name.startswith(".tmp")]


def test_another_model_gets_another_cache(loaded, corpus, tmp_path, tiny_model_dir):
    from tests.pretrain.conftest import write_tiny_model
    other_dir = write_tiny_model(tmp_path / "other", intermediate_size=96)
    other = load_model(ModelSpec(name="tiny", name_or_path=str(other_dir), chat_template=False))
    assert other.fingerprint != loaded.fingerprint
    a, _ = build(loaded, corpus, tmp_path / "c")
    b, reused = build(other, corpus, tmp_path / "c")
    assert not reused and a.folder != b.folder
    shutil.rmtree(tmp_path / "c")


def test_overflowing_cache_dtype_is_named(loaded, corpus, tmp_path, monkeypatch):
    original = pairs_lib.extract_pairs

    def huge(*args, **kwargs):
        for source, target, window in original(*args, **kwargs):
            yield source * float("inf"), target, window

    monkeypatch.setattr(pairs_lib, "extract_pairs", huge)
    with pytest.raises(ValueError, match="data.cache_dtype=float32"):
        build(loaded, corpus, tmp_path)
    assert not list((tmp_path / "tiny").iterdir())  # nothing half-written left behind
