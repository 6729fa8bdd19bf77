"""``scripts/benchmark.py``: what ESamp costs, and how the decode engine compares with HF ``generate``.

One process, one model. After a warm-up run of each, the modes run alternated for ``rounds``
rounds (A B C, then C B A, ...), so slow drifts of a shared machine hit them alike; HF joins
only the first ``hf_rounds`` (its margin is wide, ESamp's is the one that needs many rounds):

* ``off``: plain sampling on the configured engine;
* ``on``: ESamp (``esamp.*``: beta, online updates, scope) on the same engine;
* ``on_nographs`` (``nographs=true``): ESamp on the static engine with CUDA graphs off, what the graphs win;
* ``hf``: Hugging Face ``model.generate`` with the same filters (temperature, top-k, top-p, min-p).

Stop tokens are ignored in all of them (``ignore_eos``; HF: ``eos_token_id=None``), so every run
generates prompts x n x max_new_tokens tokens and does the same work; tokens/s compare directly.

Two clocks, because a shared machine makes wall time noisy: wall time (tokens/s) and the
process's CPU time per token, which counts every thread, the update's worker too: ESamp's whole
cost, and much less sensitive to neighbours than the wall clock. The report gives medians over
rounds, the ratios ESamp-on/off (wall and CPU), engine/HF, the Distiller updates performed (a
fast no-op is a bug), peak memory, how long the decode thread waited for the update, and the
per-step costs of the ESamp extras with their share of a step, twice: as ESamp's own calls cost
inside the timed runs (CPU: CPU time of each call, on the decode thread and on the update's worker),
and timed alone in a loop on the run's shapes (warm caches, so a lower bound: in the real decode the
model's forward has just evicted the Distiller's weights, moments and the head's rows from the
caches, and these calls cost ~2x as much). Its last line is JSON.

``sweep`` measures the same for a list of prompts x n points (the shape of the paper's Table 3)
and plots the extras' share of a step against the rows; ``benchmark_shape`` replaces the model's
weights by random ones of a given architecture (no download: the GPU check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from esamp_pl import settings as settings_lib
from esamp_pl.adapter import TestTimeAdapter
from esamp_pl.async_update import ThreadUpdater
from esamp_pl.decoding import build_engine
from esamp_pl.decode_loop import DecodeLoop, DecodeSettings, left_pad
from esamp_pl.esamp import ESampStep, candidate_logits
from esamp_pl.models import LoadedModel, ModelSpec, load_model, model_fingerprint, torch_dtype
from esamp_pl.prompts import encode_prompts, load_prompts
from esamp_pl.sampling import SamplingParams, fuse, select_candidates
from esamp_pl.static_engine import check_engine

log = logging.getLogger(__name__)
MODES = ("off", "on", "on_nographs", "hf")
MEMORY_SHARE = 0.6
"a sweep point runs only if its KV cache needs at most this share of the free memory"


# -- clocks and memory --------------------------------------------------------------------------------------

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


def _free_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def kv_cache_bytes(config, rows: int, positions: int, dtype: torch.dtype) -> int:
    """Bytes of a full KV cache for ``rows`` sequences of ``positions`` tokens."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return rows * positions * config.num_hidden_layers * 2 * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def _timed_methods(targets: list[tuple[type, str]], clock: Callable[[], float]) -> Iterator[list[tuple[str, bool, float]]]:
    """Wraps each ``(class, method)`` for the duration and records ``(method, ran on this (the decode) thread,
    seconds by clock)`` per call; restored after. The benchmark's own instrument."""
    records: list[tuple[str, bool, float]] = []
    decode_thread = threading.get_ident()
    originals = [(cls, name, getattr(cls, name)) for cls, name in targets]

    def timed(name: str, original: Callable) -> Callable:
        @functools.wraps(original)
        def call(*args, **kwargs):
            start = clock()
            try:
                return original(*args, **kwargs)
            finally:
                records.append((name, threading.get_ident() == decode_thread, clock() - start))
        return call

    for cls, name, original in originals:
        setattr(cls, name, timed(name, original))
    try:
        yield records
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


WORKER_WAITS = [(ThreadUpdater, "wait"), (ThreadUpdater, "take_prediction")]
"where the decode thread waits for the CPU worker (wall time): the update, and the prediction it runs after it"
IN_SITU_DECODE_CALLS = [(ESampStep, "before_prediction"), (ESampStep, "scores"), (ESampStep, "launch"),
                        (ThreadUpdater, "predict_early")]
"""ESamp's calls on the decode thread: the wait for the update, prediction (inline) + fusion, the update's start,
and the hand-off of the source state to the worker from inside the forward"""
IN_SITU_DECODE = tuple(name for _, name in IN_SITU_DECODE_CALLS)
IN_SITU_WORKER = ("predict", "update", "update_block")
"TestTimeAdapter's calls that a CPU worker runs: the early prediction and the update"


def _in_situ_timers():
    """CPU time of ESamp's own calls inside the timed runs, by thread (CPU runs)."""
    return _timed_methods(IN_SITU_DECODE_CALLS + [(TestTimeAdapter, name) for name in IN_SITU_WORKER],
                          time.thread_time)


def in_situ_costs(records: list[tuple[str, bool, float]], decode_steps: int) -> dict[str, Any]:
    """Milliseconds per decode step of ESamp's calls as they ran in the real decode (caches as the model's
    forward leaves them, the worker beside it): on the decode thread, on the worker, and per call."""
    parts: dict[str, float] = {}
    for name, on_decode_thread, seconds in records:
        if (name in IN_SITU_DECODE) == on_decode_thread:  # calls nested in a decode-thread call are inside it
            key = name if on_decode_thread else f"worker_{name}"
            parts[key] = parts.get(key, 0.0) + seconds
    per_step = {k: round(1e3 * v / decode_steps, 4) for k, v in parts.items()}
    return {"decode_thread": round(sum(v for k, v in per_step.items() if not k.startswith("worker_")), 4),
            "worker": round(sum(v for k, v in per_step.items() if k.startswith("worker_")), 4), "parts": per_step}


# -- models ---------------------------------------------------------------------------------------------------

def byte_tokenizer():
    """256 byte tokens + <eos>, <pad>: any text encodes, nothing downloads (for random-weight models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    tokenizer.padding_side = "left"
    return tokenizer


def random_model(shape: Any, spec: ModelSpec, device: str | torch.device) -> LoadedModel:
    """A model of the architecture ``shape.config`` (a transformers config: model_type and sizes) with random
    weights in ``spec.dtype``, built on ``device``, with a byte tokenizer. A step costs what the real model's
    costs (same shapes, and the static engine's candidate space is fixed), so it times like it, offline."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = settings_lib.to_plain(shape.config)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    tokenizer = byte_tokenizer()
    if tokenizer.pad_token_id >= config.vocab_size:
        raise ValueError(f"benchmark_shape.config.vocab_size must be > {tokenizer.pad_token_id} (the byte "
                         f"tokenizer's ids), but is {config.vocab_size}")
    dtype = torch_dtype(spec.dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    named = dataclasses.replace(spec, name=f"random {shape.name}", name_or_path=f"random weights, {shape.name}",
                                gguf_file=None, package=None, sha256=None, chat_template=False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=named, fingerprint=model_fingerprint(config))


# -- one mode ---------------------------------------------------------------------------------------------------

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
    """Median milliseconds of ``fn``: CPU time of this thread on a CPU (steady under load), wall time on CUDA."""
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def profile_extras(engine: DecodeLoop, settings: DecodeSettings, num_prompts: int, *, reps: int = 20) -> dict:
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
    # The candidate space the engine itself uses: the CPU widens as needed (a small top-k space), CUDA's fixed
    # layout sizes it from the configuration (the whole vocabulary for min-p / top-p: a dense head).
    candidates = select_candidates(logits, settings.sampling, exact=not engine.fixed_candidates)
    prediction = adapter.predict(source, for_update=False)

    def project_and_fuse():  # the projection the engine runs
        projected = candidate_logits(head, prediction, candidates, compact=not engine.fixed_candidates)
        fuse(candidates.logits.float(), projected.float(), esamp.beta)

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
    return {k: round(v, 4) for k, v in costs.items()}


def critical_extras_ms(extras: dict[str, float], update_mode: str) -> float:
    """The extras the decode thread pays: prediction and fusion, and the update too when it runs inline."""
    return extras["distiller_forward"] + extras["projection_fusion"] + (extras["update"] if update_mode == "sync"
                                                                          else 0.0)


# -- set-up ---------------------------------------------------------------------------------------------------

def _settings(cfg: DictConfig, loaded: LoadedModel) -> tuple[DecodeSettings, DecodeSettings]:
    on = settings_lib.with_hidden_size(settings_lib.decode_settings(cfg), loaded.model.config.hidden_size)
    if on.esamp is None or not on.esamp.uses_distiller:
        raise ValueError("the benchmark measures ESamp's cost: esamp.enabled must be true and esamp.mode esamp")
    on = dataclasses.replace(on, ignore_eos=True)
    off = dataclasses.replace(on, esamp=None)
    return off, on


def _check(cfg: DictConfig, prompts: list[str]) -> list[tuple[int, int]]:
    """Every benchmark value checked before the model loads; returns the (prompts, n) points to measure."""
    settings_lib.check_threads(cfg.threads)
    if cfg.rounds < 1:
        raise ValueError(f"rounds must be >= 1, but is {cfg.rounds}")
    if cfg.hf and not 1 <= cfg.hf_rounds <= cfg.rounds:
        raise ValueError(f"hf_rounds must be in [1, rounds={cfg.rounds}], but is {cfg.hf_rounds}")
    settings_lib.decode_settings(cfg)
    check_engine(cfg.engine)
    if cfg.get("sweep"):
        points = [tuple(p) for p in cfg.sweep]
        if not all(len(p) == 2 and all(isinstance(v, int) and v >= 1 for v in p) for p in points):
            raise ValueError(f"sweep must be a list of [prompts, n] pairs of positive integers, but is {cfg.sweep}")
        if cfg.get("plot") and Path(cfg.plot).exists():
            raise ValueError(f"plot={cfg.plot} exists and is never overwritten; choose another path or remove it")
        return points
    num_prompts = cfg.num_prompts if cfg.num_prompts is not None else len(prompts)
    if not 1 <= num_prompts <= len(prompts):
        raise ValueError(f"num_prompts must be in [1, {len(prompts)}] (the prompts given), but is {cfg.num_prompts}")
    return [(num_prompts, cfg.n)]


def _load(cfg: DictConfig) -> LoadedModel:
    spec = ModelSpec.from_config(cfg.model)
    shape = cfg.get("benchmark_shape")
    return random_model(shape, spec, cfg.device) if shape else load_model(spec, device=cfg.device)


# -- measuring ------------------------------------------------------------------------------------------------

def measure(cfg: DictConfig, loaded: LoadedModel, engines: dict[str, DecodeLoop], prompt_ids: list[list[int]],
            off: DecodeSettings, on: DecodeSettings, *, hf: bool) -> dict[str, Any]:
    """Warm up, run the alternated rounds on one (prompts, n) point, profile the extras; returns its summary."""
    device = next(loaded.model.parameters()).device
    runs: dict[str, Callable[[], tuple[int, int | None, str]]] = {}

    def own(engine: DecodeLoop, settings: DecodeSettings):
        def run():
            result = engine.generate(prompt_ids, settings)
            stats = result.adapter_stats
            return result.tokens_generated, stats.updates if stats is not None else None, result.mode
        return run

    runs["off"], runs["on"] = own(engines["off"], off), own(engines["on"], on)
    if "nographs" in engines:
        runs["on_nographs"] = own(engines["nographs"], on)
    runs["hf"] = lambda: (hf_generate(loaded.model, prompt_ids, on.sampling, n=on.n, max_new_tokens=on.max_new_tokens,
                                      pad_token_id=loaded.tokenizer.pad_token_id, seed=on.seed), None, "hf generate")
    modes = [m for m in MODES if m in runs and (m != "hf" or hf)]
    rates: dict[str, list[float]] = {m: [] for m in modes}
    cpu_rates: dict[str, list[float]] = {m: [] for m in modes}
    thread_rates: dict[str, list[float]] = {m: [] for m in modes}  # the decode thread's CPU time alone
    peaks: dict[str, float] = {m: 0.0 for m in modes}
    updates: dict[str, list[int]] = {m: [] for m in modes}
    paths: dict[str, str] = {}

    def timed(mode: str) -> None:
        _sync(device)
        _reset_peak_memory(device)
        start, cpu_start, thread_start = time.perf_counter(), time.process_time(), time.thread_time()
        tokens, mode_updates, path = runs[mode]()
        _sync(device)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        thread_seconds = time.thread_time() - thread_start
        peaks[mode] = max(peaks[mode], _peak_memory_mb(device))
        paths[mode] = path
        if mode_updates is not None:
            updates[mode].append(mode_updates)
        rates[mode].append(tokens / seconds)
        cpu_rates[mode].append(tokens / max(cpu_seconds, 1e-9))
        thread_rates[mode].append(tokens / max(thread_seconds, 1e-9))

    for _ in range(cfg.warmup):
        for mode in modes:
            timed(mode)
    for series in (rates, cpu_rates, thread_rates, updates):
        for values in series.values():
            values.clear()
    load_before = _load_average()
    with _timed_methods(WORKER_WAITS, time.perf_counter) as waits, _in_situ_timers() as calls:
        for r in range(cfg.rounds):
            order = [m for m in modes if m != "hf" or r < cfg.hf_rounds]
            for mode in order if r % 2 == 0 else order[::-1]:
                waits_before, calls_before = len(waits), len(calls)
                timed(mode)
                if mode != "on":  # only ESamp-on is of interest
                    del waits[waits_before:]
                    del calls[calls_before:]
                log.info("round %d %s: %.1f tokens/s, %.1f tokens per CPU-second", r, mode, rates[mode][-1],
                         cpu_rates[mode][-1])
    median = {m: statistics.median(v) for m, v in rates.items()}
    cpu_median = {m: statistics.median(v) for m, v in cpu_rates.items()}
    rows = len(prompt_ids) * on.n
    decode_steps = cfg.rounds * (on.max_new_tokens - 1)

    def paired(series: dict[str, list[float]]) -> tuple[float, float, float | None]:
        """The rounds' on / off ratios: median, mean, and the mean's standard error (how far a whole-run ratio
        can be trusted on this machine)."""
        ratios = [on / off for on, off in zip(series["on"], series["off"])]
        se = statistics.stdev(ratios) / math.sqrt(len(ratios)) if len(ratios) > 1 else None
        return (round(statistics.median(ratios), 4), round(statistics.mean(ratios), 4),
                None if se is None else round(se, 4))

    wall_paired, cpu_paired = paired(rates), paired(cpu_rates)
    summary: dict[str, Any] = {
        "esamp_on_off_ratio": round(median["on"] / median["off"], 4),
        "esamp_on_off_ratio_paired": wall_paired[0],
        "cpu_time_ratio": round(cpu_median["on"] / cpu_median["off"], 4),
        "cpu_time_ratio_paired": cpu_paired[0],
        "esamp_on_off_ratio_paired_mean": wall_paired[1],
        "esamp_on_off_ratio_paired_se": wall_paired[2],
        "cpu_time_ratio_paired_mean": cpu_paired[1],
        "cpu_time_ratio_paired_se": cpu_paired[2],
        "engine_hf_ratio": round(median["off"] / median["hf"], 4) if "hf" in median else None,
        "graphs_ratio": round(median["on"] / median["on_nographs"], 4) if "on_nographs" in median else None,
        "updates": min(updates["on"]) if updates["on"] else 0,
        "updates_per_mode": {m: min(v) for m, v in updates.items() if v},
        "tokens_per_s_on": round(median["on"], 2),
        "tokens_per_s_off": round(median["off"], 2),
        "tokens_per_s_hf": round(median["hf"], 2) if "hf" in median else None,
        "tokens_per_s_on_nographs": round(median["on_nographs"], 2) if "on_nographs" in median else None,
        "cpu_ms_per_token_on": round(1e3 / cpu_median["on"], 4),
        "cpu_ms_per_token_off": round(1e3 / cpu_median["off"], 4),
        "decode_thread_cpu_ms_per_token": {m: round(1e3 / statistics.median(v), 4) for m, v in thread_rates.items()},
        "device": str(device),
        "engine": cfg.engine,
        "paths": paths,
        "update_mode": on.esamp.adapter.update_mode,
        "model": loaded.spec.name,
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "prompts": len(prompt_ids),
        "n": on.n,
        "rows": rows,
        "max_new_tokens": on.max_new_tokens,
        "rounds": cfg.rounds,
        "threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": _load_average()},
        "peak_memory_mb": {m: round(v, 1) for m, v in peaks.items()},
        "rates": {m: [round(x, 2) for x in v] for m, v in rates.items()},
        "cpu_rates": {m: [round(x, 2) for x in v] for m, v in cpu_rates.items()},
        "step_ms_off": round(1e3 * rows / median["off"], 3),
        "cpu_step_ms_off": round(1e3 * rows / cpu_median["off"], 3),
        "update_wait_ms_per_step": round(1e3 * sum(w for _, _, w in waits) / decode_steps, 4) if waits else None,
        "in_situ_ms_per_step": None,
        "extras_share_in_situ": None,
        "extras_share_total_in_situ": None,
        "cpu_time_ratio_in_situ": None,
        "extras_ms_per_step": None,
        "extras_share": None,
        "extras_share_total": None,
        "cpu_time_ratio_profiled": None,
    }
    if device.type == "cpu":  # CPU time per thread is what a call costs there (on CUDA, kernels run async)
        situ = in_situ_costs(calls, decode_steps)
        step = summary["cpu_step_ms_off"]
        total = situ["decode_thread"] + situ["worker"]
        summary.update(in_situ_ms_per_step=situ, extras_share_in_situ=round(situ["decode_thread"] / step, 5),
                       extras_share_total_in_situ=round(total / step, 5),
                       cpu_time_ratio_in_situ=round(step / (step + total), 4))
    if cfg.profile:
        extras = profile_extras(engines["on"], on, len(prompt_ids))
        # A CPU step is timed in CPU time like its extras (one decode thread); a CUDA step in wall time.
        step = summary["cpu_step_ms_off"] if device.type == "cpu" else summary["step_ms_off"]
        critical = critical_extras_ms(extras, summary["update_mode"])
        total = extras["distiller_forward"] + extras["projection_fusion"] + extras["update"]
        summary.update(extras_ms_per_step=extras, extras_share=round(critical / step, 5),
                       extras_share_total=round(total / step, 5),
                       cpu_time_ratio_profiled=round(step / (step + total), 4) if device.type == "cpu" else None)
    return summary


def _engines(cfg: DictConfig, loaded: LoadedModel) -> dict[str, DecodeLoop]:
    """One engine per mode: the static engine keeps one captured program, so a shared one would re-capture its
    CUDA graphs inside every timed run as the modes alternate."""
    engines = {mode: build_engine(loaded, cfg.engine, cuda_graphs=cfg.cuda_graphs) for mode in ("off", "on")}
    if cfg.get("nographs"):
        engines["nographs"] = build_engine(loaded, "static", cuda_graphs=False)
    return engines


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Load, warm up, run the alternated rounds, print the report; returns the summary (the JSON line).

    With ``sweep`` set, every (prompts, n) point is measured in turn (prompts repeat cyclically when a
    point asks for more than are given) and the summary is ``{"points": [...], ...}``.
    """
    prompts = load_prompts(cfg.prompts)
    points = _check(cfg, prompts)
    settings_lib.apply_threads(cfg.threads)
    loaded = _load(cfg)
    off, on = _settings(cfg, loaded)
    engines = _engines(cfg, loaded)
    if not cfg.get("sweep"):
        prompt_ids = _encode(loaded, prompts[:points[0][0]], on)
        summary = measure(cfg, loaded, engines, prompt_ids, off, on, hf=cfg.hf)
        print(report(summary))
        return summary
    return _sweep(cfg, loaded, engines, prompts, points, off, on)


def _encode(loaded: LoadedModel, prompts: list[str], on: DecodeSettings) -> list[list[int]]:
    return encode_prompts(loaded.tokenizer, prompts, chat_template=loaded.spec.chat_template,
                          max_context=loaded.max_context, max_new_tokens=on.max_new_tokens)


def _sweep(cfg: DictConfig, loaded: LoadedModel, engines: dict[str, DecodeLoop], prompts: list[str],
           points: list[tuple[int, int]], off: DecodeSettings, on: DecodeSettings) -> dict[str, Any]:
    device = next(loaded.model.parameters()).device
    dtype = next(loaded.model.parameters()).dtype
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for num_prompts, n in points:
        prompt_ids = _encode(loaded, [prompts[i % len(prompts)] for i in range(num_prompts)], on)
        positions = max(len(ids) for ids in prompt_ids) + on.max_new_tokens
        need, free = kv_cache_bytes(loaded.model.config, num_prompts * n, positions, dtype), _free_memory_bytes(device)
        if free is not None and need > MEMORY_SHARE * free:
            reason = f"KV cache {need / 2**30:.1f} GiB > {MEMORY_SHARE:.0%} of free {free / 2**30:.1f} GiB"
            log.warning("sweep point %d x %d skipped: %s", num_prompts, n, reason)
            skipped.append({"prompts": num_prompts, "n": n, "reason": reason})
            continue
        point = measure(cfg, loaded, engines, prompt_ids, dataclasses.replace(off, n=n),
                        dataclasses.replace(on, n=n), hf=False)
        print(report(point), flush=True)
        results.append(point)
    summary: dict[str, Any] = {"points": results, "skipped": skipped, "model": loaded.spec.name,
                               "device": str(device), "max_new_tokens": on.max_new_tokens, "rounds": cfg.rounds,
                               "plot": None}
    print(sweep_table(results, skipped))
    if results and cfg.get("plot"):
        summary["plot"] = str(plot_sweep(results, Path(cfg.plot)))
    return summary


# -- reports --------------------------------------------------------------------------------------------------

def report(summary: dict[str, Any]) -> str:
    """The human-readable table of one point (the JSON line follows it)."""
    lines = [f"model {summary['model']} ({summary['dtype']}) on {summary['device']} ({summary['threads']} threads), "
             f"engine {summary['engine']}, {summary['prompts']} prompts x {summary['n']} samples x "
             f"{summary['max_new_tokens']} tokens, {summary['rounds']} alternated rounds, load average "
             f"{summary['load_average']['before']} -> {summary['load_average']['after']}"]
    for mode in MODES:
        if summary["rates"].get(mode):
            lines.append(f"  {mode:>11}: median {statistics.median(summary['rates'][mode]):9.2f} tokens/s, "
                         f"{statistics.median(summary['cpu_rates'][mode]):9.2f} per CPU-second  runs "
                         f"{summary['rates'][mode]}  peak {summary['peak_memory_mb'][mode]:.0f} MB  "
                         f"[{summary['paths'].get(mode, '')}]")
    lines.append(f"  ESamp on / off: wall {summary['esamp_on_off_ratio']:.4f} (paired rounds "
                 f"{summary['esamp_on_off_ratio_paired']:.4f}), CPU time {summary['cpu_time_ratio']:.4f} (paired "
                 f"{summary['cpu_time_ratio_paired']:.4f}); Distiller updates per run: {summary['updates']}")
    if summary["cpu_time_ratio_paired_se"] is not None:
        lines.append(f"  mean of the paired rounds' ratios +- s.e. (the whole-run figures' resolution): wall "
                     f"{summary['esamp_on_off_ratio_paired_mean']:.4f} +- {summary['esamp_on_off_ratio_paired_se']:.4f}, "
                     f"CPU time {summary['cpu_time_ratio_paired_mean']:.4f} +- {summary['cpu_time_ratio_paired_se']:.4f}")
    if summary["engine_hf_ratio"] is not None:
        lines.append(f"  engine (ESamp off) / HF generate: {summary['engine_hf_ratio']:.4f}")
    if summary["graphs_ratio"] is not None:
        lines.append(f"  ESamp on, CUDA graphs / no graphs: {summary['graphs_ratio']:.4f}")
    thread = summary["decode_thread_cpu_ms_per_token"]
    lines.append(f"  CPU ms per token, all threads: off {summary['cpu_ms_per_token_off']:.4f}, on "
                 f"{summary['cpu_ms_per_token_on']:.4f}; decode thread alone: off {thread['off']:.4f}, on {thread['on']:.4f}")
    if summary["update_wait_ms_per_step"] is not None:
        lines.append(f"  decode thread waited {summary['update_wait_ms_per_step']:.3f} ms per step for the worker "
                     f"(the update and the prediction)")
    situ = summary.get("in_situ_ms_per_step")
    if situ:
        step = summary["cpu_step_ms_off"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in situ["parts"].items())
        lines.append(f"  ESamp's calls in the timed runs (CPU time per step; step ~{step:.1f} ms): decode thread "
                     f"{situ['decode_thread']:.3f} ms, worker {situ['worker']:.3f} ms ({parts})")
        lines.append(f"  their share of a step: {100 * summary['extras_share_in_situ']:.3f}% on the decode thread, "
                     f"{100 * summary['extras_share_total_in_situ']:.3f}% in all (CPU-time ratio this predicts: "
                     f"{summary['cpu_time_ratio_in_situ']:.4f})")
    extras = summary["extras_ms_per_step"]
    if extras:
        cpu = summary["device"] == "cpu"
        step = summary["cpu_step_ms_off"] if cpu else summary["step_ms_off"]
        parts = ", ".join(f"{k} {v:.3f} ms ({100 * v / step:.2f}%)" for k, v in extras.items())
        lines.append(f"  ESamp extras per step, timed alone in a loop ({'CPU time' if cpu else 'wall'}; warm caches: "
                     f"a lower bound; step ~{step:.1f} ms): {parts}")
        lines.append(f"  share of a step: {100 * summary['extras_share']:.3f}% on the decode thread, "
                     f"{100 * summary['extras_share_total']:.3f}% in all"
                     + (f" (CPU-time ratio this predicts: {summary['cpu_time_ratio_profiled']:.4f})" if cpu else ""))
        if summary["update_mode"] == "async":
            lines.append("  (update_mode async: the update runs beside the next forward, on a worker thread or a CUDA "
                         "side stream; the decode thread pays distiller_forward and projection_fusion)")
    return "\n".join(lines)


def _point_shares(p: dict[str, Any]) -> tuple[float, float, float, float]:
    """(extras ms on the decode thread, in all, and their shares of a step) of a point: ESamp's calls in situ
    where measured (CPU), else the extras timed alone; NaN where neither is."""
    situ = p.get("in_situ_ms_per_step")
    if situ:
        return (situ["decode_thread"], situ["decode_thread"] + situ["worker"], p["extras_share_in_situ"],
                p["extras_share_total_in_situ"])
    extras = p.get("extras_ms_per_step")
    if not extras:
        return (float("nan"),) * 4
    total = sum(extras.get(k, 0.0) for k in ("distiller_forward", "projection_fusion", "update"))
    return critical_extras_ms(extras, p["update_mode"]), total, p["extras_share"], p["extras_share_total"]


def sweep_table(points: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    """One line per point: extras per step and their share, the CPU-time and wall ratios, updates performed."""
    lines = ["prompts x n   rows   step ms   extras ms (decode thread / all)   share % (decode / all)   "
             "CPU-time ratio   wall ratio (paired)   updates   (extras: in situ on a CPU, else timed alone)"]
    for p in points:
        critical, total, share, share_total = _point_shares(p)
        step = p["cpu_step_ms_off"] if p["device"] == "cpu" else p["step_ms_off"]
        lines.append(f"{p['prompts']:>7} x {p['n']:<3} {p['rows']:>6} {step:>9.2f}   {critical:>8.3f} / {total:<8.3f}"
                     f"                 {100 * share:>6.3f} / {100 * share_total:<6.3f}          "
                     f"{p['cpu_time_ratio']:>6.4f}           {p['esamp_on_off_ratio_paired']:>6.4f}          "
                     f"{p['updates']}")
    lines += [f"{s['prompts']:>7} x {s['n']:<3} skipped: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def plot_sweep(points: list[dict[str, Any]], path: Path) -> Path:
    """PNG of the extras' share of a step against the rows (prompts x n); refuses to overwrite a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if path.exists():
        raise FileExistsError(f"{path} exists; choose another plot= path or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [p["rows"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    shares = [_point_shares(p) for p in points]
    ax.plot(rows, [100 * s[2] for s in shares], "o-", label="ESamp on the decode thread")
    ax.plot(rows, [100 * s[3] for s in shares], "s--", label="ESamp in all (the worker's update included)")
    ax.plot(rows, [100 * (1 - p["cpu_time_ratio"]) for p in points], "^:", label="measured: 1 - CPU-time ratio")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows per step (prompts x n)")
    ax.set_ylabel("% of a decode step")
    ax.set_title(f"ESamp's cost, {points[0]['model']} on {points[0]['device']}, {points[0]['max_new_tokens']} tokens")
    for p, share in zip(points, shares):
        ax.annotate(f"{p['prompts']}x{p['n']}", (p["rows"], 100 * share[3]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
