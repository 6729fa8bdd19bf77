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

import glob
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from esamp_pl.files import cache_root
from esamp_pl.pretrain.data_spec import CACHE_DTYPES, FILE_BUILDERS, SOURCES, CorpusError, DataSpec
from esamp_pl.pretrain.selfgen import self_generated_documents

__all__ = ["CACHE_DTYPES", "FILE_BUILDERS", "SOURCES", "CorpusError", "DataSpec", "PackedCorpus", "read_documents",
           "read_file_documents", "read_hub_documents", "pack_documents"]

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
