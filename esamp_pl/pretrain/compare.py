"""How well each Distiller init predicts during the first decode steps: random vs warm vs svd.

For each init the same prompts are decoded with the same seed and settings, and the engine's
per-step relative error ``sum ||h - f(s)||^2 / sum ||h||^2`` (over the rows trained that step) is
averaged over the first ``k`` decode steps. With ``esamp.beta=0`` every init sees the very same
tokens (ESamp does not tilt), so the numbers compare predictions on identical hidden states.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig

from esamp_pl import settings as settings_lib
from esamp_pl.decoding import build_engine
from esamp_pl.files import finite_or_none
from esamp_pl.init import INIT_KINDS, initial_distiller_state
from esamp_pl.models import ModelSpec, load_model
from esamp_pl.prompts import encode_prompts, load_prompts
from esamp_pl.sites import SitePair


def mean_over_first(values: list[float], k: int) -> float | None:
    """Mean of the first ``k`` values; None when there are none or the mean is not finite (JSON has no NaN)."""
    head = values[:k]
    return finite_or_none(sum(head) / len(head)) if head else None


def compare_inits(cfg: DictConfig, inits: tuple[str, ...] = INIT_KINDS,
                  windows: tuple[int, ...] = (32, 128)) -> dict[str, Any]:
    """Relative Distiller error over the first ``windows`` decode steps, per init."""
    decode = settings_lib.decode_settings(cfg)
    if decode.esamp is None:
        raise ValueError("compare_inits needs ESamp on (esamp.enabled=true)")
    model_spec = ModelSpec.from_config(cfg.model)
    loaded = load_model(model_spec, device=cfg.device)
    decode = settings_lib.with_hidden_size(decode, loaded.model.config.hidden_size)
    prompts = load_prompts(cfg.prompts)
    prompt_ids = encode_prompts(loaded.tokenizer, prompts, chat_template=model_spec.chat_template,
                                max_context=loaded.max_context, max_new_tokens=decode.max_new_tokens)
    engine = build_engine(loaded)
    report: dict[str, Any] = {"model": model_spec.name, "sites": model_spec.sites, "prompts": len(prompts),
                              "n": decode.n, "max_new_tokens": decode.max_new_tokens, "beta": decode.esamp.beta,
                              "distiller": dataclasses.asdict(decode.esamp.adapter.distiller), "inits": {}}
    for kind in inits:
        state = initial_distiller_state(kind, loaded_model=loaded, sites=SitePair(model_spec.sites),
                                        distiller_spec=decode.esamp.adapter.distiller,
                                        warm_start_path=settings_lib.warm_start_path(cfg.esamp))
        result = engine.generate(prompt_ids, decode, initial_state=state)
        stats = result.adapter_stats
        curve = stats.relative_error_per_step
        report["inits"][kind] = {
            **{f"relative_error_first_{k}": mean_over_first(curve, k) for k in windows},
            "relative_error_step_0": finite_or_none(curve[0]) if curve else None,
            "loss_first_32": mean_over_first(stats.loss_per_step, 32),
            "steps": result.steps, "updates": stats.updates,
            "relative_error_per_step": [finite_or_none(v) for v in curve]}
    return report
