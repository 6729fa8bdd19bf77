"""Corpus sources (files, hub folder, self-generated), packing, and the no-usable-text errors."""

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from esamp_pl.pretrain.corpus import CorpusError, DataSpec, pack_documents, read_documents
from esamp_pl.pretrain.selfgen import choose_prompts, read_seed_prompts
from tests.pretrain.conftest import byte_tokenizer


def files_spec(*paths, **kw) -> DataSpec:
    return DataSpec(source="files", paths=tuple(str(p) for p in paths), **kw)


def test_text_jsonl_and_parquet_files(tmp_path, cache_env):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp_path = tmp_path / "corpus"
    tmp_path.mkdir()
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "a json document"}) + "\n" + json.dumps({"body": " "}) + "\n")
    pq.write_table(pa.table({"body": ["a parquet row", ""]}), tmp_path / "c.parquet")
    docs = read_documents(files_spec(tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet",
                                     text_field="body"))
    assert sorted(d.strip() for d in docs) == ["First paragraph.", "Second paragraph.", "a json document",
                                               "a parquet row"]
    assert len(read_documents(files_spec(tmp_path / "*.txt"))) == 2  # globs
    assert len(read_documents(files_spec(tmp_path, text_field="body"))) == 4  # folders


def test_hub_path_reads_a_local_dataset_folder(tmp_path, cache_env):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    docs = read_documents(DataSpec(source="hub", dataset=str(folder), split="train", max_documents=3))
    assert docs == ["doc 0", "doc 1", "doc 2"]


def test_unknown_hub_dataset_is_a_clear_error(cache_env, monkeypatch):
    import datasets.config
    import huggingface_hub.constants
    # The libraries read the offline switch at import time; set it where they look, so this fails fast.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusError, match="cannot load dataset.*Fix:.*data=files"):
        read_documents(DataSpec(source="hub", dataset="no-such-org/no-such-dataset"))


@pytest.mark.parametrize("content, field, message", [
    ("\n\n   \n", "text", "no usable text"),
    ('{"text": "   "}\n{"text": ""}\n', "text", "no usable text"),
    ('{"body": "hello"}\n', "text", "has no column 'text'; its columns are \\['body'\\].*data.text_field"),
])
def test_corpus_without_usable_text_names_the_fix(tmp_path, cache_env, content, field, message):
    path = tmp_path / ("empty.txt" if content.startswith("\n") else "rows.jsonl")
    path.write_text(content)
    with pytest.raises(CorpusError, match=message):
        read_documents(files_spec(path, text_field=field))


def test_missing_corpus_path_names_the_fix(tmp_path):
    with pytest.raises(CorpusError, match="neither a file, a folder nor a glob"):
        read_documents(files_spec(tmp_path / "absent.txt"))


def test_packing_joins_documents_with_eos_and_starts_windows_with_bos():
    tokenizer = byte_tokenizer()
    spec = DataSpec(source="files", paths=("x",), window=8)
    corpus = pack_documents(tokenizer, ["abc", "defghij"], spec)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream = [c for c in tokenizer("abc")["input_ids"]] + [eos] + tokenizer("defghij")["input_ids"] + [eos]
    assert corpus.input_ids.shape == (2, 8) and (corpus.input_ids[:, 0] == bos).all()
    assert corpus.input_ids[0, 1:].tolist() == stream[:7]
    assert corpus.mask[1].tolist() == [True] * 6 + [False] * 2  # BOS + the last 5 tokens, then padding
    assert not corpus.train_mask[:, 0].any() and corpus.meta["pairs"] == len(stream)
    assert corpus.key == pack_documents(tokenizer, ["abc", "defghij"], spec).key
    assert corpus.key != pack_documents(tokenizer, ["abc", "defghiJ"], spec).key


def test_packing_refuses_a_corpus_too_small_to_split():
    with pytest.raises(CorpusError, match="too small.*at least 2"):
        pack_documents(byte_tokenizer(), ["hi"], DataSpec(source="files", paths=("x",), window=64))


def test_bad_data_values_are_named():
    with pytest.raises(ValueError, match="data.source must be one of"):
        DataSpec(source="web")
    with pytest.raises(ValueError, match="needs data.paths"):
        DataSpec(source="files")
    with pytest.raises(ValueError, match="data.val_fraction"):
        DataSpec(val_fraction=1.0)
    with pytest.raises(ValueError, match="unknown key"):
        DataSpec.from_config({"source": "files", "paths": ["a"], "windw": 3})


def test_seed_prompts_are_many_distinct_and_shuffled():
    prompts = read_seed_prompts()
    assert len(prompts) > 700 and len(set(prompts)) == len(prompts)
    chosen = choose_prompts(DataSpec(num_prompts=50))
    assert len(chosen) == 50 and chosen != prompts[:50]


def _ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


@pytest.mark.parametrize("task", ["gsm8k", "aime2025", "gpqa", "humaneval", "creative"])
def test_seed_prompts_share_no_text_with_evaluation_sets(task):
    """No 8-word sequence of a seed prompt occurs in any prompt the evaluation sends for ``task``."""
    from esamp_pl.evaluation.tasks import load_task
    problems = load_task(task)  # the evaluation's own loader: a missing dataset package is an error here too
    assert len(problems) >= 30, (task, len(problems))
    evaluation = set().union(*(_ngrams(problem.prompt) for problem in problems))
    shared = [p for p in read_seed_prompts() if _ngrams(p) & evaluation]
    assert not shared, shared[:3]


def test_seed_prompts_share_no_text_with_generates_default_prompts():
    texts = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "config.yaml").prompts
    assert len(texts) >= 3
    evaluation = set().union(*(_ngrams(text) for text in texts))
    assert not [p for p in read_seed_prompts() if _ngrams(p) & evaluation]


def test_self_generated_corpus_is_cached(tiny_model_dir, cache_env):
    from esamp_pl.models import ModelSpec, load_model
    from esamp_pl.pretrain import selfgen
    loaded = load_model(ModelSpec(name="tiny", name_or_path=str(tiny_model_dir), chat_template=False))
    spec = DataSpec(num_prompts=3, max_new_tokens=6, generation_batch_size=2)
    docs = selfgen.self_generated_documents(loaded, spec)
    assert len(docs) == 3 and all(isinstance(d, str) and d for d in docs)
    files = list((cache_env / "corpora").rglob("*.jsonl"))
    assert len(files) == 1
    assert selfgen.self_generated_documents(loaded, spec) == docs  # read back, not regenerated
    assert len(list((cache_env / "corpora").rglob("*.jsonl"))) == 1
    assert torch.is_tensor(pack_documents(loaded.tokenizer, docs, DataSpec(window=4)).input_ids)


def test_several_answers_per_prompt_are_siblings_under_their_own_cache_key(tiny_model_dir, cache_env):
    from esamp_pl.models import ModelSpec, load_model
    from esamp_pl.pretrain import selfgen
    from esamp_pl.pretrain.corpus import CorpusError

    loaded = load_model(ModelSpec(name="tiny", name_or_path=str(tiny_model_dir), chat_template=False))
    one = DataSpec(num_prompts=3, max_new_tokens=6, generation_batch_size=2)
    three = DataSpec(num_prompts=3, samples_per_prompt=3, max_new_tokens=6, generation_batch_size=2)
    single = selfgen.self_generated_documents(loaded, one)
    siblings = selfgen.self_generated_documents(loaded, three)
    assert len(single) == 3 and len(siblings) == 9
    prompts = selfgen.choose_prompts(three)
    (cached,) = [lines for path in (cache_env / "corpora").rglob("*.jsonl")
                 if len(lines := path.read_text().splitlines()) == 9]
    records = [json.loads(line) for line in cached]
    assert sorted(r["prompt"] for r in records) == sorted(prompts * 3)  # each prompt answered three times
    assert len({r["text"] for r in records}) > 3  # the siblings are sampled, not copies
    assert len(list((cache_env / "corpora").rglob("*.jsonl"))) == 2  # its own cache entry
    with pytest.raises(CorpusError, match="data.num_prompts=900 but the seed prompts hold 802.*samples_per_prompt"):
        selfgen.choose_prompts(DataSpec(num_prompts=900))
    with pytest.raises(ValueError, match="data.samples_per_prompt must be a positive integer"):
        DataSpec(samples_per_prompt=0)
