"""Where esamp_pl's own files are, in a source checkout and in an installed wheel alike.

The Hydra configs and the shipped Distiller checkpoints are package data (``esamp_pl/conf``,
``esamp_pl/checkpoints``; in the repository these are links to the top-level ``conf/`` and
``checkpoints/``, which the wheel build copies as real files). Files a user makes are never written
inside the package: in an installed wheel it may be read-only and is replaced on upgrade.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR / "conf"
"the Hydra configs (config.yaml, pretrain.yaml, evaluate.yaml, benchmark*.yaml and their groups)"
SHIPPED_CHECKPOINTS_DIR = PACKAGE_DIR / "checkpoints"
"pre-trained Distillers that ship with esamp_pl: ``<model name>/<sites>-r<rank>.distiller.safetensors``"
SCRIPTS_DIR = PACKAGE_DIR / "scripts"
"the entry-point scripts (``scripts/*.py`` of the repository) that the console commands run"


def source_checkout() -> Path | None:
    """The repository root when esamp_pl runs from a checkout (or an editable install), else None."""
    root = PACKAGE_DIR.parent
    checkpoints = root / "checkpoints"
    if (root / "pyproject.toml").is_file() and checkpoints.is_dir() and not checkpoints.is_symlink():
        return root
    return None


def user_checkpoints_dir() -> Path:
    """Where a user's own pre-trained Distillers go: ``<esamp_pl cache>/checkpoints`` (``$ESAMP_PL_CACHE``)."""
    from esamp_pl.models import cache_root

    return cache_root() / "checkpoints"


def new_checkpoints_dir() -> Path:
    """Default folder for newly pre-trained Distillers: the repository's ``checkpoints/`` in a checkout (that is
    how the shipped ones are made), else the user folder, never the installed package."""
    root = source_checkout()
    return root / "checkpoints" if root is not None else user_checkpoints_dir()


def checkpoint_dirs() -> list[Path]:
    """Folders searched for a pre-trained Distiller, first match wins: the user folder, the default folder for
    new ones, then the shipped ones (each once, so in a checkout the last is the repository's ``checkpoints/``)."""
    found: list[Path] = []
    for folder in (user_checkpoints_dir(), new_checkpoints_dir(), SHIPPED_CHECKPOINTS_DIR):
        if all(folder.resolve() != seen.resolve() for seen in found):
            found.append(folder)
    return found
