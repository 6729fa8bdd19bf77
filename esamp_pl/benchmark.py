"""``scripts/benchmark.py``: what ESamp costs, and how the decode engine compares with HF ``generate``.

One process, one model. After a warm-up run of each, the modes run alternated for ``rounds``
rounds (A B C, then C B A, ...), so slow drifts of a shared machine hit them alike; HF joins
only the first ``hf_rounds`` (its margin is wide, ESamp's is the one that needs many rounds):

* ``off``: plain sampling on the configured engine;
* ``on``: ESamp (``esamp.*``: beta, online updates, scope) on the same engine;
* ``hf``: Hugging Face ``model.generate`` with the same filters (temperature, top-k, top-p, min-p).

Stop tokens are ignored in all three (``ignore_eos``; HF: ``eos_token_id=None``), so every run
generates prompts x n x max_new_tokens tokens and does the same work; tokens/s compare directly.
Wall time covers prefill and decoding. The report gives medians over rounds, the ratios
ESamp-on/off and engine/HF, the Distiller updates performed (a fast no-op is a bug), peak memory,
and per-step costs of the ESamp extras measured on the run's shapes. Its last line is JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from esamp_pl import settings as settings_lib
from esamp_pl.adapter import TestTimeAdapter
from esamp_pl.engine import DecodeEngine, DecodeSettings, left_pad
from esamp_pl.decoding import build_engine
from esamp_pl.models import LoadedModel, ModelSpec, load_model
from esamp_pl.prompts import encode_prompts, load_prompts
from esamp_pl.sampling import SamplingParams, fuse, select_candidates
from esamp_pl.static_engine import check_engine

log = logging.getLogger(__name__)
MODES = ("off", "on", "hf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the peak resident set size (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def hf_generate(model, prompt_ids: list[list[int]], sampling: SamplingParams, *, n: int, max_new_tokens: int,
                pad_token_id: int, seed: int) -> int:
    """Hugging Face ``generate`` with the same filters, never stopping early; returns the tokens generated."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, pad_token_id, device)
    torch.manual_seed(seed)
    filters: dict[str, Any] = dict(top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p or None)
    if sampling.greedy:
        filters = dict(do_sample=False)
    else:
        filters.update(do_sample=True, temperature=sampling.temperature)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         num_return_sequences=n, eos_token_id=None, pad_token_id=pad_token_id, **filters)
    return out.shape[0] * (out.shape[1] - input_ids.shape[1])


def _median_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def profile_extras(engine: DecodeEngine, settings: DecodeSettings, num_prompts: int, *, reps: int = 20) -> dict:
    """Median milliseconds per decode step of each ESamp extra, on this run's shapes and the model's head.

    Hidden states and logits are random (the costs do not depend on their values). ``update`` is one
    whole online step as the synchronous path runs it (prediction with its activations, loss,
    backward, clipped Adam); ``loss_backward`` is that minus the forward and the optimizer step.
    """
    device, head = engine.device, engine.head
    esamp = settings.esamp
    rows = num_prompts * settings.n
    hidden, vocab = head.weight.shape[1], head.weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(rows, hidden, generator=gen).to(device)
    target = torch.randn(rows, hidden, generator=gen).to(device)
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(device)
    active = torch.ones(rows, dtype=torch.bool, device=device)
    adapter = TestTimeAdapter(esamp.adapter, num_prompts, settings.n, device=device, generator=gen)
    candidates = select_candidates(logits, settings.sampling, exact=False)
    prediction = adapter.predict(source, for_update=False)

    def project_and_fuse():
        fuse(candidates.logits.float(), head.logits_at(prediction, candidates.token_ids).float(), esamp.beta)

    def update():
        adapter.predict(source)
        adapter.update(target, active)

    grads = [torch.randn_like(p) * 1e-3 for p in adapter.bank.parameters()]
    learn = torch.ones(adapter.bank.num_distillers, dtype=torch.bool, device=device)
    costs = {
        "distiller_forward": _median_ms(lambda: adapter.predict(source, for_update=False), device, reps),
        "projection_fusion": _median_ms(project_and_fuse, device, reps),
        "update": _median_ms(update, device, reps),
        "clip_adam": _median_ms(lambda: adapter.optimizer.step(grads, learn), device, reps),
    }
    kept_forward = _median_ms(lambda: adapter.predict(source), device, reps)
    costs["loss_backward"] = max(costs["update"] - kept_forward - costs["clip_adam"], 0.0)
    return {k: round(v, 3) for k, v in costs.items()}


def _settings(cfg: DictConfig, loaded: LoadedModel) -> tuple[DecodeSettings, DecodeSettings]:
    on = settings_lib.with_hidden_size(settings_lib.decode_settings(cfg), loaded.model.config.hidden_size)
    if on.esamp is None or not on.esamp.uses_distiller:
        raise ValueError("the benchmark measures ESamp's cost: esamp.enabled must be true and esamp.mode esamp")
    on = dataclasses.replace(on, ignore_eos=True)
    off = dataclasses.replace(on, esamp=None)
    return off, on


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Load, warm up, run the alternated rounds, print the report; returns the summary (the JSON line)."""
    settings_lib.apply_threads(cfg.threads)
    if cfg.rounds < 1:
        raise ValueError(f"rounds must be >= 1, but is {cfg.rounds}")
    if cfg.hf and not 1 <= cfg.hf_rounds <= cfg.rounds:
        raise ValueError(f"hf_rounds must be in [1, rounds={cfg.rounds}], but is {cfg.hf_rounds}")
    model_spec = ModelSpec.from_config(cfg.model)
    prompts = load_prompts(cfg.prompts)
    if cfg.num_prompts is not None:
        if not 1 <= cfg.num_prompts <= len(prompts):
            raise ValueError(f"num_prompts must be in [1, {len(prompts)}] (the prompts given), but is {cfg.num_prompts}")
        prompts = prompts[:cfg.num_prompts]
    settings_lib.decode_settings(cfg)  # every value checked before the model loads
    check_engine(cfg.engine)

    loaded = load_model(model_spec, device=cfg.device)
    device = next(loaded.model.parameters()).device
    off, on = _settings(cfg, loaded)
    prompt_ids = encode_prompts(loaded.tokenizer, prompts, chat_template=model_spec.chat_template,
                                max_context=loaded.max_context, max_new_tokens=on.max_new_tokens)
    engine = build_engine(loaded, cfg.engine, cuda_graphs=cfg.cuda_graphs)
    runs: dict[str, Callable[[], tuple[int, int | None, str]]] = {}

    def own(settings: DecodeSettings):
        def run():
            result = engine.generate(prompt_ids, settings)
            stats = result.adapter_stats
            return result.tokens_generated, stats.updates if stats is not None else None, result.mode
        return run

    runs["off"], runs["on"] = own(off), own(on)
    runs["hf"] = lambda: (hf_generate(loaded.model, prompt_ids, on.sampling, n=on.n, max_new_tokens=on.max_new_tokens,
                                      pad_token_id=loaded.tokenizer.pad_token_id, seed=on.seed), None, "hf generate")
    modes = [m for m in MODES if m != "hf" or cfg.hf]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, float] = {m: 0.0 for m in modes}
    updates: list[int] = []
    paths: dict[str, str] = {}

    def timed(mode: str) -> float:
        _sync(device)
        _reset_peak_memory(device)
        start = time.perf_counter()
        tokens, mode_updates, path = runs[mode]()
        _sync(device)
        seconds = time.perf_counter() - start
        peaks[mode] = max(peaks[mode], _peak_memory_mb(device))
        paths[mode] = path
        if mode_updates is not None:
            updates.append(mode_updates)
        return tokens / seconds

    for _ in range(cfg.warmup):
        for mode in modes:
            timed(mode)
    updates.clear()
    for r in range(cfg.rounds):
        order = [m for m in modes if m != "hf" or r < cfg.hf_rounds]
        for mode in order if r % 2 == 0 else order[::-1]:
            rates[mode].append(timed(mode))
            log.info("round %d %s: %.1f tokens/s", r, mode, rates[mode][-1])
    median = {m: statistics.median(v) for m, v in rates.items()}
    extras = profile_extras(engine, on, len(prompt_ids)) if cfg.profile else None

    steps = on.max_new_tokens  # tokens per row per run
    step_ms = 1e3 * len(prompt_ids) * on.n / median["off"]  # wall ms per token step, prefill included
    summary: dict[str, Any] = {
        "esamp_on_off_ratio": round(median["on"] / median["off"], 4),
        "esamp_on_off_ratio_paired": round(statistics.median(a / b for a, b in zip(rates["on"], rates["off"])), 4),
        "engine_hf_ratio": round(median["off"] / median["hf"], 4) if "hf" in median else None,
        "updates": min(updates) if updates else 0,
        "tokens_per_s_on": round(median["on"], 2),
        "tokens_per_s_off": round(median["off"], 2),
        "tokens_per_s_hf": round(median["hf"], 2) if "hf" in median else None,
        "device": str(device),
        "engine": cfg.engine,
        "paths": paths,
        "update_mode": on.esamp.adapter.update_mode,
        "model": model_spec.name,
        "prompts": len(prompt_ids),
        "n": on.n,
        "max_new_tokens": steps,
        "rounds": cfg.rounds,
        "threads": torch.get_num_threads(),
        "peak_memory_mb": {m: round(v, 1) for m, v in peaks.items()},
        "rates": {m: [round(x, 2) for x in v] for m, v in rates.items()},
        "step_ms_off": round(step_ms, 2),
        "extras_ms_per_step": extras,
    }
    print(report(summary))
    return summary


def report(summary: dict[str, Any]) -> str:
    """The human-readable table (the JSON line follows it)."""
    lines = [f"model {summary['model']} on {summary['device']} ({summary['threads']} threads), engine "
             f"{summary['engine']}, {summary['prompts']} prompts x {summary['n']} samples x "
             f"{summary['max_new_tokens']} tokens, {summary['rounds']} alternated rounds"]
    for mode in ("off", "on", "hf"):
        if summary["rates"].get(mode):
            lines.append(f"  {mode:>3}: median {statistics.median(summary['rates'][mode]):9.2f} tokens/s  runs "
                         f"{summary['rates'][mode]}  peak {summary['peak_memory_mb'][mode]:.0f} MB  "
                         f"[{summary['paths'].get(mode, '')}]")
    lines.append(f"  ESamp on / off: {summary['esamp_on_off_ratio']:.4f} (median of paired rounds "
                 f"{summary['esamp_on_off_ratio_paired']:.4f}), Distiller updates per run: {summary['updates']}")
    if summary["engine_hf_ratio"] is not None:
        lines.append(f"  engine (ESamp off) / HF generate: {summary['engine_hf_ratio']:.4f}")
    extras = summary["extras_ms_per_step"]
    if extras:
        step = summary["step_ms_off"]
        parts = ", ".join(f"{k} {v:.3f} ms ({100 * v / step:.2f}%)" for k, v in extras.items())
        lines.append(f"  ESamp extras per step (decode step ~{step:.1f} ms): {parts}")
        if summary["update_mode"] == "async":
            lines.append("  (update_mode async: the update runs beside the next forward, on a worker thread or a CUDA "
                         "side stream; the decode thread pays distiller_forward and projection_fusion)")
    return "\n".join(lines)
