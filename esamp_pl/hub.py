"""Hub ids and local folders: load an LM and its tokenizer from either, failing fast without network.

Hub ids are tried from the local Hugging Face cache first, so a machine without network fails in
well under a second with :class:`~esamp_pl.model_spec.ModelUnavailableError` instead of retrying
for half a minute.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from esamp_pl.model_spec import ModelSpec, ModelUnavailableError, looks_like_local_path, torch_dtype


def _device_kwargs(device: str | torch.device) -> dict[str, Any]:
    """Accelerator loads go straight to the device so an 8B model never sits in host RAM in full."""
    device = torch.device(device)
    return {} if device.type == "cpu" else {"device_map": str(device)}


def from_folder(folder: Path, spec: ModelSpec, device: str | torch.device):
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(spec.dtype), local_files_only=True, **_device_kwargs(device))
    return model, load_tokenizer(str(folder), spec, local_files_only=True)


def load_tokenizer(target: str, spec: ModelSpec, *, local_files_only: bool) -> PreTrainedTokenizerBase:
    """The tokenizer next to the weights; its absence otherwise surfaces as a baffling ValueError."""
    try:
        return AutoTokenizer.from_pretrained(target, local_files_only=local_files_only)
    except ValueError as err:
        raise ModelUnavailableError(
            f"model {spec.name!r}: no usable tokenizer in {target!r} ({str(err).splitlines()[0]}). Fix: put the "
            "model's tokenizer files (tokenizer.json, tokenizer_config.json) next to its weights, e.g. with "
            "tokenizer.save_pretrained(folder).") from err


def offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe, so that no network costs seconds rather than the hub client's retry loop."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy may reach what we cannot resolve; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_message(spec: ModelSpec, cause: BaseException | None) -> str:
    ident = spec.name_or_path
    return (
        f"model {spec.name!r}: cannot load {ident!r} ({type(cause).__name__ if cause else 'not found'}: "
        f"{str(cause).splitlines()[0] if cause and str(cause) else 'no weights'}). "
        "Its weights are neither in the local Hugging Face cache nor reachable. Fix: on a machine with network "
        f"run `hf download {ident}` (older clients: `huggingface-cli download {ident}`; gated models need "
        "`hf auth login` first) and copy the cache here, pointing HF_HOME at it; or pass a local folder with "
        "`model.name_or_path=/path/to/folder`; or use the offline default `model=smollm2-135m`.")


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "weights not here / not reachable", not a bug in the model config."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from huggingface_hub import errors as hf_errors
        errors += [hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError]
    for module, name in (("httpx", "HTTPError"), ("requests", "RequestException")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(__import__(module), name))
    return tuple(errors)


def from_hub_or_folder(spec: ModelSpec, device: str | torch.device):
    target = spec.name_or_path
    if looks_like_local_path(target) or Path(target).expanduser().is_dir():
        folder = Path(target).expanduser()
        if not folder.is_dir():
            raise ModelUnavailableError(
                f"model {spec.name!r}: local folder {str(folder)!r} does not exist. Fix: pass the folder that "
                "holds config.json and the weights (model.name_or_path=/path/to/folder), or a hub id.")
        try:
            return from_folder(folder, spec, device)
        except load_errors() as err:
            raise ModelUnavailableError(
                f"model {spec.name!r}: cannot load the local folder {str(folder)!r} ({type(err).__name__}: {err}). "
                "Fix: the folder must hold config.json, the weights (*.safetensors) and tokenizer files as "
                "written by save_pretrained or `hf download`.") from err

    errors = load_errors()
    try:  # the local HF cache first: instant, and enough whenever the model was downloaded before
        return _from_hub(target, spec, device, local_files_only=True)
    except errors as err:
        if offline_env() or not hub_reachable():
            raise ModelUnavailableError(unavailable_message(spec, err)) from err
    try:
        return _from_hub(target, spec, device, local_files_only=False)
    except errors as err:
        raise ModelUnavailableError(unavailable_message(spec, err)) from err


def _from_hub(target: str, spec: ModelSpec, device: str | torch.device, *, local_files_only: bool):
    model = AutoModelForCausalLM.from_pretrained(
        target, dtype=torch_dtype(spec.dtype), local_files_only=local_files_only, **_device_kwargs(device))
    return model, load_tokenizer(target, spec, local_files_only=local_files_only)


def hub_gguf(spec: ModelSpec) -> Path:
    """A GGUF file of a hub repo, from the local HF cache, else downloaded when the hub is reachable."""
    from huggingface_hub import hf_hub_download

    errors = load_errors()
    try:
        return Path(hf_hub_download(spec.name_or_path, spec.gguf_file, local_files_only=True))
    except errors as err:
        if offline_env() or not hub_reachable():
            raise ModelUnavailableError(unavailable_message(spec, err)) from err
    try:
        return Path(hf_hub_download(spec.name_or_path, spec.gguf_file))
    except errors as err:
        raise ModelUnavailableError(unavailable_message(spec, err)) from err
