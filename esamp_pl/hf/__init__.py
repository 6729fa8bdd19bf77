"""ESamp inside Hugging Face ``generate``, through transformers' ``custom_generate`` convention.

    model.generate(**inputs, custom_generate=esamp_pl.hf.CUSTOM_GENERATE, trust_remote_code=True,
                   do_sample=True, min_p=0.1, num_return_sequences=8, max_new_tokens=64, esamp_beta=0.25)

``CUSTOM_GENERATE`` is a local folder holding ``custom_generate/generate.py`` (shipped inside the
package, so it works offline); transformers runs its ``generate(model, ...)`` instead of its own
decoding, which is why it asks for ``trust_remote_code=True``. See :mod:`esamp_pl.hf.integration`
for what is honoured and what the ``esamp_*`` arguments are.
"""

from __future__ import annotations

from pathlib import Path

CUSTOM_GENERATE = str(Path(__file__).resolve().parent)
"the folder to pass as ``custom_generate=`` (it contains ``custom_generate/generate.py``)"

__all__ = ["CUSTOM_GENERATE"]
