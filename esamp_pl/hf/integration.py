"""``generate(model, ...)`` with Hugging Face's arguments, decoded by esamp_pl's engine with ESamp.

What is honoured, with HF's precedence (arguments > ``generation_config`` > the model's generation
config > transformers' defaults): ``do_sample`` (False: greedy), ``temperature``, ``top_k`` (HF's
default 50 included), ``top_p``, ``min_p``, ``max_new_tokens`` / ``max_length``, ``eos_token_id``
(every id stops a sample), ``pad_token_id``, ``num_return_sequences`` (ESamp's n: the samples of a
prompt share and train one Distiller) and ``return_dict_in_generate``. Settings esamp_pl cannot
apply (beam search, repetition penalties, logits processors, streamers...) are a ValueError, not
silently dropped.

ESamp's own arguments start with ``esamp_``: every field of :class:`esamp_pl.ESampConfig`
(``esamp_beta=0.25``, ``esamp_warm_start=True``, ``esamp_scope="shared"``, ...), or a whole
``esamp_config=ESampConfig(...)``, plus ``esamp_enabled=False`` (plain sampling in the same engine),
``esamp_seed`` (default: drawn from torch's global generator, so ``torch.manual_seed`` makes a call
repeatable, as with HF sampling), ``esamp_engine`` and ``esamp_cuda_graphs``.

The result is shaped like HF's: ``[batch * num_return_sequences, prompt width + new]``, rows
``b * n + j``, the prompt as given (padding included), then the new tokens, the stop token where a
sample stopped, and ``pad_token_id`` after it up to the longest sample. The stop token written is
the generation config's first EOS id (the engine records that a sample stopped, not with which id).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from esamp_pl.api import ESampConfig, generate_ids
from esamp_pl.sampling import SamplingParams

_RUN_ARGUMENTS = ("esamp_enabled", "esamp_config", "esamp_seed", "esamp_engine", "esamp_cuda_graphs")
_CONFIG_FIELDS = tuple(f"esamp_{f.name}" for f in dataclasses.fields(ESampConfig))

_NOT_APPLIED = {"num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "repetition_penalty": 1.0,
                "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "min_length": 0,
                "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
                "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None, "guidance_scale": None,
                "sequence_bias": None, "stop_strings": None, "exponential_decay_length_penalty": None,
                "watermarking_config": None, "output_scores": False, "output_logits": False,
                "output_attentions": False, "output_hidden_states": False, "prompt_lookup_num_tokens": None,
                "assistant_early_exit": None}
"generation-config fields esamp_pl does not apply, with the value that means 'off'"


def _split_esamp_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    found = {key: kwargs.pop(key) for key in list(kwargs) if key.startswith("esamp_")}
    unknown = sorted(set(found) - set(_CONFIG_FIELDS) - set(_RUN_ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown ESamp argument(s) {unknown}; valid: {sorted(_CONFIG_FIELDS + _RUN_ARGUMENTS)}")
    return found


def _esamp_config(arguments: dict[str, Any]) -> ESampConfig | None:
    if not arguments.get("esamp_enabled", True):
        return None
    base = arguments.get("esamp_config") or ESampConfig()
    if not isinstance(base, ESampConfig):
        raise ValueError(f"esamp_config must be an esamp_pl.ESampConfig, but is {type(base).__name__}")
    fields = {key.removeprefix("esamp_"): value for key, value in arguments.items() if key in _CONFIG_FIELDS}
    return dataclasses.replace(base, **fields)


def _check_applied(config, **unsupported_arguments: Any) -> None:
    given = [name for name, value in unsupported_arguments.items() if value]
    for name, off in _NOT_APPLIED.items():
        value = getattr(config, name, None)
        if value is not None and value != off:
            given.append(f"{name}={value!r}")
    if given:
        raise ValueError(f"esamp_pl's custom_generate does not apply {given}; remove them, or run without "
                         "custom_generate")


def _sampling(config) -> SamplingParams:
    if not config.do_sample:
        return SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    return SamplingParams(temperature=float(config.temperature if config.temperature is not None else 1.0),
                          top_k=int(config.top_k or 0), top_p=float(config.top_p if config.top_p is not None else 1.0),
                          min_p=float(config.min_p or 0.0))


def _eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else [int(i) for i in (eos.tolist() if torch.is_tensor(eos) else eos or [])]
    if not ids:
        raise ValueError("no eos_token_id in the generation config; pass eos_token_id= (a sample stops at it)")
    return ids


def _new_tokens(config, prompt_width: int) -> int:
    if config.max_new_tokens is not None:
        return int(config.max_new_tokens)
    if config.max_length is not None and config.max_length > prompt_width:
        return int(config.max_length - prompt_width)
    raise ValueError(f"max_length={config.max_length} leaves no room after the {prompt_width}-token prompt; "
                     "pass max_new_tokens=")


def generate(model, inputs: torch.Tensor | None = None, generation_config=None, logits_processor=None,
             stopping_criteria=None, prefix_allowed_tokens_fn=None, synced_gpus=None, assistant_model=None,
             streamer=None, negative_prompt_ids=None, negative_prompt_attention_mask=None,
             use_model_defaults=None, **kwargs):
    """``model.generate``'s arguments in, its output shape out; ESamp decides the tokens (module docstring)."""
    esamp_arguments = _split_esamp_arguments(kwargs)
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    kwargs.pop("input_ids", None)
    if input_ids is None:
        raise ValueError("pass the prompts as input_ids (e.g. model.generate(**tokenizer(texts, return_tensors='pt',"
                         " padding=True), ...))")
    attention_mask = kwargs.pop("attention_mask", None)
    config, model_kwargs = model._prepare_generation_config(generation_config, **kwargs)
    _check_applied(config, logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                   prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, assistant_model=assistant_model,
                   streamer=streamer, negative_prompt_ids=negative_prompt_ids, synced_gpus=synced_gpus,
                   **{f"argument {key}": value for key, value in model_kwargs.items()
                      if not key.startswith("output_") and key != "use_cache"})
    eos = _eos_ids(config)
    pad = int(config.pad_token_id) if config.pad_token_id is not None else eos[0]
    mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    prompt_ids = [row[keep].tolist() for row, keep in zip(input_ids, mask)]
    n = int(config.num_return_sequences or 1)
    seed = esamp_arguments.get("esamp_seed")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
    result, _stats = generate_ids(model, prompt_ids, stop_token_ids=eos, pad_token_id=pad, n=n,
                                  max_new_tokens=_new_tokens(config, input_ids.shape[1]),
                                  esamp=_esamp_config(esamp_arguments), sampling=_sampling(config), seed=seed,
                                  engine=esamp_arguments.get("esamp_engine", "static"),
                                  cuda_graphs=esamp_arguments.get("esamp_cuda_graphs", True))
    new = [s.token_ids + ([eos[0]] if s.finish_reason == "stop" else []) for p in result.prompts for s in p.samples]
    width = max(len(tokens) for tokens in new)
    tail = torch.full((len(new), width), pad, dtype=input_ids.dtype)
    for row, tokens in enumerate(new):
        tail[row, :len(tokens)] = torch.tensor(tokens, dtype=input_ids.dtype)
    sequences = torch.cat([input_ids.repeat_interleave(n, dim=0), tail.to(input_ids.device)], dim=1)
    if config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences)
    return sequences
