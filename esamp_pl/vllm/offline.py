"""The project's configs run through ``vllm.LLM``: ``generate.py engine=vllm`` and ``benchmark.py engine=vllm``.

The config is the own engines' (``conf/config.yaml``: model, sampling, esamp, distiller, n, seed,
prompts, output), validated by the same code before vLLM starts, plus an optional ``vllm:`` block
for the engine itself (:data:`VLLM_DEFAULTS`). Each prompt becomes one vLLM request with ``n``
samples and its own ESamp group, so its samples share one Distiller as in the own engine; the
outputs are the own engine's JSONL records and summary (updates performed, loss per step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from esamp_pl import settings as settings_lib
from esamp_pl.engine import DecodeSettings
from esamp_pl.models import ModelSpec
from esamp_pl.prompts import encode_prompts, load_prompts

VLLM_DEFAULTS: dict[str, Any] = {
    "max_model_len": 1024,  # context per sequence (prompt + new tokens)
    "kv_cache_memory_bytes": 1 << 28,  # KV cache size; on a CPU vLLM otherwise reserves a share of host RAM
    "enforce_eager": True,  # no torch.compile / CUDA graphs (the capture works with both; eager starts fast)
    "max_num_seqs": 256,  # rows vLLM batches at once
}


def vllm_options(cfg: Any) -> dict[str, Any]:
    """``cfg.vllm`` over :data:`VLLM_DEFAULTS`; unknown keys are passed to ``vllm.LLM`` as they are."""
    extra = cfg.get("vllm") if hasattr(cfg, "get") else None
    extra = settings_lib.to_plain(extra) if extra is not None else {}
    return {**VLLM_DEFAULTS, **extra}


def model_folder(spec: ModelSpec) -> str:
    """What vLLM loads: the converted folder of a packaged / GGUF model (converted once), else the hub id or path."""
    if spec.package is not None or spec.gguf_file is not None:
        from esamp_pl.gguf import converted_gguf_folder  # the loader's own conversion cache

        return str(converted_gguf_folder(spec))
    return spec.name_or_path


def plugin_config(cfg: Any, decode: DecodeSettings) -> dict[str, Any]:
    """``additional_config["esamp"]`` for vLLM from the esamp / distiller config groups."""
    esamp = decode.esamp
    adapter = esamp.adapter
    distiller = adapter.distiller
    optimizer = dataclasses.asdict(adapter.optimizer)
    optimizer["betas"] = list(optimizer["betas"])
    return {"sites": "paper", "rank": distiller.rank, "num_blocks": distiller.num_blocks,
            "output_norm": distiller.output_norm, "init_std": distiller.init_std, "gate_bias": distiller.gate_bias,
            "optimizer": optimizer, "rows_trained": adapter.rows_trained, "learn": adapter.learn,
            "max_candidates": decode.sampling.max_candidates, "model_name": cfg.model.name,
            "warm_start_path": cfg.esamp.get("warm_start_path")}


def _check_supported(decode: DecodeSettings) -> None:
    if decode.esamp is not None and not decode.esamp.uses_distiller:
        raise ValueError(f"esamp.mode={decode.esamp.mode!r} is not available with engine=vllm; use esamp.mode=esamp "
                         "or engine=static")


def make_llm(cfg: Any, decode: DecodeSettings, spec: ModelSpec):
    """A ``vllm.LLM`` with the ESamp plugin configured from ``cfg`` (in-process, so the plugin state is local)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    additional = {"esamp": plugin_config(cfg, decode)} if decode.esamp is not None else {}
    return LLM(model=model_folder(spec), dtype=spec.dtype, seed=decode.seed, additional_config=additional,
               **vllm_options(cfg))


def request_params(decode: DecodeSettings, prompt_index: int, group: str | None, *, ignore_eos: bool = False,
                   logprobs: bool = True):
    """vLLM ``SamplingParams`` for one prompt: the config's filters, n, a per-prompt seed and the ESamp switches."""
    from vllm import SamplingParams

    s = decode.sampling
    extra = None
    if decode.esamp is not None:
        extra = {"esamp_beta": float(decode.esamp.beta), "esamp_group": group, "esamp_group_size": decode.n}
    return SamplingParams(n=decode.n, max_tokens=decode.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                          top_p=s.top_p, min_p=s.min_p, seed=decode.seed + prompt_index * decode.n,
                          ignore_eos=ignore_eos, logprobs=0 if logprobs else None, extra_args=extra)


def _with_init(params, init: str):
    if params.extra_args is not None:
        params.extra_args["esamp_init"] = init
    return params


def _sample_record(prompt_index: int, sample_index: int, prompt: str, completion, tokenizer) -> dict[str, Any]:
    """The own engine's record: the stop token (EOS) is not part of the sample, nor of its perplexity."""
    ids = list(completion.token_ids)
    logprobs = [next(iter(step.values())).logprob for step in completion.logprobs] if completion.logprobs else []
    stopped = completion.finish_reason == "stop"
    if stopped and completion.stop_reason is None and ids:  # ended by EOS, which vLLM keeps in token_ids
        ids, logprobs = ids[:-1], logprobs[:len(ids) - 1]
    perplexity = round(math.exp(-sum(logprobs) / len(ids)), 4) if ids and logprobs else None
    return {"prompt_index": prompt_index, "sample_index": sample_index, "prompt": prompt,
            "text": tokenizer.decode(ids, skip_special_tokens=True), "num_tokens": len(ids),
            "finish_reason": "stop" if stopped else "length", "perplexity": perplexity}


def esamp_stats(llm) -> dict[str, Any]:
    """The ESamp counters of the (single) worker."""
    from esamp_pl.vllm.plugin import STATS_METHOD

    return llm.collective_rpc(STATS_METHOD)[0]


def group_summary(stats: dict[str, Any], run_tag: str) -> dict[str, Any]:
    """Updates and the loss per decode step (mean over this run's groups) as in the own engine's summary."""
    groups = [g for g in stats.get("groups", []) if g["group"].startswith(f"group:{run_tag}:")]
    longest = max((len(g["loss_per_step"]) for g in groups), default=0)
    losses = [statistics.fmean(g["loss_per_step"][t] for g in groups if t < len(g["loss_per_step"]))
              for t in range(longest)]
    relative = [statistics.fmean(g["relative_error_per_step"][t] for g in groups
                                 if t < len(g["relative_error_per_step"])) for t in range(longest)]
    return {"distiller_updates": sum(g["updates"] for g in groups),
            "skipped_updates": sum(g["skipped_updates"] for g in groups),
            "loss_first_step": losses[0] if losses else None, "loss_last_step": losses[-1] if losses else None,
            "relative_error_first_step": relative[0] if relative else None,
            "relative_error_last_step": relative[-1] if relative else None, "loss_per_step": losses}


def generate_with_vllm(cfg: DictConfig, llm=None) -> dict[str, Any]:
    """``scripts/generate.py engine=vllm``: validate, start vLLM, generate, write the JSONL and the summary.

    ``llm``: an already running ``vllm.LLM`` with the plugin (its server-wide ESamp settings are used).
    """
    decode = settings_lib.decode_settings(cfg)
    _check_supported(decode)
    init = settings_lib.esamp_init(cfg.esamp)
    spec = ModelSpec.from_config(cfg.model)
    prompts = load_prompts(cfg.prompts)
    output = Path(cfg.output)
    if output.suffix != ".jsonl":
        raise ValueError(f"output must be a .jsonl path, but is {str(output)!r}")

    load_start = time.perf_counter()
    llm = llm if llm is not None else make_llm(cfg, decode, spec)
    load_seconds = time.perf_counter() - load_start
    tokenizer = llm.get_tokenizer()
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=spec.chat_template,
                                max_context=vllm_options(cfg)["max_model_len"], max_new_tokens=decode.max_new_tokens)
    run_tag = uuid.uuid4().hex[:8]
    params = [_with_init(request_params(decode, p, f"{run_tag}:{p}"), init) for p in range(len(prompts))]

    from vllm.inputs import TokensPrompt

    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                           use_tqdm=bool(cfg.get("progress", False)))
    seconds = time.perf_counter() - start
    records = [_sample_record(p, j, prompts[p], completion, tokenizer)
               for p, result in enumerate(results) for j, completion in enumerate(result.outputs)]
    with output.open("w", encoding="utf-8") as sink:
        for record in records:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    import vllm

    tokens = sum(len(c.token_ids) for r in results for c in r.outputs)
    summary: dict[str, Any] = {
        "config": OmegaConf.to_container(cfg, resolve=True), "interrupted": False,
        "model_load_seconds": round(load_seconds, 3), "engine_mode": f"vllm {vllm.__version__}",
        "tokens_generated": tokens, "decode_steps": max((len(c.token_ids) for r in results for c in r.outputs),
                                                        default=0),
        "decode_seconds": round(seconds, 3), "tokens_per_second": round(tokens / max(seconds, 1e-9), 3)}
    if decode.esamp is not None:
        summary.update(group_summary(esamp_stats(llm), run_tag))
    output.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2))
    return summary


OWN_ENGINE = "eager"
"the own engine beside vLLM: the static one fails to set up its StaticCache under vLLM's transformers (5.19)"


def _own_engine_runs(spec: ModelSpec, on: DecodeSettings, prompts: list[str]):
    """ESamp-off / ESamp-on runs of the own engine on the same prompts, in this process (same threads)."""
    from esamp_pl.generation import build_engine
    from esamp_pl.models import load_model

    loaded = load_model(spec)
    own_on = settings_lib.with_hidden_size(on, loaded.model.config.hidden_size)
    own_off = dataclasses.replace(own_on, esamp=None)
    ids = encode_prompts(loaded.tokenizer, prompts, chat_template=spec.chat_template, max_context=loaded.max_context,
                         max_new_tokens=on.max_new_tokens)
    engine = build_engine(loaded, OWN_ENGINE, cuda_graphs=False)

    def run(settings: DecodeSettings):
        def go() -> tuple[int, int | None]:
            result = engine.generate(ids, settings)
            return result.tokens_generated, result.adapter_stats.updates if result.adapter_stats else None
        return go

    return {"own_off": run(own_off), "own_on": run(own_on)}


def benchmark(cfg: DictConfig, llm=None) -> dict[str, Any]:
    """``scripts/benchmark.py engine=vllm``: ESamp-on / ESamp-off tokens per second inside one vLLM instance,
    beside the own (eager) engine's on / off on the same prompts in the same process (``own_engine: false`` skips it).

    Alternated rounds (each mode once per round, the order reversed every other round), every row
    generating exactly ``max_new_tokens`` (EOS ignored); medians over rounds, their ratios, and the
    Distiller updates of the ESamp runs (a fast no-op would show 0). The own engine runs under the OpenMP
    binding vLLM's CPU worker sets for the process (and vLLM then ignores ``torch.set_num_threads``), so its
    figure here is a same-process reference, not a substitute for ``scripts/benchmark.py`` in the main venv.
    """
    on = dataclasses.replace(settings_lib.decode_settings(cfg), ignore_eos=True)
    _check_supported(on)
    if on.esamp is None:
        raise ValueError("the benchmark measures ESamp's cost: esamp.enabled must be true")
    if cfg.rounds < 1:
        raise ValueError(f"rounds must be >= 1, but is {cfg.rounds}")
    spec = ModelSpec.from_config(cfg.model)
    prompts = load_prompts(cfg.prompts)[:cfg.get("num_prompts") or None]
    llm = llm if llm is not None else make_llm(cfg, on, spec)
    off = dataclasses.replace(on, esamp=None)
    prompt_ids = encode_prompts(llm.get_tokenizer(), prompts, chat_template=spec.chat_template,
                                max_context=vllm_options(cfg)["max_model_len"], max_new_tokens=on.max_new_tokens)
    from vllm.inputs import TokensPrompt

    inputs = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]

    def vllm_run(settings: DecodeSettings):
        def go() -> tuple[int, int | None]:
            tag = uuid.uuid4().hex[:8]
            params = [request_params(settings, p, f"{tag}:{p}", ignore_eos=True, logprobs=False)
                      for p in range(len(prompts))]
            results = llm.generate(inputs, params, use_tqdm=False)
            updates = group_summary(esamp_stats(llm), tag)["distiller_updates"] if settings.esamp else None
            return sum(len(c.token_ids) for r in results for c in r.outputs), updates
        return go

    runs = {"off": vllm_run(off), "on": vllm_run(on)}
    if cfg.get("own_engine", True):
        runs.update(_own_engine_runs(spec, on, prompts))
    rates: dict[str, list[float]] = {mode: [] for mode in runs}
    updates: dict[str, list[int]] = {mode: [] for mode in runs}

    def timed(mode: str) -> float:
        start = time.perf_counter()
        tokens, mode_updates = runs[mode]()
        seconds = time.perf_counter() - start
        if mode_updates is not None:
            updates[mode].append(mode_updates)
        return tokens / seconds

    for _ in range(cfg.get("warmup", 1)):
        for mode in runs:
            timed(mode)
    for values in updates.values():
        values.clear()
    for r in range(cfg.rounds):
        for mode in list(runs) if r % 2 == 0 else list(runs)[::-1]:
            rates[mode].append(timed(mode))
    import torch
    import vllm

    median = {m: statistics.median(v) for m, v in rates.items()}

    def ratio(a: str, b: str) -> dict[str, float]:
        return {"median": round(median[a] / median[b], 4),
                "paired": round(statistics.median(x / y for x, y in zip(rates[a], rates[b])), 4)}

    summary = {"engine": f"vllm {vllm.__version__}", "esamp_on_off_ratio": ratio("on", "off")["median"],
               "esamp_on_off_ratio_paired": ratio("on", "off")["paired"],
               "updates": min(updates["on"]) if updates["on"] else 0,
               "tokens_per_s_on": round(median["on"], 2), "tokens_per_s_off": round(median["off"], 2),
               "model": spec.name, "prompts": len(prompts), "n": on.n, "max_new_tokens": on.max_new_tokens,
               "rounds": cfg.rounds, "threads": torch.get_num_threads(),
               "rates": {m: [round(x, 2) for x in v] for m, v in rates.items()}}
    if "own_on" in runs:
        summary.update(own_engine=OWN_ENGINE, own_esamp_on_off_ratio=ratio("own_on", "own_off")["median"],
                       own_updates=min(updates["own_on"]) if updates["own_on"] else 0,
                       own_tokens_per_s_on=round(median["own_on"], 2),
                       own_tokens_per_s_off=round(median["own_off"], 2),
                       vllm_own_off_ratio=ratio("off", "own_off")["median"])
    return summary
