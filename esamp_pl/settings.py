"""Turn the Hydra config into the typed settings the engine takes, validating every value first.

Everything here runs before a model is loaded, so a bad value fails in a second with a message
that names it, and nothing is written. The Distiller's hidden size is only known once the model is
loaded; :func:`with_hidden_size` fills it in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeSettings, ESampSettings
from esamp_pl.init import INIT_KINDS
from esamp_pl.optim import AdamSpec
from esamp_pl.sampling import SamplingParams

INITS = INIT_KINDS
_UNKNOWN_HIDDEN = 1  # placeholder until the model is loaded


def to_plain(cfg: Any) -> dict:
    """A config node as plain Python containers (interpolations resolved), e.g. to hash or save it."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _build(cls, values: dict, section: str):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {section}; valid keys: {sorted(fields)}")
    return cls(**values)


def sampling_params(cfg: Any) -> SamplingParams:
    return _build(SamplingParams, to_plain(cfg), "sampling")


def distiller_spec(cfg: Any, hidden_size: int = _UNKNOWN_HIDDEN) -> DistillerSpec:
    return _build(DistillerSpec, {**to_plain(cfg), "hidden_size": hidden_size}, "distiller")


def esamp_init(esamp_cfg: Any) -> str:
    """The Distiller init to use: ``random``, ``warm`` or ``svd`` (``warm_start=true`` means warm)."""
    init = "warm" if esamp_cfg.get("warm_start", False) else esamp_cfg.get("init", "random")
    if init not in INITS:
        raise ValueError(f"esamp.init must be one of {INITS}, but is {init!r}")
    return init


def esamp_settings(esamp_cfg: Any, distiller_cfg: Any, hidden_size: int = _UNKNOWN_HIDDEN) -> ESampSettings | None:
    """ESamp settings, or None when ``esamp.enabled`` is false (plain sampling)."""
    values = to_plain(esamp_cfg)
    if not values.pop("enabled", True):
        return None
    optimizer = values.pop("optimizer", {}) or {}
    if "betas" in optimizer:
        optimizer["betas"] = tuple(optimizer["betas"])
    for key in ("init", "warm_start", "warm_start_path"):
        values.pop(key, None)
    beta = values.pop("beta", 0.25)
    mode = values.pop("mode", "esamp")
    error = values.pop("error", "plain")
    adapter = _build(AdapterSpec, {**values, "distiller": distiller_spec(distiller_cfg, hidden_size),
                                   "optimizer": _build(AdamSpec, optimizer, "esamp.optimizer")}, "esamp")
    return ESampSettings(adapter=adapter, beta=beta, mode=mode, error=error)


def decode_settings(cfg: DictConfig, hidden_size: int = _UNKNOWN_HIDDEN) -> DecodeSettings:
    """All decode settings from the top-level config (``n``, ``max_new_tokens``, ``seed``, ...)."""
    esamp_init(cfg.esamp)
    return DecodeSettings(n=cfg.n, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          sampling=sampling_params(cfg.sampling),
                          esamp=esamp_settings(cfg.esamp, cfg.distiller, hidden_size))


def check_threads(threads: Any) -> int | None:
    """``threads`` (config key) if it is a positive integer or None, else a ValueError naming the fix."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or null (torch's default), but is {threads!r}")
    return threads


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU thread count (config key ``threads``; None keeps torch's default).

    On a shared machine, torch's default of one OpenMP thread per core competing with other jobs can make a
    decode step many times slower than a single thread; ``threads=1`` is the cure.
    """
    if check_threads(threads) is not None:
        import torch

        torch.set_num_threads(threads)


def with_hidden_size(settings: DecodeSettings, hidden_size: int) -> DecodeSettings:
    """The same settings with the Distiller sized for the loaded model."""
    if settings.esamp is None:
        return settings
    adapter = settings.esamp.adapter
    adapter = dataclasses.replace(adapter, distiller=dataclasses.replace(adapter.distiller, hidden_size=hidden_size))
    return dataclasses.replace(settings, esamp=dataclasses.replace(settings.esamp, adapter=adapter))
