"""``scripts/generate.py``: load a model, generate n samples per prompt, stream them to JSONL.

Order matters for bad input: every config value, the prompts and the output path are checked
before any sample is generated, and the output file is only opened once they pass. Each prompt's
samples are written (and flushed) as soon as the prompt finishes, so an interruption loses nothing
already generated; the run summary records that it was interrupted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from esamp_pl import settings as settings_lib
from esamp_pl.engine import DecodeEngine, DecodeSettings, GenerationResult, PromptResult
from esamp_pl.models import LoadedModel, ModelSpec, load_model
from esamp_pl.prompts import encode_prompts, load_prompts
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import check_engine, make_engine


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


def build_engine(loaded: LoadedModel, kind: str = "eager", *, cuda_graphs: bool = True) -> DecodeEngine:
    """The decode engine ``kind`` (config key ``engine``): eager (reference loop) or static (fixed shapes)."""
    return make_engine(kind, loaded.model, sites=SitePair(loaded.spec.sites), stop_token_ids=stop_token_ids(loaded),
                       pad_token_id=loaded.tokenizer.pad_token_id, cuda_graphs=cuda_graphs)


def initial_distiller_state(cfg: DictConfig, loaded: LoadedModel,
                            decode: DecodeSettings) -> dict[str, torch.Tensor] | None:
    """Weights copied into every Distiller before decoding (warm start / svd), or None (random)."""
    if decode.esamp is None:
        return None
    init = settings_lib.esamp_init(cfg.esamp)
    if init == "random":
        return None
    from esamp_pl.init import initial_distiller_state as resolve  # pre-training side, loaded on demand

    return resolve(init, loaded_model=loaded, sites=SitePair(loaded.spec.sites),
                   distiller_spec=decode.esamp.adapter.distiller,
                   warm_start_path=cfg.esamp.get("warm_start_path"))


def sample_records(result: PromptResult, prompts: list[str], tokenizer, n: int) -> list[dict[str, Any]]:
    """One JSON-ready record per sample of a finished prompt."""
    return [{"prompt_index": result.prompt_index, "sample_index": j, "prompt": prompts[result.prompt_index],
             "text": tokenizer.decode(sample.token_ids, skip_special_tokens=True),
             "num_tokens": len(sample.token_ids), "finish_reason": sample.finish_reason,
             "perplexity": round(sample.perplexity, 4) if sample.token_ids else None}
            for j, sample in enumerate(result.samples)]


def run_summary(cfg: DictConfig, result: GenerationResult | None, *, interrupted: bool,
                load_seconds: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True), "interrupted": interrupted,
                               "model_load_seconds": round(load_seconds, 3)}
    if result is not None:
        summary.update(engine_mode=result.mode, tokens_generated=result.tokens_generated, decode_steps=result.steps,
                       decode_seconds=round(result.decode_seconds, 3),
                       tokens_per_second=round(result.tokens_per_second, 3))
        if result.kl_budget is not None:  # esamp.kl_budget: the beta it realised, per row-step
            summary.update(kl_budget=result.kl_budget.as_dict())
        stats = result.adapter_stats
        if stats is not None:
            losses = stats.loss_per_step
            summary.update(distiller_updates=stats.updates, skipped_updates=stats.skipped_nonfinite,
                           loss_first_step=losses[0] if losses else None,
                           loss_last_step=losses[-1] if losses else None,
                           relative_error_first_step=stats.relative_error_per_step[0] if losses else None,
                           relative_error_last_step=stats.relative_error_per_step[-1] if losses else None,
                           loss_per_step=losses)
    return summary


def run_generation(cfg: DictConfig) -> dict[str, Any]:
    """Validate, load, generate, write. Returns the run summary."""
    decode = settings_lib.decode_settings(cfg)  # every value checked before any work
    engine_kind = check_engine(cfg.get("engine", "eager"))
    settings_lib.apply_threads(cfg.get("threads"))
    model_spec = ModelSpec.from_config(cfg.model)
    SitePair(model_spec.sites)
    prompts = load_prompts(cfg.prompts)
    output = Path(cfg.output)
    if output.suffix != ".jsonl":
        raise ValueError(f"output must be a .jsonl path, but is {str(output)!r}")

    load_start = time.perf_counter()
    loaded = load_model(model_spec, device=cfg.device)
    load_seconds = time.perf_counter() - load_start
    decode = settings_lib.with_hidden_size(decode, loaded.model.config.hidden_size)
    prompt_ids = encode_prompts(loaded.tokenizer, prompts, chat_template=model_spec.chat_template,
                                max_context=loaded.max_context, max_new_tokens=decode.max_new_tokens)
    initial_state = initial_distiller_state(cfg, loaded, decode)
    engine = build_engine(loaded, engine_kind, cuda_graphs=cfg.get("cuda_graphs", True))

    output.parent.mkdir(parents=True, exist_ok=True)
    summary_path = output.with_suffix(".summary.json")
    result = None
    interrupted = False
    bar = tqdm(total=decode.max_new_tokens, desc="decode steps", disable=not cfg.progress)
    try:
        with output.open("w", encoding="utf-8") as sink:
            def write_prompt(done: PromptResult) -> None:
                for record in sample_records(done, prompts, loaded.tokenizer, decode.n):
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()

            result = engine.generate(prompt_ids, decode, initial_state=initial_state,
                                     on_prompt_done=write_prompt, on_step=lambda _step: bar.update(1))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        bar.close()
        summary = run_summary(cfg, result, interrupted=interrupted, load_seconds=load_seconds)
        summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """A one-screen digest of the summary for the terminal."""
    keys = ("engine_mode", "tokens_generated", "tokens_per_second", "distiller_updates", "skipped_updates", "loss_first_step",
            "loss_last_step", "relative_error_first_step", "relative_error_last_step", "kl_budget")
    return json.dumps({k: summary[k] for k in keys if k in summary})


