"""The fixed-shape decode engine: static KV cache, pre-allocated buffers, CUDA graphs on CUDA.

It runs in the same loop as :class:`~esamp_pl.engine.DecodeEngine` (:class:`~esamp_pl.decode_loop.DecodeLoop`:
prefill, first token, reporting, results; candidates, ESamp's scores, sampling and per-row
bookkeeping in ``DecodeLoop._sample``) and gives the same tokens for the same seed; what it supplies
is a decode step with every shape fixed before the first one, so that a step allocates no new buffer
and never waits on the host:

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
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from esamp_pl.decode_loop import DecodeLoop, DecodeRun, DecodeSettings, DecodeState, GenerationResult, PromptResult
from esamp_pl.engine import DecodeEngine
from esamp_pl.sites import SiteCapture, SitePair

log = logging.getLogger(__name__)

ENGINES = ("eager", "static")
WARMUP_STEPS = 2
"eager steps run before capture (lazy initialisation: kernel selection, cuBLAS handles)"


@dataclass(eq=False)
class _Program(DecodeRun):
    """The fixed buffers of one (shape, settings) combination and, on CUDA, its captured graphs."""

    cache: StaticCache
    key_valid: torch.Tensor
    "[rows, cache length] which cache slots each row attends to"
    position: torch.Tensor
    "[rows, 1] the position of the token fed to the next forward"
    write_column: torch.Tensor
    "[1] the cache slot the next forward writes"
    logits: torch.Tensor | None = None
    source: torch.Tensor | None = None
    target: torch.Tensor | None = None
    graphs: tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph] | None = None
    key: tuple = field(default=())


class StaticDecodeEngine(DecodeLoop):
    """Fixed-shape decoding with the same interface and tokens as :class:`DecodeEngine`."""

    def __init__(self, model, *, sites: SitePair, stop_token_ids: list[int], pad_token_id: int,
                 cuda_graphs: bool = True) -> None:
        super().__init__(model, sites=sites, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.fixed_candidates = self.device.type == "cuda"  # no host read in a step (see DecodeLoop)
        self.graph_failure: str | None = None
        "why CUDA graph capture failed (then every call runs eagerly); None if it did not"
        self._cached: _Program | None = None

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], settings: DecodeSettings, *,
                 initial_state: dict[str, torch.Tensor] | None = None,
                 on_prompt_done: Callable[[PromptResult], None] | None = None,
                 on_step: Callable[[int], None] | None = None) -> GenerationResult:
        """Same contract as :meth:`DecodeEngine.generate`."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # streams, events and graphs on the model's GPU
                return self._loop(prompt_ids, settings, initial_state, on_prompt_done, on_step)
        return self._loop(prompt_ids, settings, initial_state, on_prompt_done, on_step)

    # -- the two halves of a decode step, shared by eager runs, warm-up and capture --------------------------

    def _forward_step(self, prog: _Program, capture: SiteCapture) -> None:
        prog.key_valid.index_fill_(1, prog.write_column, True)
        prog.logits = self._forward(prog.input_ids, prog.key_valid[:, None, None, :], prog.position, prog.cache)
        prog.position += 1
        prog.write_column += 1
        prog.source, prog.target = capture.pop()

    def _choose_step(self, prog: _Program) -> None:
        active = ~prog.state.finished
        self._sample(prog, prog.logits, prog.esamp, prog.source, prog.target, active)
        if prog.esamp is not None:
            prog.esamp.stage(prog.source, prog.target, active)  # launched outside the graph, after it

    def _decode_step(self, prog: _Program, capture: SiteCapture) -> None:
        if prog.graphs is not None:
            prog.graphs[0].replay()
        else:
            self._forward_step(prog, capture)
        if prog.esamp is not None:
            prog.esamp.before_prediction()
        if prog.graphs is not None:
            prog.graphs[1].replay()
        else:
            self._choose_step(prog)
        if prog.esamp is not None:
            prog.esamp.launch()

    # -- buffers ---------------------------------------------------------------------------------------------

    def _begin(self, capture, prompt_ids, settings, initial_state, stops, observer) -> tuple[_Program, torch.Tensor]:
        n, num_prompts = settings.n, len(prompt_ids)
        prefill_cache, logits, attention_mask, next_position = self._prefill(capture, prompt_ids, n)
        width = attention_mask.shape[1]
        key = (num_prompts, n, width, settings.max_new_tokens, settings.sampling, settings.esamp,
               settings.ignore_eos, self.fixed_candidates)
        prog = self._cached if self._cached is not None and self._cached.key == key else None
        if prog is None:
            self._cached = None  # one cached program at a time: free the old graphs first
            prog = self._new_program(prefill_cache, settings, stops, num_prompts * n, width, num_prompts,
                                     initial_state, key)
            if self.cuda_graphs and self.graph_failure is None:
                self._load(prog, prefill_cache, attention_mask, next_position, settings, stops, initial_state)
                self._capture(prog, capture)
                if prog.graphs is not None:
                    self._cached = prog
        self._load(prog, prefill_cache, attention_mask, next_position, settings, stops, initial_state)
        return prog, logits

    def _new_program(self, prefill_cache: DynamicCache, settings: DecodeSettings, stops: torch.Tensor, rows: int,
                     width: int, num_prompts: int, initial_state, key: tuple) -> _Program:
        device = self.device
        cache = StaticCache(config=self.model.config, max_cache_len=width + settings.max_new_tokens - 1)
        first = [layer.keys for layer in prefill_cache.layers]
        cache.early_initialization(batch_size=rows, num_heads=[k.shape[1] for k in first],
                                   head_dim=[k.shape[-1] for k in first], dtype=first[0].dtype, device=device)
        if not all(type(layer) is StaticLayer for layer in cache.layers):
            raise NotImplementedError(
                f"{type(self.model).__name__} needs sliding-window or hybrid cache layers, which the static engine "
                "does not support; use engine=eager")
        esamp = self._esamp_step(settings, num_prompts, initial_state,
                                 cuda_graphs=self.cuda_graphs and self.graph_failure is None)
        long = dict(dtype=torch.long, device=device)
        return _Program(
            settings=settings, stops=stops,
            state=DecodeState.empty(rows, settings.max_new_tokens, self.pad_token_id, device),
            uniforms=torch.zeros(settings.max_new_tokens, rows, device=device), step=torch.zeros(1, **long),
            input_ids=torch.zeros(rows, 1, **long), truncated=torch.zeros((), **long), esamp=esamp,
            cache=cache, key_valid=torch.zeros(rows, cache.layers[0].max_cache_len, dtype=torch.bool, device=device),
            position=torch.zeros(rows, 1, **long), write_column=torch.zeros(1, **long), key=key)

    def _load(self, prog: _Program, prefill_cache: DynamicCache, attention_mask: torch.Tensor,
              next_position: torch.Tensor, settings: DecodeSettings, stops: torch.Tensor, initial_state) -> None:
        """(Re)start ``prog`` in place from a prefill: cache, mask, positions, counters, Distillers."""
        n = settings.n
        width = attention_mask.shape[1]
        for layer, prefilled in zip(prog.cache.layers, prefill_cache.layers):
            layer.keys[:, :, :width].copy_(prefilled.keys.repeat_interleave(n, dim=0))
            layer.values[:, :, :width].copy_(prefilled.values.repeat_interleave(n, dim=0))
            layer.keys[:, :, width:].zero_()
            layer.values[:, :, width:].zero_()
            layer.cumulative_length.fill_(width)  # StaticLayer's write position (a device tensor)
        prog.settings, prog.stops = settings, stops
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
        if prog.esamp is not None:
            prog.esamp.restart(settings.seed, initial_state)

    def _end(self, prog: _Program) -> None:
        if prog.esamp is not None and prog is self._cached:
            prog.esamp.before_prediction()  # kept with its graphs for the next call
        else:
            super()._end(prog)

    # -- CUDA graphs -----------------------------------------------------------------------------------------

    def _capture(self, prog: _Program, capture: SiteCapture) -> None:
        """Warm up, then capture the step's two halves and the update; on failure warn once, stay eager."""
        try:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._decode_step(prog, capture)
                if prog.esamp is not None:
                    prog.esamp.before_prediction()
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            forward, choose = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward, pool=pool):
                self._forward_step(prog, capture)
            with torch.cuda.graph(choose, pool=pool):
                self._choose_step(prog)
            if prog.esamp is not None:
                prog.esamp.capture_update()  # its own pool: it may run concurrently with the forward graph
            prog.graphs = (forward, choose)
        except Exception as err:  # capture is an optimisation: the eager step gives the same tokens
            self.graph_failure = f"{type(err).__name__}: {err}".splitlines()[0]
            warnings.warn(f"CUDA graph capture failed ({self.graph_failure}); the static engine runs eagerly from "
                          "now on", RuntimeWarning, stacklevel=3)
            log.warning("CUDA graph capture failed (%s); running eagerly", self.graph_failure)
            prog.graphs = None
            if prog.esamp is not None:
                prog.esamp.drop_update_graph()
            torch.cuda.synchronize(self.device)

    def _mode(self, prog: _Program) -> str:
        if prog.graphs is not None:
            mode = "static, cuda graphs"
        elif self.graph_failure is not None:
            mode = f"static, eager (CUDA graph capture failed: {self.graph_failure})"
        else:
            mode = "static, eager"
        return mode + (prog.esamp.update_label if prog.esamp is not None else "")


def check_engine(kind: str) -> str:
    """``kind`` if it names an engine (config key ``engine``), else a ValueError naming the choices."""
    if kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, but is {kind!r}")
    return kind


def make_engine(kind: str, model, *, sites: SitePair, stop_token_ids: list[int], pad_token_id: int,
                cuda_graphs: bool = True) -> DecodeLoop:
    """The decode engine called ``kind``: ``eager`` (the reference loop) or ``static`` (fixed shapes)."""
    common = dict(sites=sites, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id)
    if check_engine(kind) == "eager":
        return DecodeEngine(model, **common)
    return StaticDecodeEngine(model, **common, cuda_graphs=cuda_graphs)
