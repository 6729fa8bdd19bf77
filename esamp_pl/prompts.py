"""Prompts: where they come from (config list, text file, JSONL) and how they become token ids.

Every check runs before generation starts, so a bad prompt fails in a second with a message that
names it, not after minutes of decoding the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

_FILE_SUFFIXES = (".txt", ".jsonl")


def load_prompts(prompts: Any) -> list[str]:
    """Prompts from a list of strings, a single string, or a ``.txt`` / ``.jsonl`` file path.

    ``.txt``: one prompt per non-empty line. ``.jsonl``: one object per non-empty line with a
    ``"prompt"`` key (multi-line prompts need JSONL). A string is taken as a path only when it ends
    in one of those suffixes and holds no newline, so ordinary prompt text is never mistaken for one.
    """
    if isinstance(prompts, os.PathLike) or (isinstance(prompts, str) and _is_path(prompts)):
        return _load_file(Path(prompts).expanduser())
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None or isinstance(prompts, (bytes, dict)) or not isinstance(prompts, Iterable):
        raise ValueError(f"prompts must be a string, a list of strings or a .txt/.jsonl path, not {type(prompts).__name__}")
    result = list(prompts)
    for index, prompt in enumerate(result):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {index} is a {type(prompt).__name__}, not a string: {prompt!r}")
    if not result:
        raise ValueError("no prompts given: pass at least one prompt")
    return result


def _is_path(text: str) -> bool:
    return "\n" not in text and text.strip().lower().endswith(_FILE_SUFFIXES)


def _load_file(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in _FILE_SUFFIXES:
        raise ValueError(f"prompt file {path} must end in .txt (one prompt per line) or .jsonl (objects with a \"prompt\" key)")
    lines = path.read_text(encoding="utf-8").splitlines()
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
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string \"prompt\" key, got {line[:80]!r}")
            result.append(record["prompt"])
    if not result:
        raise ValueError(f"prompt file {path} holds no prompts")
    return result


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *, chat_template: bool,
                   max_context: int, max_new_tokens: int) -> list[list[int]]:
    """Token ids per prompt, ready for left-padded batched generation.

    With ``chat_template`` and a tokenizer that has one, each prompt becomes a single user turn
    followed by the assistant header; the rendered text already holds any BOS, so no special tokens
    are added on top. Otherwise the text is encoded plainly (with BOS when the tokenizer adds it).
    """
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, but is {max_new_tokens!r}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt {index} is empty or whitespace only ({prompt!r}); remove it or give it text")

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
        raise ValueError(
            f"prompt {index} has {length} tokens; with max_new_tokens={max_new_tokens} that is "
            f"{length + max_new_tokens} > the model's context of {max_context} tokens{others}. Fix: {fix}.")
    return encoded
