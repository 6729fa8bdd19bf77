"""transformers' entry point for ``model.generate(custom_generate=esamp_pl.hf.CUSTOM_GENERATE, ...)``.

transformers copies this file into its module cache and calls its ``generate(model, ...)``; the
implementation lives in the installed package, so there is one copy of it.
"""

from esamp_pl.hf.integration import generate

__all__ = ["generate"]
