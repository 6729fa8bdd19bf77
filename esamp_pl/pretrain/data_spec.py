"""What the pre-training data is: :class:`DataSpec` (a ``conf/data/*.yaml`` file) and its error type.

Apart from :mod:`esamp_pl.pretrain.corpus` so that the corpus readers (including the
self-generated corpus) can share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from esamp_pl.config_dict import dataclass_from_config, to_plain
from esamp_pl.errors import ConfigError

SOURCES = ("self_generated", "files", "hub")
FILE_BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}
CACHE_DTYPES = ("float16", "float32")


class CorpusError(ConfigError):
    """The corpus cannot be used for pre-training; the message names the fix."""


@dataclass(frozen=True)
class DataSpec:
    """Everything about the pre-training data; the fields of a ``conf/data/*.yaml`` file."""

    source: str = "self_generated"
    "self_generated (offline default) | files | hub"
    name: str | None = None
    "label recorded in the checkpoint (default: derived from the source)"
    paths: tuple[str, ...] = ()
    "files: files, folders or globs"
    dataset: str | None = None
    "hub: dataset id (or a local dataset folder) for datasets.load_dataset"
    config_name: str | None = None
    "hub: dataset configuration"
    split: str = "train"
    "hub: split to read"
    revision: str | None = None
    "hub: git revision, for a reproducible corpus"
    streaming: bool = False
    "hub: stream instead of downloading the whole split (use with max_documents)"
    text_field: str = "text"
    "column holding the text (json, parquet, hub)"
    text_sample_by: str = "paragraph"
    "plain-text files: one document per paragraph, line or document (file)"
    max_documents: int | None = None
    "keep only the first N documents"
    seed_prompts: str | None = None
    "self_generated: .json (groups of templates x subjects) or .txt (one prompt a line); null: bundled set"
    num_prompts: int = 256
    "self_generated: seed prompts answered"
    samples_per_prompt: int = 1
    "self_generated: answers sampled per prompt (several: the sibling states ESamp sees at generation)"
    max_new_tokens: int = 192
    "self_generated: tokens generated per answer"
    generation_batch_size: int = 32
    "self_generated: prompts decoded together"
    temperature: float = 1.0
    "self_generated: sampling temperature (the generation defaults: temperature 1, min-p 0.1)"
    min_p: float = 0.1
    "self_generated: min-p filter"
    seed: int = 0
    "self_generated: seed of the prompt choice and of sampling"
    window: int = 256
    "tokens per packed window"
    max_tokens: int | None = None
    "cap on corpus tokens (after packing)"
    val_fraction: float = 0.05
    "share of windows (the last ones) held out for validation"
    max_val_rows: int = 4096
    "validation rows actually scored (the LM-head agreement costs a vocabulary matmul per row)"
    batch_size: int = 1024
    "(source, target) rows per optimizer step, per device"
    extract_batch_size: int = 8
    "windows per frozen-LM forward when extracting hidden states"
    cache_dtype: str = "float16"
    "dtype of the cached hidden states (float16 halves disk and memory; float32 if values overflow)"
    num_workers: int = 0
    "DataLoader workers (rows are in memory; 0 is usually fastest)"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, but is {self.source!r}")
        if self.source == "files" and not self.paths:
            raise ValueError("data.source=files needs data.paths (files, folders or globs), but none are given")
        if self.source == "hub" and not self.dataset:
            raise ValueError("data.source=hub needs data.dataset (a dataset id or a local dataset folder)")
        if self.text_sample_by not in ("paragraph", "line", "document"):
            raise ValueError(f"data.text_sample_by must be paragraph, line or document, "
                             f"but is {self.text_sample_by!r}")
        for name in ("num_prompts", "samples_per_prompt", "max_new_tokens", "generation_batch_size", "window",
                     "max_val_rows", "batch_size", "extract_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"data.{name} must be a positive integer, but is {value!r}")
        if self.window < 2:
            raise ValueError(f"data.window must be at least 2 tokens, but is {self.window}")
        for name in ("max_documents", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{name} must be a positive integer or null, but is {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must lie in (0, 1), but is {self.val_fraction}")
        if not (self.temperature > 0 and 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"data.temperature must be > 0 and data.min_p in [0, 1], "
                             f"but are {self.temperature} and {self.min_p}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"data.cache_dtype must be one of {CACHE_DTYPES}, but is {self.cache_dtype!r}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, but is {self.num_workers}")

    @classmethod
    def from_config(cls, cfg: Any) -> "DataSpec":
        """Build from a config node or mapping; unknown keys are errors."""
        values = to_plain(cfg)
        paths = values.get("paths") or ()
        values["paths"] = (paths,) if isinstance(paths, str) else tuple(str(p) for p in paths)
        return dataclass_from_config(cls, values, "data")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.source == "hub":
            return f"hub:{self.dataset}" + (f"/{self.config_name}" if self.config_name else "") + f":{self.split}"
        if self.source == "files":
            return "files:" + ",".join(self.paths)
        return "self_generated"
