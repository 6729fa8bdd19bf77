"""Pre-training text: where it comes from, and how it becomes fixed-length token windows.

Three sources (``data.source``), all read through Hugging Face ``datasets``:

* ``files``: local ``.txt`` / ``.md`` (one document per paragraph by default), ``.jsonl`` / ``.json``
  and ``.parquet`` files (one document per row, column ``data.text_field``); folders and globs work.
* ``hub``: a dataset by name (``load_dataset(data.dataset, ...)``); a local dataset folder works too.
* ``self_generated`` (offline default): the LM answers esamp_pl's own seed prompts, see
  :mod:`esamp_pl.pretrain.selfgen`.

Documents are tokenized without special tokens, joined with EOS between documents and cut into
windows of ``data.window`` tokens; when the tokenizer has a BOS token each window starts with it, so
that every window looks like the start of a sequence, as prompts do at generation time.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SOURCES = ("self_generated", "files", "hub")
FILE_BUILDERS = {".txt": "text", ".md": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet"}
CACHE_DTYPES = ("float16", "float32")


class CorpusError(ValueError):
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
        for name in ("num_prompts", "max_new_tokens", "generation_batch_size", "window", "max_val_rows",
                     "batch_size", "extract_batch_size"):
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
        """Build from a DictConfig or mapping; unknown keys are errors."""
        from omegaconf import DictConfig, OmegaConf
        values = (OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True) if isinstance(cfg, DictConfig)
                  else dict(cfg))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in data; valid keys: {sorted(known)}")
        paths = values.get("paths") or ()
        values["paths"] = (paths,) if isinstance(paths, str) else tuple(str(p) for p in paths)
        return cls(**values)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.source == "hub":
            return f"hub:{self.dataset}" + (f"/{self.config_name}" if self.config_name else "") + f":{self.split}"
        if self.source == "files":
            return "files:" + ",".join(self.paths)
        return "self_generated"


@dataclass
class PackedCorpus:
    """Token windows ready for the frozen LM."""

    input_ids: torch.Tensor
    "[windows, window] token ids"
    mask: torch.Tensor
    "[windows, window] bool: True where a real token sits (False: padding of the last window)"
    train_mask: torch.Tensor
    "[windows, window] bool: positions whose hidden states become (source, target) pairs"
    documents: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Content hash of the windows: any change of text, tokenizer or packing changes it."""
        digest = hashlib.sha256()
        for tensor in (self.input_ids.to(torch.int64), self.train_mask.to(torch.uint8)):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# reading documents


def _expand(paths: tuple[str, ...]) -> list[Path]:
    """Files named by ``paths`` (files, folders searched recursively, globs), in a stable order."""
    found: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS)
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise CorpusError(f"data.paths: {entry!r} is neither a file, a folder nor a glob that matches "
                                  "files. Fix: point data.paths at existing .txt/.jsonl/.parquet files")
            found += matches
    unsupported = [str(p) for p in found if p.suffix.lower() not in FILE_BUILDERS]
    if unsupported:
        raise CorpusError(f"unsupported corpus file type(s): {unsupported}; supported: {sorted(FILE_BUILDERS)}. "
                          "Fix: convert them or use data.source=hub with a datasets loading script")
    return found


def _texts(rows, column: str, where: str, spec: DataSpec) -> list[str]:
    names = list(getattr(rows, "column_names", None) or [])
    if names and column not in names:
        raise CorpusError(f"{where} has no column {column!r}; its columns are {names}. "
                          f"Fix: set data.text_field to the column that holds the text")
    texts = []
    for row in rows:
        value = row.get(column) if isinstance(row, dict) else None
        if isinstance(value, str) and value.strip():
            texts.append(value)
        if spec.max_documents is not None and len(texts) >= spec.max_documents:
            break
    return texts


def _datasets_cache() -> str:
    from esamp_pl.models import cache_root
    return str(cache_root() / "datasets")


def read_file_documents(spec: DataSpec) -> list[str]:
    """Documents from local text / JSONL / parquet files."""
    from datasets import load_dataset
    files = _expand(spec.paths)
    documents: list[str] = []
    by_builder: dict[str, list[str]] = {}
    for path in files:
        by_builder.setdefault(FILE_BUILDERS[path.suffix.lower()], []).append(str(path))
    for builder, group in by_builder.items():
        options = {"sample_by": spec.text_sample_by} if builder == "text" else {}
        try:
            rows = load_dataset(builder, data_files=group, split="train", cache_dir=_datasets_cache(), **options)
        except Exception as err:  # datasets wraps parse errors in several types
            raise CorpusError(f"cannot read corpus files {group} as {builder}: {err}. Fix: check the files are "
                              "valid (one JSON object per line for .jsonl)") from err
        documents += _texts(rows, "text" if builder == "text" else spec.text_field, f"corpus files {group}", spec)
    return documents


def read_hub_documents(spec: DataSpec) -> list[str]:
    """Documents of a Hugging Face dataset (by id, or a local dataset folder)."""
    from datasets import load_dataset
    try:
        rows = load_dataset(spec.dataset, spec.config_name, split=spec.split, revision=spec.revision,
                            streaming=spec.streaming, cache_dir=_datasets_cache())
    except Exception as err:  # offline, unknown id, missing split: datasets raises many types
        raise CorpusError(
            f"cannot load dataset {spec.dataset!r} (config {spec.config_name!r}, split {spec.split!r}): "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. Fix: on a machine with network "
            f"download it (`hf download --repo-type dataset {spec.dataset}`) and point HF_HOME at that cache, pass "
            "a local dataset folder as data.dataset, or use data=files / the offline default data=self_generated"
        ) from err
    return _texts(rows, spec.text_field, f"dataset {spec.dataset!r}", spec)


def read_documents(spec: DataSpec, loaded=None) -> list[str]:
    """The corpus as a list of non-empty documents; raise :class:`CorpusError` if there is no text."""
    if spec.source == "files":
        documents = read_file_documents(spec)
    elif spec.source == "hub":
        documents = read_hub_documents(spec)
    else:
        from esamp_pl.pretrain.selfgen import self_generated_documents
        if loaded is None:
            raise ValueError("the self_generated corpus needs the loaded model")
        documents = self_generated_documents(loaded, spec)
    if spec.max_documents is not None:
        documents = documents[:spec.max_documents]
    if not documents:
        raise CorpusError(f"corpus {spec.label!r} has no usable text (no non-empty document in field "
                          f"{spec.text_field!r}). Fix: point data at files or a dataset that contain text")
    return documents


# ---------------------------------------------------------------------------------------------------
# tokenizing and packing


def pack_documents(tokenizer, documents: list[str], spec: DataSpec) -> PackedCorpus:
    """Tokenize, join with EOS and cut into ``spec.window``-token windows (see the module docstring)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    stream: list[int] = []
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    for ids in encoded:
        if ids:
            stream += ids + [eos]
    lead = [bos] if bos is not None else []
    body = spec.window - len(lead)
    if spec.max_tokens is not None:
        stream = stream[:max(1, math.floor(spec.max_tokens / spec.window)) * body]
    if not stream:
        raise CorpusError(f"corpus {spec.label!r} has no usable text: its {len(documents)} document(s) "
                          "tokenize to nothing. Fix: point data at a corpus with real text")
    count = math.ceil(len(stream) / body)
    if count < 2:
        raise CorpusError(f"corpus {spec.label!r} is too small: {len(stream)} tokens make {count} window of "
                          f"{spec.window}, but training and validation need at least 2. Fix: add text or lower "
                          "data.window")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.full((count, spec.window), pad, dtype=torch.long)
    mask = torch.zeros((count, spec.window), dtype=torch.bool)
    for row in range(count):
        chunk = lead + stream[row * body:(row + 1) * body]
        input_ids[row, :len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        mask[row, :len(chunk)] = True
    train_mask = mask.clone()
    if lead:
        train_mask[:, 0] = False  # the BOS we put first has the same state in every window: no information
    meta = {"name": spec.label, "source": spec.source, "documents": len(documents), "windows": count,
            "window": spec.window, "tokens": int(mask.sum()), "pairs": int(train_mask.sum())}
    corpus = PackedCorpus(input_ids, mask, train_mask, len(documents), meta)
    corpus.meta["key"] = corpus.key
    return corpus
