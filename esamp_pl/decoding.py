"""A loaded model made ready to decode: its stop ids, its engine, and the Distiller's starting weights.

Shared by generation, evaluation, the benchmark and pre-training (the self-generated corpus), so
none of them imports another's script module.
"""

from __future__ import annotations

import torch

from esamp_pl import settings as settings_lib
from esamp_pl.decode_loop import DecodeLoop, DecodeSettings
from esamp_pl.models import LoadedModel
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import make_engine


def stop_token_ids(loaded: LoadedModel) -> list[int]:
    """Token ids that end a sample: the tokenizer's EOS and the model's generation-config EOS."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def build_engine(loaded: LoadedModel, kind: str = "eager", *, cuda_graphs: bool = True) -> DecodeLoop:
    """The decode engine ``kind`` (config key ``engine``): eager (reference loop) or static (fixed shapes)."""
    return make_engine(kind, loaded.model, sites=SitePair(loaded.spec.sites), stop_token_ids=stop_token_ids(loaded),
                       pad_token_id=loaded.tokenizer.pad_token_id, cuda_graphs=cuda_graphs)


def initial_distiller_state(cfg, loaded: LoadedModel, decode: DecodeSettings) -> dict[str, torch.Tensor] | None:
    """Weights copied into every Distiller before decoding (warm start / svd), or None (random).

    ``cfg`` is any config with an ``esamp`` section; ``esamp.warm_start_path`` alone means a warm start.
    """
    if decode.esamp is None:
        return None
    init = settings_lib.esamp_init(cfg.esamp)
    if init == "random":
        return None
    from esamp_pl.init import initial_distiller_state as resolve

    return resolve(init, loaded_model=loaded, sites=SitePair(loaded.spec.sites),
                   distiller_spec=decode.esamp.adapter.distiller,
                   warm_start_path=settings_lib.warm_start_path(cfg.esamp))
