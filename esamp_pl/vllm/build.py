"""Build the per-process ESamp runtime for a loaded vLLM model: head, capture buffers, warm starts.

The Distiller's starting weights come from the same code as the own engine's
(:func:`esamp_pl.init.initial_distiller_state`): ``warm`` reads the checkpoint filed for the model
(``checkpoints/<model>/paper-r<rank>...``, checked against the model's config fingerprint),
``svd`` factors the last layer's FFN weights (read from the model's safetensors files). Each is computed
once per process and copied
into every new group's Distiller.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from esamp_pl.distiller import DistillerSpec
from esamp_pl.sites import SitePair
from esamp_pl.vllm.capture import VllmStateCapture
from esamp_pl.vllm.options import PluginSettings, model_name_for
from esamp_pl.vllm.runtime import ESampRuntime, output_head


@dataclass(frozen=True)
class _ModelSpecView:
    name: str


@dataclass(frozen=True)
class _LoadedView:
    """The fields of :class:`esamp_pl.models.LoadedModel` that the init code reads, for a vLLM model."""

    model: Any
    spec: _ModelSpecView
    fingerprint: str


def _checkpoint_tensors(model_path: str, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors ``names`` read from the model's safetensors files (vLLM's CPU build repacks its linear
    weights and leaves ``layer.weight`` empty, so the svd init reads the checkpoint instead)."""
    from safetensors import safe_open

    folder = Path(model_path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model_path, local_files_only=True))
    found: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in set(names) & set(handle.keys()):
                found[name] = handle.get_tensor(name)
    missing = sorted(set(names) - set(found))
    if missing:
        raise ValueError(f"esamp_init=svd needs {missing} from the model's safetensors files in {folder}; "
                         "use esamp_init=random or warm")
    return found


def _last_layer_ffn(model_path: str, num_layers: int) -> Any:
    """A stand-in with the layout :func:`esamp_pl.init.svd_state` reads: ``model.layers[-1].mlp.*_proj.weight``."""
    prefix = f"model.layers.{num_layers - 1}.mlp."
    names = [prefix + part + "_proj.weight" for part in ("down", "up", "gate")]
    tensors = _checkpoint_tensors(model_path, names)
    mlp = SimpleNamespace(**{f"{part}_proj": SimpleNamespace(weight=tensors[prefix + part + "_proj.weight"])
                             for part in ("down", "up", "gate")})
    return SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(mlp=mlp)], norm=SimpleNamespace()))


class InitialStates:
    """``esamp_init`` -> one Distiller's weights (None for random), computed once per kind."""

    def __init__(self, loaded: _LoadedView, spec: DistillerSpec, settings: PluginSettings, *, model_path: str,
                 num_layers: int) -> None:
        self.loaded = loaded
        self.model_path = model_path
        self.num_layers = num_layers
        self.spec = spec
        self.settings = settings
        self._cache: dict[str, dict[str, torch.Tensor] | None] = {}

    def __call__(self, kind: str) -> dict[str, torch.Tensor] | None:
        if kind not in self._cache:
            from esamp_pl.init import initial_distiller_state

            loaded = self.loaded
            if kind == "svd":
                loaded = dataclasses.replace(loaded, model=_last_layer_ffn(self.model_path, self.num_layers))
            self._cache[kind] = initial_distiller_state(
                kind, loaded_model=loaded, sites=SitePair(self.settings.sites), distiller_spec=self.spec,
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


def build_runtime(view: Any) -> tuple[VllmStateCapture, ESampRuntime]:
    """The capture hooks and the ESamp runtime for a loaded model; ``view`` is the runner adapter's view
    (``v1_runner.RunnerView`` or ``mrv2_runner.Mrv2RunnerView``: vllm_config, model, max_tokens, speculative),
    which binds them to its runner."""
    from esamp_pl.models import model_fingerprint

    config: Any = view.vllm_config
    settings = PluginSettings.from_additional_config(config.additional_config)
    if config.parallel_config.tensor_parallel_size > 1 or config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("the esamp_pl vLLM plugin runs with tensor_parallel_size=1 and pipeline_parallel_size=1 "
                         "(the Distiller's logits need the whole LM head on one worker)")
    if view.speculative():
        raise ValueError("the esamp_pl vLLM plugin does not support speculative decoding (a request would sample "
                         "several tokens per step from draft rows ESamp does not see); drop --speculative-config")
    parallel = config.parallel_config
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "decode_context_parallel_size", 1) > 1 \
            or getattr(parallel, "prefill_context_parallel_size", 1) > 1:
        raise ValueError("the esamp_pl vLLM plugin needs one forward over the whole batch per step: turn off "
                         "dual-batch overlap (enable_dbo) and decode/prefill context parallelism")
    model = view.model
    weight, bias, softcap, scale = _head_of(model)
    hf_config = config.model_config.hf_config
    text_config = hf_config.get_text_config()
    hidden_size = int(text_config.hidden_size)
    device = weight.device
    capture = VllmStateCapture(model, max_tokens=view.max_tokens(), hidden_size=hidden_size, dtype=weight.dtype,
                               device=device)
    spec = settings.adapter_spec(hidden_size)
    loaded = _LoadedView(model=model, spec=_ModelSpecView(model_name_for(config.model_config.model, settings)),
                         fingerprint=model_fingerprint(hf_config))
    initial = InitialStates(loaded, spec.distiller, settings, model_path=config.model_config.model,
                            num_layers=int(text_config.num_hidden_layers))
    runtime = ESampRuntime(settings, head=output_head(weight, bias, softcap), hidden_size=hidden_size,
                           device=device, initial_state=initial, logit_scale=scale)
    return capture, runtime
