"""Build the per-process ESamp runtime for a loaded vLLM model: head, capture buffers, warm starts.

The Distiller's starting weights come from the same code as the own engine's
(:func:`esamp_pl.init.initial_distiller_state`): ``warm`` reads the checkpoint filed for the model
(``checkpoints/<model>/paper-r<rank>...``, checked against the model's config fingerprint),
``svd`` factors vLLM's own last-layer FFN weights. Each is computed once per process and copied
into every new group's Distiller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from esamp_pl.distiller import DistillerSpec
from esamp_pl.sites import SitePair
from esamp_pl.vllm.capture import VllmStateCapture
from esamp_pl.vllm.options import PluginSettings, model_name_for
from esamp_pl.vllm.runtime import ESampRuntime, output_head

if TYPE_CHECKING:
    from esamp_pl.vllm.v1_runner import RunnerBinding, RunnerView


@dataclass(frozen=True)
class _ModelSpecView:
    name: str


@dataclass(frozen=True)
class _LoadedView:
    """The fields of :class:`esamp_pl.models.LoadedModel` that the init code reads, for a vLLM model."""

    model: torch.nn.Module
    spec: _ModelSpecView
    fingerprint: str


class InitialStates:
    """``esamp_init`` -> one Distiller's weights (None for random), computed once per kind."""

    def __init__(self, loaded: _LoadedView, spec: DistillerSpec, settings: PluginSettings) -> None:
        self.loaded = loaded
        self.spec = spec
        self.settings = settings
        self._cache: dict[str, dict[str, torch.Tensor] | None] = {}

    def __call__(self, kind: str) -> dict[str, torch.Tensor] | None:
        if kind not in self._cache:
            from esamp_pl.init import initial_distiller_state

            self._cache[kind] = initial_distiller_state(
                kind, loaded_model=self.loaded, sites=SitePair(self.settings.sites), distiller_spec=self.spec,
                warm_start_path=self.settings.warm_start_path)
        return self._cache[kind]


def _head_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float | None, float]:
    head = getattr(model, "lm_head", None)
    processor = getattr(model, "logits_processor", None)
    if head is None or not hasattr(head, "weight") or processor is None:
        raise ValueError(f"{type(model).__name__} has no lm_head / logits_processor; the ESamp plugin supports "
                         "vLLM decoder-only LMs laid out like Llama/Qwen/Mistral")
    bias = getattr(head, "bias", None)
    return head.weight, bias if isinstance(bias, torch.Tensor) else None, processor.soft_cap, float(processor.scale)


def build_runtime(view: "RunnerView") -> "RunnerBinding":
    from esamp_pl.models import model_fingerprint
    from esamp_pl.vllm.v1_runner import RunnerBinding

    config: Any = view.vllm_config
    settings = PluginSettings.from_additional_config(config.additional_config)
    if config.parallel_config.tensor_parallel_size > 1 or config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("the esamp_pl vLLM plugin runs with tensor_parallel_size=1 and pipeline_parallel_size=1 "
                         "(the Distiller's logits need the whole LM head on one worker)")
    model = view.model
    weight, bias, softcap, scale = _head_of(model)
    hf_config = config.model_config.hf_config
    hidden_size = int(hf_config.get_text_config().hidden_size)
    device = weight.device
    capture = VllmStateCapture(model, max_tokens=view.max_tokens(), hidden_size=hidden_size, dtype=weight.dtype,
                               device=device)
    spec = settings.adapter_spec(hidden_size)
    loaded = _LoadedView(model=model, spec=_ModelSpecView(model_name_for(config.model_config.model, settings)),
                         fingerprint=model_fingerprint(hf_config))
    runtime = ESampRuntime(settings, head=output_head(weight, bias, softcap), hidden_size=hidden_size,
                           device=device, initial_state=InitialStates(loaded, spec.distiller, settings),
                           logit_scale=scale)
    return RunnerBinding(view=view, capture=capture, runtime=runtime)
