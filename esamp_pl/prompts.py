"""Prompts: where they come from (config list, text file, JSONL) and how they become token ids.

Every check runs before generation starts, so a bad prompt fails in a second with a message that
names it, not after minutes of decoding the others.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from esamp_pl.errors import ConfigError

_FILE_SUFFIXES = (".txt", ".jsonl")
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,8}$")


class PromptFileNotFoundError(ConfigError, FileNotFoundError):
    """A prompts path that does not exist."""


def load_prompts(prompts: Any) -> list[str]:
    """Prompts from a list of strings, a single string, or a ``.txt`` / ``.jsonl`` file path.

    ``.txt``: one prompt per non-empty line. ``.jsonl``: one object per non-empty line with a
    ``"prompt"`` key (multi-line prompts need JSONL). A single string without whitespace that has a
    file suffix or a slash (``nope.json``, ``data/prompts``) is meant as a path: it must be a ``.txt``
    or ``.jsonl`` file, else it is refused (never used as the prompt text). Ordinary prompt text holds
    spaces, so it is never mistaken for a path; a one-word prompt goes in a list (``prompts=[hello.py]``).
    """
    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and _is_path(prompts)):
        return _load_file(Path(prompts).expanduser())
    if isinstance(prompts, str) and _looks_like_path(prompts):
        raise ConfigError(
            f"prompts={prompts!r} looks like a file path, but prompt files must end in .txt (one prompt per line) "
            "or .jsonl (objects with a \"prompt\" key). Fix: convert the file, or pass the text as a list: "
            f"prompts=[{prompts!r}]")
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Iterable):
        raise ConfigError(f"prompts must be a string, a list of strings or a .txt/.jsonl path, not {type(prompts).__name__}")
    result = list(prompts)
    for index, prompt in enumerate(result):
        if not isinstance(prompt, str):
            raise ConfigError(f"prompt {index} is a {type(prompt).__name__}, not a string: {prompt!r}")
    if not result:
        raise ConfigError("no prompts given: pass at least one prompt")
    return result


def prompts_file(prompts: Any) -> Path | None:
    """The file that ``prompts`` names, if it names one (to keep outputs from overwriting it)."""
    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and _is_path(prompts)):
        return Path(prompts).expanduser()
    return None


def _is_path(text: str) -> bool:
    return "\n" not in text and text.strip().lower().endswith(_FILE_SUFFIXES)


def _looks_like_path(text: str) -> bool:
    text = text.strip()
    return bool(text) and not any(c.isspace() for c in text) and ("/" in text or os.sep in text
                                                                   or bool(_SUFFIX.search(text)))


def _load_file(path: Path) -> list[str]:
    if path.is_dir():
        raise ConfigError(f"prompts={str(path)!r} is a directory; it must be a .txt or .jsonl file")
    if not path.is_file():
        raise PromptFileNotFoundError(f"prompt file not found: {path}. Fix: check the path given as prompts=")
    suffix = path.suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise ConfigError(f"prompt file {path} must end in .txt (one prompt per line) or .jsonl (objects with a \"prompt\" key)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at "
                          f"offset {err.start}). Fix: re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from err
    if suffix == ".txt":
        result = [line for line in lines if line.strip()]
    else:
        result = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ConfigError(f"{path}:{number}: expected an object with a string \"prompt\" key, got {line[:80]!r}")
            result.append(record["prompt"])
    if not result:
        raise ConfigError(f"prompt file {path} holds no prompts")
    return result


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, chat_template: bool,
                   max_context: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids per prompt, ready for left-padded batched generation.

    With ``chat_template`` and a tokenizer that has one, each prompt becomes a single user turn
    followed by the assistant header; the rendered text already holds any BOS, so no special tokens
    are added on top. Otherwise the text is encoded plainly (with BOS when the tokenizer adds it).
    """
    if not prompts:
        raise ConfigError("no prompts given: pass at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be a positive integer, but is {max_new_tokens!r}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"prompt {index} is empty or whitespace only ({prompt!r}); remove it or give it text")

    use_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoded: list[list[int]] = []
    for prompt in prompts:
        if use_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        encoded.append(list(ids))

    budget = max_context - max_new_tokens
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > budget]
    if too_long:
        index = too_long[0]
        others = f" ({len(too_long) - 1} more prompt(s) too long as well)" if len(too_long) > 1 else ""
        length = len(encoded[index])
        fix = f"shorten the prompt to at most {budget} tokens" if budget > 0 else "shorten the prompt"
        if length < max_context:
            fix += f" or lower max_new_tokens to at most {max_context - length}"
        raise ConfigError(
            f"prompt {index} has {length} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{length + max_new_tokens} > the model's context of {max_context} tokens{others}. Fix: {fix}.")
    return encoded
