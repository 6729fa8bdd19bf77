"""Turn the Hydra config into the typed settings the engine takes, validating every value first.

Everything here runs before a model is loaded, so a bad value fails in a second with a
:class:`~esamp_pl.errors.ConfigError` that names it, and nothing is written. The Distiller's hidden
size is only known once the model is loaded; :func:`with_hidden_size` fills it in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from esamp_pl.adapter import AdapterSpec
from esamp_pl.config_dict import check_keys, dataclass_from_config, to_plain
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeSettings, ESampSettings
from esamp_pl.errors import ConfigError
from esamp_pl.init import INIT_KINDS
from esamp_pl.optim import AdamSpec
from esamp_pl.sampling import SamplingParams

__all__ = ["to_plain", "sampling_params", "distiller_spec", "esamp_init", "warm_start_path", "esamp_settings",
           "decode_settings", "check_threads", "apply_threads", "check_device", "with_hidden_size", "ESAMP_KEYS"]

INITS = INIT_KINDS
_UNKNOWN_HIDDEN = 1  # placeholder until the model is loaded
_INIT_KEYS = ("enabled", "init", "warm_start", "warm_start_path")
_ESAMP_FIELDS = tuple(f.name for f in dataclasses.fields(ESampSettings) if f.name != "adapter")
_ADAPTER_FIELDS = tuple(f.name for f in dataclasses.fields(AdapterSpec) if f.name != "distiller")
ESAMP_KEYS = tuple(sorted({*_INIT_KEYS, *_ESAMP_FIELDS, *_ADAPTER_FIELDS}))
"every key the ``esamp`` config section may hold"


def sampling_params(cfg: Any) -> SamplingParams:
    return dataclass_from_config(SamplingParams, cfg, "sampling")


def distiller_spec(cfg: Any, hidden_size: int = _UNKNOWN_HIDDEN) -> DistillerSpec:
    return dataclass_from_config(DistillerSpec, cfg, "distiller", hidden_size=hidden_size)


def esamp_init(esamp_cfg: Any) -> str:
    """The Distiller init to use: ``random``, ``warm`` or ``svd``.

    ``warm_start=true`` means warm, and so does a ``warm_start_path``: a checkpoint named by the user
    is used, never ignored (with ``init=svd`` the two contradict each other, which is an error).
    """
    init = esamp_cfg.get("init", "random")
    if init not in INITS:
        raise ConfigError(f"esamp.init must be one of {INITS}, but is {init!r}")
    if esamp_cfg.get("warm_start", False) or esamp_cfg.get("warm_start_path"):
        if init == "svd":
            raise ConfigError(f"esamp.init=svd contradicts esamp.warm_start / esamp.warm_start_path="
                              f"{esamp_cfg.get('warm_start_path')!r} (a pre-trained checkpoint). Fix: drop one of them")
        init = "warm"
    return init


def warm_start_path(esamp_cfg: Any) -> Path | None:
    """``esamp.warm_start_path`` as an existing file, or None; checked before the model loads."""
    value = esamp_cfg.get("warm_start_path")
    if not value:
        return None
    path = Path(str(value)).expanduser()
    if path.is_dir():
        raise ConfigError(f"esamp.warm_start_path={value!r} is a directory; it must name a "
                          "*.distiller.safetensors file (e.g. checkpoints/<model>/paper-r64.distiller.safetensors)")
    if not path.is_file():
        raise ConfigError(f"esamp.warm_start_path={value!r}: no such file. Fix: pass an existing "
                          "*.distiller.safetensors file, create one with scripts/pretrain_distiller.py, or drop the key")
    return path


def esamp_settings(esamp_cfg: Any, distiller_cfg: Any, hidden_size: int = _UNKNOWN_HIDDEN) -> ESampSettings | None:
    """ESamp settings, or None when ``esamp.enabled`` is false (plain sampling)."""
    values = to_plain(esamp_cfg)
    check_keys(values, ESAMP_KEYS, "esamp")
    if not values.pop("enabled", True):
        return None
    optimizer = values.pop("optimizer", {}) or {}
    if "betas" in optimizer:
        optimizer["betas"] = tuple(optimizer["betas"])
    adapter_values = {k: v for k, v in values.items() if k in _ADAPTER_FIELDS}
    adapter = dataclass_from_config(AdapterSpec, adapter_values, "esamp",
                                    distiller=distiller_spec(distiller_cfg, hidden_size),
                                    optimizer=dataclass_from_config(AdamSpec, optimizer, "esamp.optimizer"))
    return dataclass_from_config(ESampSettings, {k: v for k, v in values.items() if k in _ESAMP_FIELDS}, "esamp",
                                 adapter=adapter)


def _check_int(name: str, value: Any, minimum: int | None, meaning: str) -> int:
    """Hydra reads ``n=true`` as a bool and ``seed=abc`` as a string; both must fail here, not in torch."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ConfigError(f"{name} ({meaning}) must be an integer{bound}, but is {value!r}")
    return value


def decode_settings(cfg: DictConfig, hidden_size: int = _UNKNOWN_HIDDEN) -> DecodeSettings:
    """All decode settings from the top-level config (``n``, ``max_new_tokens``, ``seed``, ...)."""
    if esamp_init(cfg.esamp) == "warm" and cfg.esamp.get("enabled", True):
        warm_start_path(cfg.esamp)
    n = _check_int("n", cfg.n, 1, "samples per prompt")
    max_new_tokens = _check_int("max_new_tokens", cfg.max_new_tokens, 1, "tokens per sample")
    seed = _check_int("seed", cfg.seed, None, "random seed")
    try:
        return DecodeSettings(n=n, max_new_tokens=max_new_tokens, seed=seed, sampling=sampling_params(cfg.sampling),
                              esamp=esamp_settings(cfg.esamp, cfg.distiller, hidden_size))
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_threads(threads: Any) -> int | None:
    """``threads`` (config key) if it is a positive integer or None, else a ConfigError naming the fix."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or null (torch's default), but is {threads!r}")
    return threads


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count (config key ``threads``; None keeps torch's default).

    On a shared machine, torch's default of one OpenMP thread per core competing with other jobs can make a
    decode step many times slower than a single thread; ``threads=1`` is the cure.
    """
    if check_threads(threads) is not None:
        import torch

        torch.set_num_threads(threads)


def check_device(device: Any, key: str = "device") -> str:
    """``device`` (e.g. cpu, cuda, cuda:1, mps) if this machine has it; else a ConfigError, before any load."""
    import torch

    try:
        parsed = torch.device(str(device))
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"{key}={device!r} is not a torch device. Fix: {key}=cpu, {key}=cuda or {key}=cuda:1") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={device} needs a CUDA GPU, but torch sees none (torch {torch.__version__}, CUDA "
                              f"build: {torch.version.cuda or 'no'}). Fix: {key}=cpu, or run where a GPU is visible")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(f"{key}={device}: this machine has {count} CUDA device(s) (0..{count - 1}). "
                              f"Fix: pick one of them")
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}={device}: the MPS backend is not available here. Fix: {key}=cpu")
    return str(device)


def with_hidden_size(settings: DecodeSettings, hidden_size: int) -> DecodeSettings:
    """The same settings with the Distiller sized for the loaded model."""
    if settings.esamp is None:
        return settings
    adapter = settings.esamp.adapter
    adapter = dataclasses.replace(adapter, distiller=dataclasses.replace(adapter.distiller, hidden_size=hidden_size))
    return dataclasses.replace(settings, esamp=dataclasses.replace(settings.esamp, adapter=adapter))
