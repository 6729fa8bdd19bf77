"""Where the Distiller update runs: inline, on a worker thread, or on a side CUDA stream (graphed or not).

A decode step hands its (source, target, active rows) to the updater with :meth:`InlineUpdater.stage`
(inside the step, so it can be captured in a CUDA graph), starts the update with ``launch()``
right after the token is sampled (the CPU worker runs it just before the next step's prediction,
in one job: :class:`ThreadUpdater`), and calls ``wait()`` just before the next Distiller prediction.

Lag: ``LAG = 0`` for every mode. The prediction at step t + 1 uses the parameters after the update
on step t's pairs, exactly as the synchronous path (spec, Alg. 1), so ``sync`` and ``async`` give
the same tokens. ``async`` wins its time elsewhere: the update overlaps the next model forward (the
bulk of a step), which needs no Distiller, and ``wait()`` is the only ordering point. The spec
allows a prediction one step older than synchronous; this design does not need it.

* ``sync``: the update runs inline on the decode thread and stream.
* ``async`` on a CPU: a worker thread (torch ops release the GIL), beside blocks 1..L of the next forward.
* ``async`` on CUDA: a side stream, ordered by events; with CUDA graphs the update is its own
  captured graph, replayed on that stream.

``async`` is the default: on the project's 2-core CPU machine (SmolLM2-135M, 4 prompts x 8
samples) inline updates ran at 0.92 of ESamp-off throughput and the worker thread at 0.99-1.03,
alternated runs; on a GPU the side stream keeps the update off the critical path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from esamp_pl.adapter import UPDATE_MODES, TestTimeAdapter

LAG = 0
"decode steps by which a prediction's parameters trail the synchronous path's, in every mode"


class InlineUpdater:
    """The synchronous update: inline, reusing the step's prediction and its activations (no second forward)."""

    reuses_prediction = True
    "the update reuses the step's prediction and its activations (the adapter keeps them)"
    predicts_early = False
    "the prediction can start as soon as the source state exists (:meth:`predict_early`), beside the forward"

    def __init__(self, adapter: TestTimeAdapter) -> None:
        self.adapter = adapter
        self._pair: tuple[torch.Tensor, torch.Tensor] | None = None
        # esamp.update_every > 1: pairs go to the adapter's ring, one update (update_block) per k steps
        self.ring = adapter.ring
        if self.ring is not None:
            self.reuses_prediction = False
        adapter.keeps_activations = self.reuses_prediction  # no activations kept that no update reads

    def stage(self, source: torch.Tensor, target: torch.Tensor, active: torch.Tensor) -> None:
        """This step's pairs and the rows that may train on them."""
        if self.ring is not None:
            self.ring.write(source, target, active)
            return
        self._pair = (target, active)

    def _take(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pair is None:
            raise RuntimeError("launch() needs this step's pairs: call stage() first")
        pair, self._pair = self._pair, None
        return pair

    def launch(self) -> None:
        if self.ring is not None:
            if self.ring.step_done():
                self.adapter.update_block()
            return
        self.adapter.update(*self._take())

    def wait(self) -> None:
        """Block until the launched update is applied (before the next prediction)."""

    def predict_early(self, source: torch.Tensor) -> None:
        """Start this step's prediction from ``source`` now (only where :attr:`predicts_early`)."""
        raise NotImplementedError(f"{type(self).__name__} predicts inline, in the step")

    def take_prediction(self) -> torch.Tensor | None:
        """The prediction started by :meth:`predict_early` for this step, or None if none was started."""
        return None

    def close(self) -> None:
        self.wait()


class ThreadUpdater(InlineUpdater):
    """CPU ``async``: the update runs on one worker thread while the decode thread runs the next forward.

    The next prediction runs there too, as soon as the forward has produced its source state (block
    0's output, :attr:`SiteCapture.on_source`), beside the model's blocks 1..L: the decode thread
    keeps only the candidates' projection and the fusion.

    ``launch()`` only sets step t's update aside; the source hook of step t + 1 starts one job that
    runs that update and then the prediction (lag 0, the sync tokens). Back to back, the prediction
    reads the parameters the update has just written while they are still in the worker's cache:
    the forward streams the model's weights through the shared cache between any two steps. On the
    project's CPU (SmolLM2-135M, 4 x 8) that took the prediction from ~1.26 to ~0.9 ms a step in
    situ, for the same update. A step whose forward calls no hook (none is installed) gets its
    update started by ``wait()``, before an inline prediction.
    """

    predicts_early = True

    def __init__(self, adapter: TestTimeAdapter) -> None:
        super().__init__(adapter)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="esamp-update")
        self._future: Future | None = None
        self._prediction: Future | None = None
        self._deferred: Callable[[], None] | None = None

    def predict_early(self, source: torch.Tensor) -> None:
        # A copy: the worker reads it while the forward goes on, and the forward owns its buffers.
        source = source.clone()
        update, self._deferred = self._deferred, None

        def update_then_predict() -> torch.Tensor:
            if update is not None:
                update()
            return self.adapter.predict(source)

        self._prediction = self._pool.submit(update_then_predict)
        if update is not None:
            self._future = self._prediction  # wait() waits for the update inside it

    def take_prediction(self) -> torch.Tensor | None:
        if self._prediction is None:
            return None
        future, self._prediction = self._prediction, None
        return future.result()  # re-raises the worker's exception here

    def launch(self) -> None:
        self.wait()
        if self.ring is not None:
            if self.ring.step_done():
                self._deferred = self.adapter.update_block
            return
        self._deferred = functools.partial(self.adapter.update, *self._take())

    def wait(self) -> None:
        if self._deferred is not None:  # no early prediction came to carry it
            update, self._deferred = self._deferred, None
            self._future = self._pool.submit(update)
        if self._future is not None:
            future, self._future = self._future, None
            future.result()  # re-raises the worker's exception here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._prediction = None
            self._pool.shutdown(wait=True)


class StreamUpdater(InlineUpdater):
    """CUDA: the update on a copy of the pairs, on a side stream (``async``) or the current one (``sync``).

    The pairs are copied into fixed staging buffers inside the step, so the update never reads a
    tensor the next forward overwrites, and recomputes the Distiller forward from them
    (:meth:`TestTimeAdapter.update_on`): the prediction ran in another CUDA graph, or on another stream.
    """

    reuses_prediction = False

    def __init__(self, adapter: TestTimeAdapter, *, side_stream: bool) -> None:
        super().__init__(adapter)
        self.device = adapter.updates.device
        self.stream = torch.cuda.Stream(device=self.device) if side_stream else None
        self._staged = torch.cuda.Event()
        self._done = torch.cuda.Event()
        self._in_flight = False
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None

    def stage(self, source: torch.Tensor, target: torch.Tensor, active: torch.Tensor) -> None:
        if self.ring is not None:
            self.ring.write(source, target, active)  # fixed buffers already: no staging copy
            return
        if self.buffers is None:
            self.buffers = (torch.empty_like(source), torch.empty_like(target), torch.empty_like(active))
        for buffer, value in zip(self.buffers, (source, target, active)):
            buffer.copy_(value)

    def _run(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        elif self.ring is not None:
            self.adapter.update_block()
        else:
            self.adapter.update_on(*self.buffers)

    def launch(self) -> None:
        if self.ring is not None and not self.ring.step_done():
            return  # the block is not complete yet
        if self.buffers is None and self.ring is None:
            raise RuntimeError("launch() needs this step's pairs: call stage() first")
        if self.stream is None:
            self._run()
            return
        self.wait()  # one update in flight at a time: the staging buffers are single
        self._staged.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self._staged)
            self._run()
            self._done.record(self.stream)
        self._in_flight = True

    def wait(self) -> None:
        if self._in_flight:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._in_flight = False

    def capture(self, pool=None) -> None:
        """Capture the update (forward, backward, clipped fused Adam) as a CUDA graph; later launches replay it.

        Call after a few eager launches (warm-up) and with the staging buffers filled.
        """
        self.wait()
        if self.ring is not None:
            # Warm-up may not have completed a block; run the update once eagerly (the engine restarts the
            # adapter after capture, so this step leaves no trace).
            self.adapter.update_block()
            torch.cuda.current_stream(self.device).synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=pool):
            if self.ring is not None:
                self.adapter.update_block()
            else:
                self.adapter.update_on(*self.buffers)
        self._graph = graph

    def drop_graph(self) -> None:
        """Run the update eagerly again (its capture, or the capture of the step around it, failed)."""
        self._graph = None


def make_updater(adapter: TestTimeAdapter, mode: str, *, device: torch.device,
                 cuda_graphs: bool = False) -> InlineUpdater:
    """The updater for ``mode`` (``sync`` or ``async``) on ``device``; ``cuda_graphs`` when it will be captured."""
    if mode not in UPDATE_MODES:
        raise ValueError(f"esamp.update_mode must be one of {UPDATE_MODES}, but is {mode!r}")
    if device.type == "cuda" and (mode == "async" or cuda_graphs):
        return StreamUpdater(adapter, side_stream=mode == "async")
    return ThreadUpdater(adapter) if mode == "async" else InlineUpdater(adapter)
