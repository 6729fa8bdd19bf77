"""Prompt loading (list, string, .txt, .jsonl) and encoding (chat template, length checks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from tokenizers import Tokenizer, models as tk_models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from esamp_pl.prompts import encode_prompts, load_prompts

WORDS = ["<unk>", "<s>", "</s>", "user", "assistant", ":"] + [f"w{i}" for i in range(58)]
ID = {w: i for i, w in enumerate(WORDS)}


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Word-level tokenizer that prepends BOS; its chat template renders `<s>user : TEXT assistant :`."""
    backend = Tokenizer(tk_models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template:
        tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                             "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}")
    return tok


# --- load_prompts --------------------------------------------------------------------------------------


def test_list_string_and_listconfig() -> None:
    assert load_prompts(["a", "b c"]) == ["a", "b c"]
    assert load_prompts(OmegaConf.create({"p": ["x", "y"]}).p) == ["x", "y"]
    assert load_prompts("Write a poem about the sea.") == ["Write a poem about the sea."]
    assert load_prompts("line one\nends in notes.txt") == ["line one\nends in notes.txt"]


def test_txt_file_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n   \nsecond prompt\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["first prompt", "second prompt"]
    assert load_prompts(path) == ["first prompt", "second prompt"]


def test_jsonl_file(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "multi\nline", "id": 1}, {"prompt": "two"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["multi\nline", "two"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_prompts(str(path))
    path.write_text('{"prompt": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompts(str(path))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_prompts(str(missing))


def test_empty_inputs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts([])
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="prompt 1"):
        load_prompts(["ok", 3])


# --- encode_prompts ------------------------------------------------------------------------------------


def test_chat_template_applied_once_with_generation_prompt() -> None:
    (ids,) = encode_prompts(tiny_tokenizer(), ["w1 w2"], chat_template=True, max_context=64, max_new_tokens=4)
    assert ids == [ID[t] for t in ["<s>", "user", ":", "w1", "w2", "assistant", ":"]]  # a single BOS


def test_plain_encoding_when_disabled_or_no_template() -> None:
    expected = [ID["<s>"], ID["w1"], ID["w2"]]
    assert encode_prompts(tiny_tokenizer(), ["w1 w2"], chat_template=False, max_context=64,
                          max_new_tokens=4) == [expected]
    assert encode_prompts(tiny_tokenizer(chat_template=False), ["w1 w2"], chat_template=True, max_context=64,
                          max_new_tokens=4) == [expected]


def test_empty_prompt_is_named() -> None:
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        encode_prompts(tiny_tokenizer(), ["w1", "  \n"], chat_template=True, max_context=64, max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts(tiny_tokenizer(), [], chat_template=True, max_context=64, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        encode_prompts(tiny_tokenizer(), ["w1"], chat_template=True, max_context=64, max_new_tokens=0)


def test_too_long_prompt_names_lengths_and_fix() -> None:
    prompts = ["w1", " ".join(["w3"] * 10)]  # the second is 5 template + 10 text = 15 tokens
    assert encode_prompts(tiny_tokenizer(), prompts, chat_template=True, max_context=21, max_new_tokens=6)
    with pytest.raises(ValueError) as info:
        encode_prompts(tiny_tokenizer(), prompts, chat_template=True, max_context=21, max_new_tokens=7)
    message = str(info.value)
    assert "prompt 1 has 15 tokens" in message and "max_new_tokens=7" in message and "22 > " in message
    assert "context of 21" in message and "at most 14 tokens" in message and "max_new_tokens to at most 6" in message


@pytest.mark.parametrize("text", ["nope.json", "data/prompts", "~/my_prompts.csv", "prompts.TXT.bak"])
def test_a_path_that_is_not_txt_or_jsonl_is_refused_not_used_as_text(text: str) -> None:
    with pytest.raises(ValueError, match="looks like a file path.*\\.txt.*\\.jsonl"):
        load_prompts(text)


@pytest.mark.parametrize("text", ["What is 3.5 times 2?", "Hello.", "Explain e.g. and i.e. to me", "hi"])
def test_ordinary_prompt_text_is_still_a_prompt(text: str) -> None:
    assert load_prompts(text) == [text]


def test_non_utf8_prompt_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"prompt file {path} is not UTF-8 text.*iconv"):
        load_prompts(str(path))


def test_a_directory_as_prompts_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "prompts.txt"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        load_prompts(str(folder))
