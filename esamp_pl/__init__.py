"""esamp_pl: Exploratory Sampling (ESamp) for Hugging Face causal LMs, with pre-trained Distillers.

The Python API (see :mod:`esamp_pl.api`)::

    import esamp_pl
    out = esamp_pl.generate(model, tokenizer, ["Write a poem."], n=8, max_new_tokens=128,
                            esamp=esamp_pl.ESampConfig(beta=0.25, warm_start=True), min_p=0.1, seed=0)
    out.texts[0][3], out.stats.updates

With Hugging Face ``generate``: ``model.generate(**inputs, custom_generate=esamp_pl.hf.CUSTOM_GENERATE,
trust_remote_code=True, do_sample=True, num_return_sequences=8, esamp_beta=0.25)`` (:mod:`esamp_pl.hf`).
The names are imported on first use, so ``import esamp_pl`` stays light for the command-line tools.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["ESampConfig", "GenerateOutput", "GenerationStats", "generate", "generate_ids", "load_model", "hf",
           "__version__"]

if TYPE_CHECKING:
    from esamp_pl import hf
    from esamp_pl.api import ESampConfig, GenerateOutput, GenerationStats, generate, generate_ids, load_model


def __getattr__(name: str):
    if name == "hf":
        return importlib.import_module("esamp_pl.hf")
    if name in __all__:
        return getattr(importlib.import_module("esamp_pl.api"), name)
    raise AttributeError(f"module 'esamp_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
