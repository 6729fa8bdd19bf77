"""Find the pre-trained Distiller for any loaded model by its fingerprint, not by a config name.

A model handed to the Python API or to Hugging Face ``generate`` has no ``conf/model`` name, but its
config fingerprint (``esamp_pl.models.model_fingerprint``) is recorded in every checkpoint. This
scans the checkpoint folders (the user's, then the shipped ones: ``esamp_pl.resources``) and
reads only the safetensors headers; the file found is then loaded and fully checked (checksum,
fingerprint, sites, architecture) by ``esamp_pl.init``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open

from esamp_pl import resources
from esamp_pl.checkpoint import META_KEY, CheckpointMeta, checkpoint_filename
from esamp_pl.distiller import DistillerSpec

log = logging.getLogger(__name__)


def read_meta(path: Path) -> CheckpointMeta | None:
    """The metadata in a checkpoint's header, or None if the file has none that esamp_pl can read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        return CheckpointMeta.from_json(header[META_KEY])
    except Exception as err:  # any unreadable file is simply not a candidate; loading reports it properly
        log.debug("skipping %s: %s", path, err)
        return None


def find_by_fingerprint(fingerprint: str, sites: str, spec: DistillerSpec,
                        folders: list[Path] | None = None) -> tuple[Path, CheckpointMeta] | None:
    """The first checkpoint (path, metadata) made for a model with ``fingerprint``, this site preset and this
    Distiller architecture, searching ``folders`` (default: ``resources.checkpoint_dirs()``); None if none is."""
    name = checkpoint_filename(sites, spec)
    for folder in folders if folders is not None else resources.checkpoint_dirs():
        for path in sorted(Path(folder).glob(f"*/{name}")):
            meta = read_meta(path)
            if meta is not None and meta.model_fingerprint == fingerprint and meta.sites == sites:
                return path, meta
    return None
