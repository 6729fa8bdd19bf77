"""``scripts/generate.py``: load a model, generate n samples per prompt, stream them to JSONL.

Order matters for bad input: every config value, the prompts and the output files are checked
(including that the output folder is writable) before the model is loaded, and nothing is written
until they pass.

What is on disk is always consistent (see :mod:`esamp_pl.run_output` for the files): samples are
appended to ``<output>.partial`` one whole prompt at a time, and ``<output>`` appears (by rename)
only when every prompt is done; ``<output>.summary.json`` is replaced atomically and says
``"interrupted": true`` until then, also after SIGKILL. Running the same command again resumes an
unfinished run (finished prompts are kept; the rest are generated afresh with the same seed, as a
smaller batch, so their tokens may differ from an uninterrupted run); a complete run with the same
settings is not redone; files of a run with other settings are never replaced unless
``overwrite=true``.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from esamp_pl import settings as settings_lib
from esamp_pl.config_dict import check_keys, dataclass_from_config, to_plain
from esamp_pl.decoding import build_engine, initial_distiller_state, stop_token_ids  # noqa: F401 (re-exported)
from esamp_pl.engine import GenerationResult, PromptResult
from esamp_pl.errors import ConfigError, Interrupted
from esamp_pl.files import dumps_json, finite_or_none
from esamp_pl.models import LoadedModel, ModelSpec, load_model
from esamp_pl.prompts import encode_prompts, load_prompts, prompts_file
from esamp_pl.run_output import RunOutput
from esamp_pl.static_engine import check_engine

log = logging.getLogger(__name__)
GROUPS = ("model", "sampling", "esamp", "distiller")
DECODE_KEYS = ("n", "max_new_tokens", "seed")


@dataclass(frozen=True)
class RunOptions:
    """The top-level keys of ``conf/config.yaml`` that are not decode settings."""

    prompts: Any
    "a list of strings, or a .txt / .jsonl path"
    output: str = "outputs/generations.jsonl"
    device: str = "cpu"
    engine: str = "static"
    cuda_graphs: bool = True
    threads: int | None = None
    progress: bool = True
    overwrite: bool = False
    "replace the files of an earlier run with other settings (or regenerate a complete one)"

    def __post_init__(self) -> None:
        if not isinstance(self.overwrite, bool):
            raise ConfigError(f"overwrite must be true or false, but is {self.overwrite!r}")
        if not str(self.output).endswith(".jsonl"):
            raise ConfigError(f"output must be a .jsonl path, but is {str(self.output)!r}")


def run_options(cfg: DictConfig) -> RunOptions:
    """The run options; an unknown top-level key (``+foo=1``) is an error, not ignored."""
    values = {k: v for k, v in to_plain(cfg).items() if k not in (*GROUPS, *DECODE_KEYS)}
    valid = [*GROUPS, *DECODE_KEYS, *(f for f in RunOptions.__dataclass_fields__)]
    check_keys(to_plain(cfg), valid, "")
    return dataclass_from_config(RunOptions, values, "")


def sample_records(result: PromptResult, prompts: list[str], tokenizer, n: int,
                   prompt_index: int | None = None) -> list[dict[str, Any]]:
    """One JSON-ready record per sample of a finished prompt (perplexity null when empty or not finite)."""
    index = result.prompt_index if prompt_index is None else prompt_index
    return [{"prompt_index": index, "sample_index": j, "prompt": prompts[index],
             "text": tokenizer.decode(sample.token_ids, skip_special_tokens=True),
             "num_tokens": len(sample.token_ids), "finish_reason": sample.finish_reason,
             "perplexity": finite_or_none(sample.perplexity, 4) if sample.token_ids else None}
            for j, sample in enumerate(result.samples)]


def run_summary(cfg: DictConfig, result: GenerationResult | None, *, interrupted: bool,
                load_seconds: float) -> dict[str, Any]:
    """Config and what this process did (tokens, speed, Distiller updates and losses); JSON-safe."""
    summary: dict[str, Any] = {"config": to_plain(cfg), "interrupted": interrupted,
                               "model_load_seconds": round(load_seconds, 3)}
    if result is not None:
        summary.update(engine_mode=result.mode, tokens_generated=result.tokens_generated, decode_steps=result.steps,
                       decode_seconds=round(result.decode_seconds, 3),
                       tokens_per_second=round(result.tokens_per_second, 3))
        summary["truncated_rows"] = result.truncated_rows  # row-steps whose candidate set was cut; 0 = exact
        if result.kl_budget is not None:  # esamp.kl_budget: the beta it realised, per row-step
            summary.update(kl_budget=result.kl_budget.as_dict())
        stats = result.adapter_stats
        if stats is not None:
            losses = [finite_or_none(v) for v in stats.loss_per_step]
            errors = [finite_or_none(v) for v in stats.relative_error_per_step]
            summary.update(distiller_updates=stats.updates, skipped_updates=stats.skipped_nonfinite,
                           loss_first_step=losses[0] if losses else None,
                           loss_last_step=losses[-1] if losses else None,
                           relative_error_first_step=errors[0] if errors else None,
                           relative_error_last_step=errors[-1] if errors else None,
                           loss_per_step=losses)
    return summary


def run_generation(cfg: DictConfig, *, load: Callable[[ModelSpec, str], LoadedModel] | None = None) -> dict[str, Any]:
    """Validate, load, generate, write. Returns the run summary.

    ``load(spec, device)`` replaces :func:`load_model` (tests pass tiny in-memory models).
    """
    options = run_options(cfg)
    decode = settings_lib.decode_settings(cfg)  # every value checked before any work
    try:
        engine_kind = check_engine(options.engine)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    settings_lib.apply_threads(options.threads)
    device = settings_lib.check_device(options.device)
    model_spec = ModelSpec.from_config(cfg.model)
    prompts = load_prompts(options.prompts)
    out = RunOutput(Path(options.output).expanduser(), n=decode.n, prompts=prompts, config=to_plain(cfg))
    plan = out.plan(overwrite=options.overwrite, protected=prompts_file(options.prompts))
    if plan.complete:
        log.info("%s already holds this run, complete; nothing to do (overwrite=true regenerates it)", out.path)
        return plan.summary

    load_start = time.perf_counter()
    loaded = (load or load_model)(model_spec, device)
    load_seconds = time.perf_counter() - load_start
    decode = settings_lib.with_hidden_size(decode, loaded.model.config.hidden_size)
    prompt_ids = encode_prompts(loaded.tokenizer, prompts, chat_template=model_spec.chat_template,
                                max_context=loaded.max_context, max_new_tokens=decode.max_new_tokens)
    initial_state = initial_distiller_state(cfg, loaded, decode)
    engine = build_engine(loaded, engine_kind, cuda_graphs=options.cuda_graphs)

    todo = [i for i in range(len(prompts)) if i not in plan.done]
    result: GenerationResult | None = None

    def summary(interrupted: bool) -> dict[str, Any]:
        return {**run_summary(cfg, result, interrupted=interrupted, load_seconds=load_seconds),
                "prompts_resumed": len(plan.done)}

    writer = out.start(plan, summary(True))
    if plan.done:
        log.info("resuming %s: %d of %d prompts already done", out.partial, len(plan.done), len(prompts))
    bar = tqdm(total=decode.max_new_tokens, desc="decode steps", disable=not options.progress or not todo)

    def write_prompt(done: PromptResult) -> None:
        index = todo[done.prompt_index]
        writer.write_prompt(index, sample_records(done, prompts, loaded.tokenizer, decode.n, prompt_index=index),
                            summary(True))

    try:
        if todo:
            result = engine.generate([prompt_ids[i] for i in todo], decode, initial_state=initial_state,
                                     on_prompt_done=write_prompt, on_step=lambda _step: bar.update(1))
    except KeyboardInterrupt as stop:
        writer.stop(summary(True))
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        raise Interrupted(f"{writer.done_count} of {len(prompts)} prompts done, kept in {out.partial}; "
                          "run the same command again to resume", signum) from stop
    except BaseException:
        writer.stop(summary(True))
        raise
    finally:
        bar.close()
    writer.finish(summary(False))
    return writer.summary


def summary_line(summary: dict[str, Any]) -> str:
    """A one-screen digest of the summary for the terminal."""
    keys = ("engine_mode", "tokens_generated", "tokens_per_second", "distiller_updates", "skipped_updates",
            "loss_first_step", "loss_last_step", "relative_error_first_step", "relative_error_last_step", "kl_budget")
    return dumps_json({k: summary[k] for k in keys if k in summary})


__all__ = ["RunOptions", "run_options", "sample_records", "run_summary", "run_generation", "summary_line",
           "build_engine", "initial_distiller_state", "stop_token_ids"]
