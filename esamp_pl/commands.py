"""Console commands of an installed esamp_pl: ``esamp-generate``, ``esamp-pretrain``, ``esamp-evaluate``,
``esamp-benchmark``.

Each runs the repository's entry-point script (``scripts/*.py``, shipped in the wheel as
``esamp_pl/scripts``) as ``__main__``, with the same Hydra overrides, so a command and
``python scripts/<name>.py`` are one program with one copy of its code and configs.
"""

from __future__ import annotations

import runpy
import sys

from esamp_pl.resources import SCRIPTS_DIR


def _run(script: str) -> None:
    path = SCRIPTS_DIR / script
    if not path.is_file():
        raise SystemExit(f"esamp_pl is installed without its entry-point scripts ({path} is missing); "
                         "reinstall it with `pip install esamp_pl`")
    sys.argv[0] = str(path)
    runpy.run_path(str(path), run_name="__main__")


def generate() -> None:
    """``esamp-generate [key=value ...]``: ``scripts/generate.py``."""
    _run("generate.py")


def pretrain() -> None:
    """``esamp-pretrain [key=value ...]``: ``scripts/pretrain_distiller.py``."""
    _run("pretrain_distiller.py")


def evaluate() -> None:
    """``esamp-evaluate [key=value ...]``: ``scripts/evaluate.py``."""
    _run("evaluate.py")


def benchmark() -> None:
    """``esamp-benchmark [key=value ...]``: ``scripts/benchmark.py``."""
    _run("benchmark.py")
