"""Config node -> dataclass, the one way: unknown keys are errors, bad values are ConfigErrors.

Hydra lets any key through (``+sampling.typical_p=0.9``, ``+foo=1``); a key that nothing reads would
be silently ignored, so every conversion from a config mapping to a typed spec goes through
:func:`dataclass_from_config`, which names the unknown key and lists the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from esamp_pl.errors import ConfigError

T = TypeVar("T")


def to_plain(cfg: Any) -> dict:
    """A config node as plain Python containers (interpolations resolved), e.g. to hash or save it."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    if isinstance(cfg, DictConfig):
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            key = getattr(err, "full_key", None) or "a key"
            raise ConfigError(f"{key} is required but not set (??? in the config). Fix: pass {key}=<value>") from err
        except InterpolationResolutionError as err:
            raise ConfigError(f"cannot resolve {getattr(err, 'full_key', '') or 'a value'}: {err.msg}") from err
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"expected a mapping of keys to values, but got {type(cfg).__name__}: {cfg!r}")
    return dict(cfg)


def check_keys(values: Mapping[str, Any], valid: Iterable[str], section: str) -> None:
    """Raise a ConfigError naming every key of ``values`` not in ``valid`` (and listing the valid ones)."""
    valid = sorted(set(valid))
    unknown = sorted(set(values) - set(valid))
    if unknown:
        where = f"in {section}" if section else "at the top level"
        raise ConfigError(f"unknown key(s) {unknown} {where}; valid keys: {valid}. Fix: remove or correct them")


def dataclass_from_config(cls: type[T], cfg: Any, section: str, *, ignore: Iterable[str] = (),
                          **fixed: Any) -> T:
    """``cls(**cfg)`` with every key checked; ``fixed`` values are set by the caller, ``ignore`` keys dropped.

    A ValueError or TypeError of the dataclass's own validation becomes a :class:`ConfigError` (the
    message is kept), so the scripts print it as a user error rather than a traceback.
    """
    values = {k: v for k, v in to_plain(cfg).items() if k not in set(ignore)}
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(values, [n for n in names if n not in fixed], section)
    try:
        return cls(**values, **fixed)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err
