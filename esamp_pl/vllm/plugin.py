"""The entry points vLLM loads (see ``[project.entry-points]`` in pyproject.toml).

* ``vllm.general_plugins`` -> :func:`register`, run in every vLLM process: attaches ESamp to the
  model runner once it has loaded its model (:func:`esamp_pl.vllm.v1_runner.install` for the V1
  runner, :func:`esamp_pl.vllm.mrv2_runner.install` for Model Runner V2) and gives
  vLLM's workers an ``esamp_stats`` method, reachable with ``LLM.collective_rpc("esamp_stats")``.
* ``vllm.logits_processors`` -> :class:`esamp_pl.vllm.processor.ESampLogitsProcessor`, the step.
* ``vllm.endpoint_plugins`` -> :class:`StatsEndpoint`: ``GET /esamp/stats`` on ``vllm serve``
  (vLLM loads endpoint plugins only when named in ``VLLM_PLUGINS``, e.g. ``VLLM_PLUGINS=esamp,esamp_stats``).
"""

from __future__ import annotations

from typing import Any

STATS_METHOD = "esamp_stats"


def worker_stats(_worker: Any = None) -> dict[str, Any]:
    """This worker's ESamp counters (Distiller updates, live and freed groups, loss curves of finished groups)."""
    from esamp_pl.vllm import mrv2_runner, v1_runner

    bound = v1_runner.binding() or mrv2_runner.binding()
    return {"attached": False} if bound is None else {"attached": True, **bound.runtime.stats()}


def register() -> None:
    """vLLM general plugin: idempotent, safe to run in every process."""
    from vllm.v1.worker.worker_base import WorkerBase

    from esamp_pl.vllm import mrv2_runner, v1_runner

    v1_runner.install()
    mrv2_runner.install()
    if not hasattr(WorkerBase, STATS_METHOD):
        setattr(WorkerBase, STATS_METHOD, worker_stats)


class StatsEndpoint:
    """``GET /esamp/stats``: every worker's ESamp counters, through vLLM's collective RPC."""

    name = "esamp_stats"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self._engine = None

    def attach_router(self, app) -> None:
        from fastapi import APIRouter
        from fastapi.responses import JSONResponse

        router = APIRouter()

        @router.get("/esamp/stats")
        async def esamp_stats() -> JSONResponse:
            if self._engine is None:
                return JSONResponse({"error": "no engine behind this server"}, status_code=503)
            return JSONResponse({"workers": await self._engine.collective_rpc(STATS_METHOD)})

        app.include_router(router)

    async def init_state(self, engine_client, state, args) -> None:
        self._engine = engine_client
