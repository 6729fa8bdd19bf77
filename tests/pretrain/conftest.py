"""Fixtures for pre-training tests: a tiny random LM saved as a real model folder with a byte tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import Callback
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tests.conftest import tiny_model

TEXT = ("The river bends twice before it reaches the old mill.\n\nBread rises while the oven warms, and the kitchen "
        "smells of yeast.\n\nA kite needs wind, a string and a patient hand.\n\n") * 6


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens + <bos>, <eos>, <pad> (ids 256-258): enough for a tiny model with vocab 260."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>")
    return tokenizer


def write_tiny_model(folder: Path, seed: int = 0, **overrides) -> Path:
    model = tiny_model("llama", seed=seed, vocab_size=260, **overrides)
    model.save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus" / "notes.txt"
    path.parent.mkdir()
    path.write_text(TEXT)
    return path


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    """Every cache (pairs, corpora, runs, datasets) under the test's temp folder."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ESAMP_PL_CACHE", str(root))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
    return root


def tiny_model_config(config_name: str, model_dir: Path, *overrides: str):
    """The real ``conf/<config_name>.yaml``, composed with the tiny local model at ``model_dir``."""
    from hydra import compose, initialize_config_dir
    conf = Path(__file__).resolve().parents[2] / "conf"
    model = ["model.name=tiny", f"model.name_or_path={model_dir}", "model.gguf_file=null", "model.package=null",
             "model.sha256=null", "model.chat_template=false", "distiller.rank=8"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name=config_name, overrides=model + list(overrides))


def pretrain_config(model_dir: Path, tmp_path: Path, *overrides: str):
    """conf/pretrain.yaml with a tiny local model and fast trainer settings."""
    return tiny_model_config(
        "pretrain", model_dir, "data=files", "data.window=32", "data.batch_size=64", "data.extract_batch_size=4",
        "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "warmup_steps=2",
        "checkpoint_every=2", f"export.dir={tmp_path / 'checkpoints'}", *overrides)


class CrashAt(Callback):
    """Raises inside training once ``trainer.global_step`` reaches ``step`` (a simulated crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class FirstStep(Callback):
    """Remembers the global step of the first training batch (where a resumed run starts)."""

    def __init__(self) -> None:
        self.first: int | None = None

    def on_train_batch_start(self, trainer, *args) -> None:
        if self.first is None:
            self.first = trainer.global_step
