"""The fixed-shape decode engine: static KV cache, pre-allocated buffers, CUDA graphs on CUDA.

It runs the same step as :class:`~esamp_pl.engine.DecodeEngine` (shared code: prefill, candidate
choice, fusion, sampling, per-row bookkeeping) and gives the same tokens for the same seed, with
every shape fixed before the first decode step, so that a step allocates no new buffer and never
waits on the host:

* a transformers ``StaticCache`` and buffers sized for prompts x n rows x (longest prompt +
  max_new_tokens); finished rows stay in the batch (their tokens are not kept), so no shape changes;
* the attention mask is one boolean row per sequence, extended in place each step and handed to
  the model as a 4-D mask (transformers then builds none);
* candidates are exactly what the filters keep. On CUDA the candidate space is sized from the
  configuration (``select_candidates(exact=False)``: the vocabulary, or ``top_k`` plus room for
  ties), so its shape is fixed and no host read is needed; only more ties with the k-th logit
  than that room could be cut, and ``GenerationResult.truncated_rows`` counts them (0 = exact).
  On a CPU, where a host read costs nothing, the space widens on demand like the eager engine's;
* the uniform numbers of all steps are drawn up front and the step index lives on the device;
* stop-token bookkeeping stays on the device; the host looks every ``check_every`` steps.

On CUDA the step is captured once as two graphs, the model forward and then the rest (Distiller
prediction, filters, fusion, sampling, bookkeeping), and the Distiller update as a third one,
replayed on a side stream with ``esamp.update_mode=async`` (:mod:`esamp_pl.async_update`: the next
prediction waits for it, lag 0). The graphs are kept for later calls with the same shapes and
settings. If capture fails, the engine warns once and runs the same step eagerly.

On a CPU the same structure runs without graphs. The static cache is as fast as the dynamic one
there (measured on SmolLM2-135M, 32 rows); ``scripts/benchmark.py`` compares both engines.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from esamp_pl.adapter import TestTimeAdapter
from esamp_pl.async_update import InlineUpdater, StreamUpdater, make_updater
from esamp_pl.engine import DecodeEngine, DecodeSettings, DecodeState, GenerationResult, PromptResult
from esamp_pl.kl_budget import BetaRecorder
from esamp_pl.sites import SiteCapture, SitePair

log = logging.getLogger(__name__)

ENGINES = ("eager", "static")
WARMUP_STEPS = 2
"eager steps run before capture (lazy initialisation: kernel selection, cuBLAS handles)"


@dataclass(eq=False)
class _Program:
    """The fixed buffers of one (shape, settings) combination and, on CUDA, its captured graphs."""

    cache: StaticCache
    key_valid: torch.Tensor
    "[rows, cache length] which cache slots each row attends to"
    input_ids: torch.Tensor
    "[rows, 1] the token fed to the next forward"
    position: torch.Tensor
    "[rows, 1] its position"
    write_column: torch.Tensor
    "[1] the cache slot the next forward writes"
    step: torch.Tensor
    "[1] the decode step being chosen (index into uniforms and generated)"
    uniforms: torch.Tensor
    "[max_new_tokens, rows]"
    state: DecodeState
    truncated: torch.Tensor
    adapter: TestTimeAdapter | None
    updater: InlineUpdater | None
    betas: BetaRecorder | None = None
    "realised beta and KL per step (esamp.kl_budget set)"
    logits: torch.Tensor | None = None
    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
    key: tuple = field(default=())


class StaticDecodeEngine(DecodeEngine):
    """Fixed-shape decoding with the same interface and tokens as :class:`DecodeEngine`."""

    def __init__(self, model, *, sites: SitePair, stop_token_ids: list[int], pad_token_id: int,
                 cuda_graphs: bool = True) -> None:
        super().__init__(model, sites=sites, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.fixed_candidates = self.device.type == "cuda"
        # True: the candidate space is sized from the configuration (fixed shapes, no host read; CUDA).
        # False: it widens on demand with one host read per step (CPU, where that read is free). Same tokens.
        self.graph_failure: str | None = None
        "why CUDA graph capture failed (then every call runs eagerly); None if it did not"
        self._cached: _Program | None = None

    # -- the two halves of a decode step, shared by eager runs, warm-up and capture --------------------------

    def _forward_step(self, prog: _Program, capture: SiteCapture) -> None:
        prog.key_valid.index_fill_(1, prog.write_column, True)
        prog.logits = self._forward(prog.input_ids, prog.key_valid[:, None, None, :], prog.position, prog.cache)
        prog.position += 1
        prog.write_column += 1
        prog.source, prog.target = capture.pop()

    def _choose_step(self, prog: _Program, settings: DecodeSettings, stops: torch.Tensor) -> None:
        active = ~prog.state.finished
        uniform = prog.uniforms.index_select(0, prog.step).squeeze(0)
        for_update = prog.updater is None or prog.updater.reuses_prediction
        token = self._choose(prog.logits, settings.esamp, prog.adapter, prog.source, settings.sampling, uniform,
                             exact=not self.fixed_candidates, for_update=for_update, truncated=prog.truncated,
                             target=prog.target, active=active, betas=prog.betas)
        prog.input_ids.copy_(token.unsqueeze(-1))
        prog.state.record(token, prog.step, stops, self.pad_token_id, prog.logits)
        prog.step += 1
        if prog.updater is not None:
            prog.updater.stage(prog.source, prog.target, active)

    def _decode_step(self, prog: _Program, settings: DecodeSettings, stops: torch.Tensor,
                     capture: SiteCapture) -> None:
        if prog.graphs is not None:
            prog.graphs[0].replay()
        else:
            self._forward_step(prog, capture)
        if prog.updater is not None:
            prog.updater.wait()
        if prog.graphs is not None:
            prog.graphs[1].replay()
        else:
            self._choose_step(prog, settings, stops)
        if prog.updater is not None:
            prog.updater.launch()

    # -- buffers ---------------------------------------------------------------------------------------------

    def _new_program(self, prefill_cache: DynamicCache, settings: DecodeSettings, rows: int, width: int,
                     num_prompts: int, initial_state, key: tuple) -> _Program:
        device = self.device
        cache = StaticCache(config=self.model.config, max_cache_len=width + settings.max_new_tokens - 1)
        first = [layer.keys for layer in prefill_cache.layers]
        cache.early_initialization(batch_size=rows, num_heads=[k.shape[1] for k in first],
                                   head_dim=[k.shape[-1] for k in first], dtype=first[0].dtype, device=device)
        if not all(type(layer) is StaticLayer for layer in cache.layers):
            raise NotImplementedError(
                f"{type(self.model).__name__} needs sliding-window or hybrid cache layers, which the static engine "
                "does not support; use engine=eager")
        adapter = self._new_adapter(settings, num_prompts, initial_state)
        updater = None
        if adapter is not None:
            updater = make_updater(adapter, settings.esamp.adapter.update_mode, device=device,
                                   cuda_graphs=self.cuda_graphs and self.graph_failure is None)
        long = dict(dtype=torch.long, device=device)
        return _Program(
            cache=cache, key_valid=torch.zeros(rows, cache.layers[0].max_cache_len, dtype=torch.bool, device=device),
            input_ids=torch.zeros(rows, 1, **long), position=torch.zeros(rows, 1, **long),
            write_column=torch.zeros(1, **long), step=torch.zeros(1, **long),
            uniforms=torch.zeros(settings.max_new_tokens, rows, device=device),
            state=DecodeState.empty(rows, settings.max_new_tokens, self.pad_token_id, device),
            truncated=torch.zeros((), **long), adapter=adapter, updater=updater,
            betas=self._beta_recorder(settings, rows, device), key=key)

    def _load(self, prog: _Program, prefill_cache: DynamicCache, attention_mask: torch.Tensor,
              next_position: torch.Tensor, settings: DecodeSettings, n: int, initial_state) -> None:
        """(Re)start ``prog`` in place from a prefill: cache, mask, positions, counters, Distillers."""
        width = attention_mask.shape[1]
        for layer, prefilled in zip(prog.cache.layers, prefill_cache.layers):
            layer.keys[:, :, :width].copy_(prefilled.keys.repeat_interleave(n, dim=0))
            layer.values[:, :, :width].copy_(prefilled.values.repeat_interleave(n, dim=0))
            layer.keys[:, :, width:].zero_()
            layer.values[:, :, width:].zero_()
            layer.cumulative_length.fill_(width)  # StaticLayer's write position (a device tensor)
        prog.key_valid.zero_()
        prog.key_valid[:, :width] = attention_mask.bool()
        prog.position.copy_(next_position)
        prog.write_column.fill_(width)
        prog.step.zero_()
        prog.uniforms.copy_(self._uniforms(settings, prog.uniforms.shape[1]))
        state = prog.state
        state.generated.fill_(self.pad_token_id)
        for t in (state.lengths, state.stopped, state.finished, state.logprob_sums, state.nonfinite, prog.truncated):
            t.zero_()
        if prog.betas is not None:
            prog.betas.reset()
        if prog.adapter is not None:
            prog.adapter.restart(torch.Generator().manual_seed(settings.seed + 1), initial_state)

    # -- CUDA graphs -----------------------------------------------------------------------------------------

    def _capture(self, prog: _Program, settings: DecodeSettings, stops: torch.Tensor, capture: SiteCapture) -> None:
        """Warm up, then capture the step's two halves and the update; on failure warn once, stay eager."""
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._decode_step(prog, settings, stops, capture)
                if prog.updater is not None:
                    prog.updater.wait()
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            forward, choose = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward, pool=pool):
                self._forward_step(prog, capture)
            with torch.cuda.graph(choose, pool=pool):
                self._choose_step(prog, settings, stops)
            if isinstance(prog.updater, StreamUpdater):
                prog.updater.capture()  # its own pool: it may run concurrently with the forward graph
            prog.graphs = (forward, choose)
        except Exception as err:  # capture is an optimisation: the eager step gives the same tokens
            self.graph_failure = f"{type(err).__name__}: {err}".splitlines()[0]
            warnings.warn(f"CUDA graph capture failed ({self.graph_failure}); the static engine runs eagerly from "
                          "now on", RuntimeWarning, stacklevel=3)
            log.warning("CUDA graph capture failed (%s); running eagerly", self.graph_failure)
            prog.graphs = None
            if isinstance(prog.updater, StreamUpdater):
                prog.updater._graph = None
            torch.cuda.synchronize(self.device)

    def _mode(self, prog: _Program, settings: DecodeSettings) -> str:
        if prog.graphs is not None:
            mode = "static, cuda graphs"
        elif self.graph_failure is not None:
            mode = f"static, eager (CUDA graph capture failed: {self.graph_failure})"
        else:
            mode = "static, eager"
        if prog.adapter is not None:
            mode += f", {settings.esamp.adapter.update_mode} update"
        return mode

    # -- the loop --------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: DecodeSettings, *,
                 initial_state: dict[str, torch.Tensor] | None = None,
                 on_prompt_done: Callable[[PromptResult], None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> GenerationResult:
        """Same contract as :meth:`DecodeEngine.generate`."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # streams, events and graphs on the model's GPU
                return self._generate(prompt_ids, settings, initial_state, on_prompt_done, on_step)
        return self._generate(prompt_ids, settings, initial_state, on_prompt_done, on_step)

    def _generate(self, prompt_ids, settings: DecodeSettings, initial_state, on_prompt_done, on_step) -> GenerationResult:
        n, steps_max, sampling = settings.n, settings.max_new_tokens, settings.sampling
        num_prompts = len(prompt_ids)
        rows = num_prompts * n
        stops = self._stop_ids(settings)
        use_graphs = self.cuda_graphs and self.graph_failure is None

        start = time.perf_counter()
        with SiteCapture(self.model, self.sites) as capture:
            prefill_cache, logits, attention_mask, next_position = self._prefill(capture, prompt_ids, n)
            width = attention_mask.shape[1]
            key = (num_prompts, n, width, steps_max, sampling, settings.esamp, settings.ignore_eos,
                   self.fixed_candidates)
            prog = self._cached if self._cached is not None and self._cached.key == key else None
            if prog is None:
                self._cached = None  # one cached program at a time: free the old graphs first
                prog = self._new_program(prefill_cache, settings, rows, width, num_prompts, initial_state, key)
                if use_graphs:
                    self._load(prog, prefill_cache, attention_mask, next_position, settings, n, initial_state)
                    self._capture(prog, settings, stops, capture)
                    if prog.graphs is not None:
                        self._cached = prog
            self._load(prog, prefill_cache, attention_mask, next_position, settings, n, initial_state)
            del prefill_cache

            reported = [False] * num_prompts
            results: list[PromptResult | None] = [None] * num_prompts
            token = self._choose(logits, None, None, None, sampling, prog.uniforms[0],
                                 exact=not self.fixed_candidates, truncated=prog.truncated)
            prog.input_ids.copy_(token.unsqueeze(-1))
            prog.state.record(token, prog.step, stops, self.pad_token_id, logits)
            prog.step += 1
            steps_run = 0
            try:
                for step in range(steps_max):
                    if step > 0:
                        self._decode_step(prog, settings, stops, capture)
                        steps_run += 1
                    if step == steps_max - 1:
                        prog.state.finished.fill_(True)
                    if on_step is not None:
                        on_step(step)
                    if (step + 1) % settings.check_every == 0 or step == steps_max - 1:
                        if self._report(prog.state, n, reported, results, on_prompt_done):
                            break
            finally:
                if prog.updater is not None and prog is self._cached:
                    prog.updater.wait()  # kept with its graphs for the next call
                elif prog.updater is not None:
                    prog.updater.close()
        elapsed = time.perf_counter() - start
        adapter_stats = prog.adapter.stats() if prog.adapter is not None else None
        return GenerationResult(prompts=[r for r in results if r is not None],
                                tokens_generated=int(prog.state.lengths.sum()), decode_seconds=elapsed,
                                steps=steps_run, adapter_stats=adapter_stats, truncated_rows=int(prog.truncated),
                                nonfinite_rows=int(prog.state.nonfinite.sum()),
                                mode=self._mode(prog, settings),
                                kl_budget=prog.betas.stats() if prog.betas is not None else None)


def check_engine(kind: str) -> str:
    """``kind`` if it names an engine (config key ``engine``), else a ValueError naming the choices."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, but is {kind!r}")
    return kind


def make_engine(kind: str, model, *, sites: SitePair, stop_token_ids: list[int], pad_token_id: int,
                cuda_graphs: bool = True) -> DecodeEngine:
    """The decode engine called ``kind``: ``eager`` (the reference loop) or ``static`` (fixed shapes)."""
    common = dict(sites=sites, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
    if check_engine(kind) == "eager":
        return DecodeEngine(model, **common)
    return StaticDecodeEngine(model, **common, cuda_graphs=cuda_graphs)
